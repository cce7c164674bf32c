"""The model card's "How to load" section (``card.py``): code that loads what ``export`` wrote, as written.

One snippet per way to use the export: plain ``peft`` on the base model rebuilt as in training, the merged model
without ``peft``, ``model.onnx`` with onnxruntime, and the ``predict`` command of peft_lightning. What belongs to a
domain the task says: how its base is built (``base_snippet``), how its merged model loads (``merged_snippet``,
``merged_option``) and its ONNX inputs and preprocessing (``onnx_spec``); this module writes the Markdown around
them. Names and paths are the real ones; the tests run each code block as it stands in the card.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from peft_lightning.internals import BatchNorm
from peft_lightning.model_files.onnx_export import EXPORTERS, OUTPUT

if TYPE_CHECKING:
    from peft_lightning.model_files.onnx_export import OnnxWritten
    from peft_lightning.tasks.base import FineTuneTask


def _python(imports: Iterable[str], code: list[str]) -> list[str]:
    """Markdown lines: a Python block of ``imports`` in isort's order (``import x`` lines, then ``from x import y``,
    each by module), a blank line and ``code``."""
    ordered = sorted(set(imports), key=lambda line: (line.startswith("from"), line.lower()))
    return ["```python", *ordered, "", *code, "```", ""]


def _peft_snippet(task: FineTuneTask, out: Path) -> list[str]:
    """Markdown lines: the adapter folder loaded with plain ``peft`` onto the base rebuilt as in training."""
    base = task.base_snippet()
    lines = [
        "With `peft` (the base model rebuilt as in training, then the adapter and trained head on it):",
        "",
        *_python(
            ["from peft import PeftModel", *base.imports],
            [*base.code, f"model = PeftModel.from_pretrained(base, {str(out)!r}).eval()"],
        ),
    ]
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


def _merged_snippet(task: FineTuneTask, merged: Path, adapters: bool, whole_task: bool) -> list[str]:
    """Markdown lines: the merged (with ``adapters``; else the plain fine-tuned) model at ``merged`` loaded without
    ``peft``, or where no library alone loads it (``whole_task``: the whole task's weights), the recipe's option."""
    snippet = None if whole_task else task.merged_snippet(merged)
    if snippet is None:
        return [
            f"`{merged.name}` is the whole task, merged (the adapted module and everything trained beside it): the "
            f"recipe loads it with `{task.merged_option(whole_task)}`.",
            "",
        ]
    title = (
        "The merged model (the adapters folded into the weights; no `peft` needed):"
        if adapters
        else "The fine-tuned model (plain weights):"
    )
    return [title, "", *_python(snippet.imports, snippet.code)]


def _onnx_snippet(onnx: OnnxWritten, merged: bool) -> list[str]:
    """Markdown lines: ``model.onnx`` run with onnxruntime, its inputs built as the task's spec says; ``merged``:
    it holds adapters folded into the weights (else the plain fine-tuned model)."""
    spec = onnx.spec

    def shape(name: str) -> str:
        axes = spec.dynamic.get(name, {})
        return "[" + ", ".join(axes.get(i, str(n)) for i, n in enumerate(spec.inputs[name].shape)) + "]"

    inputs = ", ".join(f"`{n}` {shape(n)} {str(t.dtype).removeprefix('torch.')}" for n, t in spec.inputs.items())
    return [
        f"With onnxruntime: `{onnx.path.name}` is the {'merged' if merged else 'fine-tuned'} model in fp32, "
        f"exported by {EXPORTERS[onnx.exporter]}; inputs {inputs}; output `{OUTPUT}` {onnx.output_shape}. "
        f"{spec.preprocessing}",
        "",
        *_python(
            ["import onnxruntime as ort", *spec.imports],
            [
                *spec.snippet,
                "",
                f"session = ort.InferenceSession({str(onnx.path)!r})",
                f"logits = session.run([{OUTPUT!r}], feeds)[0]",
            ],
        ),
    ]


def _cli_snippet(
    task: FineTuneTask, out: Path, name: str, merged: Path | None, whole_task: bool, adapter: bool
) -> list[str]:
    """Markdown lines: the ``predict`` command of peft_lightning for each thing written."""
    commands = [f"--peft.adapter_path {out}"] if adapter else []
    if merged is not None:
        commands.append(f"{task.merged_option(whole_task)} {merged}")
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
    name: str,
    *,
    merged: Path | None = None,
    whole_task: bool = False,
    onnx: OnnxWritten | None = None,
) -> list[str]:
    """Markdown lines: how to load what was written in ``out`` (``files``) with plain peft and the model's library,
    onnxruntime (``onnx``: the ``model.onnx`` written, if any) and peft_lightning (the recipe ``name``). ``merged``:
    the merged model written (``FineTuneTask.export_merged``), or ``model.safetensors`` holding the whole task
    (``whole_task``: weights beside the adapted module trained too)."""
    adapters = "adapter_config.json" in {p.name for p in files}
    adapter = adapters and not whole_task
    return [
        *(_peft_snippet(task, out) if adapter else []),
        *(_merged_snippet(task, merged, adapters, whole_task) if merged is not None else []),
        *(_onnx_snippet(onnx, adapters) if onnx is not None else []),
        *_cli_snippet(task, out, name, merged, whole_task, adapter),
    ]
