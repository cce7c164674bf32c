"""The model card's "How to load" section (``card.py``): code that loads what ``export`` wrote, as written.

One snippet per way to use the export: plain ``peft`` on the base model rebuilt as in training (timm,
transformers, or the recipe's own model), the merged model without ``peft``, ``model.onnx`` with onnxruntime (its
inputs and preprocessing are the task's ``onnx_spec``), and the ``predict`` command of peft_lightning. Names and
paths are the real ones; the tests run each code block as it stands in the card.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from peft_lightning.card import _code, _hparams, _library, _recipe_name
from peft_lightning.internals import BatchNorm

if TYPE_CHECKING:
    from peft_lightning.onnx_export import OnnxWritten
    from peft_lightning.tasks.base import FineTuneTask


def _is_domain_method(task: nn.Module, name: str) -> bool:
    """Whether ``task.<name>`` is the domain task's own (peft_lightning.tasks), not a recipe's override."""
    fn = getattr(type(task), name, None)
    return fn is not None and getattr(fn, "__module__", "").startswith("peft_lightning.tasks")


def _timm_base(hp: Mapping[str, Any]) -> list[str]:
    """Lines building the timm base as ``ImageClassifier.build_model`` does (a file's head of another size is
    skipped: the adapter folder holds the trained head)."""
    name, n, path = hp.get("model_name"), hp.get("num_classes"), hp.get("checkpoint_path")
    lines = [
        f"base = timm.create_model({name!r}, pretrained={bool(hp.get('pretrained')) and not path}, num_classes={n})"
    ]
    if path:
        read = (
            f"load_file({str(path)!r})"
            if str(path).endswith(".safetensors")
            else f"torch.load({str(path)!r}, map_location='cpu', weights_only=True)"
        )
        lines += [
            f"weights = {read}  # the base the adapter was trained on",
            "own = base.state_dict()",
            "base.load_state_dict({k: v for k, v in weights.items() if v.shape == own[k].shape}, strict=False)",
        ]
    return lines


def _timm_peft_base(hp: Mapping[str, Any]) -> list[str]:
    """The imports and the timm base, its weights read as the file's kind needs."""
    path = str(hp.get("checkpoint_path") or "")
    imports = ["import timm", "from peft import PeftModel"]
    if path:
        imports.append("from safetensors.torch import load_file" if path.endswith(".safetensors") else "import torch")
    return [*imports, "", *_timm_base(hp)]


def _transformers_peft_base(task: FineTuneTask, hp: Mapping[str, Any]) -> list[str]:
    """The imports, the transformers base classifier and its tokenizer, from where the task loaded them."""
    source = task.model_source()
    extra = f", revision={hp['revision']!r}" if hp.get("revision") else ""
    if hp.get("problem_type", "single_label_classification") != "single_label_classification":
        extra += f", problem_type={hp['problem_type']!r}"
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f"base = AutoModelForSequenceClassification.from_pretrained({source!r}, "
        f"num_labels={hp.get('num_labels')}{extra})",
        f"tokenizer = AutoTokenizer.from_pretrained({source!r})",
    ]


def _recipe_peft_base(task: FineTuneTask, hp: Mapping[str, Any]) -> list[str]:
    """The imports and the recipe's own base model (a recipe that builds its base its own way, or a recommender)."""
    cls = type(task)
    keep = {k: hp[k] for k in ("model_name", "num_classes", "num_labels", "pretrained", "checkpoint_path") if k in hp}
    return [
        "from peft import PeftModel",
        f"from {cls.__module__} import {cls.__qualname__}",
        "",
        f"base = {cls.__qualname__}({', '.join(f'{k}={v!r}' for k, v in keep.items())}).model"
        "  # the recipe's base model, without adapters",
    ]


def _peft_snippet(task: FineTuneTask, out: Path) -> list[str]:
    """Markdown lines: the adapter folder loaded with plain ``peft`` onto the base rebuilt as in training."""
    hp = _hparams(task)
    lines = [
        "With `peft` (the base model rebuilt as in training, then the adapter and trained head on it):",
        "",
        "```python",
    ]
    by_recipe = not _is_domain_method(task, "build_model")  # a recipe that loads its base its own way
    if _library(task) == "timm" and not by_recipe:
        lines += _timm_peft_base(hp)
    elif _library(task) == "transformers" and not by_recipe:
        lines += _transformers_peft_base(task, hp)
    else:
        lines += _recipe_peft_base(task, hp)
    lines += [f"model = PeftModel.from_pretrained(base, {str(out)!r}).eval()", "```", ""]
    if any(isinstance(m, BatchNorm) for m in task.modules()):
        # peft saves adapters and modules_to_save, not the base's buffers: statistics that training moved are
        # only in the checkpoint and the merged model (the CLI keeps frozen layers' statistics: train_bn false).
        lines += [
            "The base's BatchNorm running statistics are not in the adapter folder: they are the base's "
            "own unless training updated them (`--finetuning.train_bn true`, or a Trainer without the "
            "FineTuning callback); then only the merged model and the checkpoint have them.",
            "",
        ]
    return lines


