"""``export``: a trained task's adapter in the standard ``peft`` format, its merged model, and a model card.

The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is what ``PeftModel.from_pretrained``
loads; ``merge`` also writes the model with the adapters folded into its weights (``merge_and_unload``), loadable
without ``peft``, in its library's format (the task's ``export_merged``); ``onnx`` writes that merged model as
``model.onnx`` (``onnx_export.py``, the task's ``onnx_spec``); ``README.md`` is the model card of ``card.py``.
``load_task`` restores a recipe's task from a checkpoint to export it (the ``export`` command). The adapters
themselves are ``adapters.py``'s. See docs/adapters.md.

Example:
    >>> task = load_task(get_recipe("vit_cifar"), "runs/.../best.ckpt")  # doctest: +SKIP
    >>> export(task, "vit_lora", merge=True, onnx=True, recipe="vit_cifar")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from peft_lightning.adapters import find
from peft_lightning.errors import UsageError
from peft_lightning.model_files.checkpoints import read_checkpoint
from peft_lightning.model_files.onnx_export import OnnxSpec, require_onnx, write_onnx
from peft_lightning.output.card import model_card


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A merged copy of ``model`` (a ``PeftModel``): the adapters folded into the base weights and each head the
    trained copy, as plain modules. The heads are swapped in first: peft 0.21's generic unload (IA3's) assigns a
    ``weight`` to every unloaded module and fails on heads that are containers (BERT's pooler, RoBERTa's
    classifier)."""
    from peft.utils import ModulesToSaveWrapper

    model = copy.deepcopy(model)
    inner = model.get_base_model()
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            trained = module.modules_to_save[module.active_adapter]
            setattr(inner.get_submodule(parent) if parent else inner, child, trained)
    return model.merge_and_unload()


def _trained_outside(task: nn.Module, found: tuple[str, nn.Module] | None, merge: bool, onnx: bool) -> list[str]:
    """The trainable parameters outside the adapted module (a recommender's ID embeddings and towers), sorted;
    stops with one line when what ``export`` would write without ``merge`` is not the model."""
    if found is None and not merge and not onnx:
        raise UsageError(
            "this checkpoint has no adapters (trained with --peft.method none): pass --merge to export its full "
            "weights (or --onnx for model.onnx)"
        )
    outside = []
    if found is not None:
        trainable = task.trainable_parameter_names() or set()
        outside = sorted(n for n in trainable if not n.startswith(found[0]))
        if outside and not merge:
            raise UsageError(
                f"the adapters are only part of what this model trained (also {outside[0]} and "
                f"{len(outside) - 1} more): pass --merge to export the whole merged model"
            )
    return outside