def _merged_snippet(task: FineTuneTask, out: Path, names: set[str], whole_task: bool) -> list[str]:
    """Markdown lines: the merged (or plain fine-tuned) model loaded without ``peft``, if one was written."""
    hp = _hparams(task)
    merged = out / "model.safetensors"
    merged_text = (
        "The merged model (the adapters folded into the weights; no `peft` needed):"
        if "adapter_config.json" in names
        else "The fine-tuned model (plain weights):"
    )
    if "merged" in names:
        return [
            merged_text,
            "",
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f"merged = AutoModelForSequenceClassification.from_pretrained({str(out / 'merged')!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(out / 'merged')!r})",
            "```",
            "",
        ]
    if "model.safetensors" in names and _library(task) == "timm" and not whole_task:
        return [
            merged_text,
            "",
            "```python",
            "import timm",
            "from safetensors.torch import load_file",
            "",
            f"merged = timm.create_model({hp.get('model_name')!r}, pretrained=False, "
            f"num_classes={hp.get('num_classes')})",
            f"merged.load_state_dict(load_file({str(merged)!r}))",
            "```",
            "",
        ]
    if "model.safetensors" in names:
        return [
            f"{_code(merged.name)} is the whole task, merged (the adapted module and everything trained "
            "beside it): the recipe loads it with `--model.init_from`.",
            "",
        ]
    return []


def _onnx_snippet(onnx: OnnxWritten, merged: bool) -> list[str]:
    """Markdown lines: ``model.onnx`` run with onnxruntime, its inputs built as the task's spec says; ``merged``:
    it holds adapters folded into the weights (else the plain fine-tuned model)."""
    from peft_lightning.onnx_export import EXPORTERS, OUTPUT

    spec = onnx.spec

    def shape(name: str) -> str:
        axes = spec.dynamic.get(name, {})
        return "[" + ", ".join(axes.get(i, str(n)) for i, n in enumerate(spec.inputs[name].shape)) + "]"

    inputs = ", ".join(f"{_code(n)} {shape(n)} {str(t.dtype).removeprefix('torch.')}" for n, t in spec.inputs.items())
    # isort's order: `import x` lines, then `from x import y`, each by module
    imports = sorted(
        {"import onnxruntime as ort", *spec.imports}, key=lambda line: (line.startswith("from"), line.lower())
    )
    return [
        f"With onnxruntime: {_code(onnx.path.name)} is the {'merged' if merged else 'fine-tuned'} model in fp32, "
        "exported by "
        f"{EXPORTERS[onnx.exporter]}; inputs {inputs}; output {_code(OUTPUT)} [batch, {onnx.outputs}]. "
        f"{spec.preprocessing}",
        "",
        "```python",
        *imports,
        "",
        *spec.snippet,
        "",
        f"session = ort.InferenceSession({str(onnx.path)!r})",
        f"logits = session.run([{OUTPUT!r}], feeds)[0]",
        "```",
        "",
    ]


def _cli_snippet(
    task: FineTuneTask, out: Path, names: set[str], recipe: str | None, whole_task: bool, adapter: bool
) -> list[str]:
    """Markdown lines: the ``predict`` command of peft_lightning for each thing written."""
    name = _recipe_name(task, recipe)
    image = _library(task) == "timm"
    commands = [f"--peft.adapter_path {out}"] if adapter else []
    if "merged" in names:
        commands.append(f"--model.model_name {out / 'merged'}")
    elif "model.safetensors" in names:
        option = "checkpoint_path" if image and not whole_task else "init_from"
        commands.append(f"--model.{option} {out / 'model.safetensors'}")
    if not commands:  # only model.onnx was written: nothing `predict` loads
        return []
    return [
        "With peft_lightning:",
        "",
        "```bash",
        *(f"python -m peft_lightning predict --recipe {name} {c}" for c in commands),
        "```",
        "",
    ]


def load_snippets(
    task: FineTuneTask,
    out: Path,
    files: list[Path],
    recipe: str | None,
    whole_task: bool,
    onnx: OnnxWritten | None = None,
) -> list[str]:
    """Markdown lines: how to load what was written, with plain peft + timm/transformers, onnxruntime (``onnx``:
    the ``model.onnx`` written, if any) and peft_lightning. ``whole_task``: ``model.safetensors`` is the whole task
    (weights beside the adapted module trained too)."""
    names = {p.name for p in files}
    adapter = "adapter_config.json" in names and not whole_task
    return [
        *(_peft_snippet(task, out) if adapter else []),
        *_merged_snippet(task, out, names, whole_task),
        *(_onnx_snippet(onnx, "adapter_config.json" in names) if onnx is not None else []),
        *_cli_snippet(task, out, names, recipe, whole_task, adapter),
    ]