def export(
    task: nn.Module,
    out: str | Path,
    merge: bool = False,
    *,
    onnx: bool = False,
    recipe: str | None = None,
    ckpt_path: str | Path | None = None,
) -> list[Path]:
    """Write the task's adapter in the standard ``peft`` format (``adapter_config.json`` and
    ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, out)`` loads) and, with ``merge``, the
    merged full model as the task's ``export_merged`` writes it (``merged/`` with ``save_pretrained`` and the
    tokenizer for a transformers task, else a safetensors state_dict, ``model.safetensors``). A task without adapters can only be exported merged (its plain
    weights). Where weights outside the adapted module train too (a recommender's ID embeddings and towers), the
    adapter folder alone is not the model: ``merge`` is required and ``model.safetensors`` holds the whole task
    (what ``--model.init_from`` loads).

    ``onnx`` also writes ``model.onnx``: the merged model (or the plain one, without adapters) in eval mode and
    fp32, with the task's named inputs and dynamic batch (and sequence) axes and one output, ``logits``
    (``task.onnx_spec``; ``onnx_export.write_onnx``). A task that cannot be exported, or missing ``onnx`` packages,
    stop with one line before anything is written.

    ``README.md`` is a model card (``peft_lightning/output/card.py``) in place of peft's empty template: the recipe (its
    name, ``recipe``), base model and its weights, data, adapter options, trainable parameters, the metrics recorded
    with the checkpoint at ``ckpt_path`` (the file the task was loaded from, if any) and how to load the export."""
    out = Path(out)
    ckpt = None
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
    found = find(task)
    merged = _merged(task, found) if onnx else None
    spec = _onnx_spec(task, merged, ckpt, copy_model=merge) if merged is not None else None  # refuses first
    outside = _trained_outside(task, found, merge, onnx)
    if merge and merged is None:
        merged = _merged(task, found)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    onnx_written = None
    if spec is not None:  # first: an exporter's refusal leaves nothing half-written
        onnx_written = write_onnx(spec, out / "model.onnx")
    if found is not None:
        found[1].save_pretrained(str(out))
        written += [out / "adapter_config.json", out / "adapter_model.safetensors"]
    merged_path = None
    if merge and merged is not None:
        prefix = found[0] if found is not None else "model."
        merged_path = _write_merged(task, merged, prefix, out, whole=bool(outside))
        written.append(merged_path)
    if onnx_written is not None:
        written.append(onnx_written.path)
    # After the weights: peft's save_pretrained wrote its template card, which this one replaces.
    card = model_card(
        task,
        out,
        written,
        recipe=recipe,
        ckpt=ckpt,
        ckpt_path=Path(ckpt_path) if ckpt_path is not None else None,
        merged=merged_path,
        whole_task=bool(outside),
        onnx=onnx_written,
    )
    (out / "README.md").write_text(card)
    return [*written, out / "README.md"]


def _merged(task: nn.Module, found: tuple[str, nn.Module] | None) -> nn.Module:
    """A copy of the task's model with its adapters merged in (see ``merge_and_unload``), or of the plain model."""
    return merge_and_unload(found[1]) if found is not None else copy.deepcopy(getattr(task, "model", task))


def _onnx_spec(task: nn.Module, merged: nn.Module, ckpt: Mapping[str, Any] | None, copy_model: bool) -> OnnxSpec:
    """The task's ONNX spec of ``merged`` (see ``FineTuneTask.onnx_spec``) in eval mode and fp32 (a copy of it
    with ``copy_model``: the weights ``merge`` writes keep their dtype); stops with one line when the task cannot
    be exported or the ``onnx`` packages are missing."""
    if not hasattr(task, "onnx_spec"):
        raise UsageError(f"{type(task).__name__} cannot be exported to ONNX: export without --onnx")
    data = dict((ckpt or {}).get("datamodule_hyper_parameters") or {})
    spec = task.onnx_spec((copy.deepcopy(merged) if copy_model else merged).float().eval(), data)
    require_onnx()
    return spec


def _write_merged(task: nn.Module, merged: nn.Module, prefix: str, out: Path, whole: bool) -> Path:
    """Write the merged model (see ``export``) and return its path: the whole task (``whole``) with the adapted
    module merged in place, which the task itself loads (its ``merged_option``), else as the task writes its own
    model (``export_merged``)."""
    if not whole:
        return task.export_merged(merged, out)
    from safetensors.torch import save_file

    state = {k: v for k, v in task.state_dict().items() if not k.startswith(prefix)}
    state.update({prefix + k: v for k, v in merged.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return out / "model.safetensors"


def load_task(recipe: type, ckpt_path: str | Path) -> Any:
    """The recipe's task restored from a Lightning checkpoint (adapter-only or full), in eval mode, on the CPU."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass the path of a .ckpt file from fit")
    try:
        task = recipe.load_from_checkpoint(str(path), map_location="cpu")
    except UsageError:
        raise
    except Exception as err:  # unpickling a damaged file raises many types; all mean "cannot use this file"
        raise UsageError(
            f"cannot load checkpoint {str(path)!r} into recipe {recipe.__name__} "
            f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}): "
            "is it corrupt, or from another recipe?"
        ) from None
    return task.eval()
