"""The model card (``README.md``) that ``export`` writes beside the adapter: what was trained, on what, how well, and
how to load it, from the task, its checkpoint and the run folder the checkpoint sits in. It replaces peft's own
``save_pretrained`` card, a template of "[More Information Needed]".

Every field comes from something recorded: the task's hyper-parameters and adapter config, the checkpoint's epoch,
step, class names and callback states (``ModelCheckpoint``'s monitor and best score, ``RunReport``'s best
validation), the datamodule's hyper-parameters, and the test metrics the run logged to its ``metrics.csv``. What is
not recorded is left out, not guessed. One function writes each section; the "How to load" section's code snippets
are ``card_snippets.py``'s. What belongs to a domain (the model's library, where its weights came from, its hub id)
the task says (``FineTuneTask.library``, ``weights_source``, ``hub_base_model``); this module asks no task which
domain it is.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from peft_lightning.adapters import ADAPTER_METHODS, find
from peft_lightning.output.card_snippets import load_snippets

if TYPE_CHECKING:
    from peft_lightning.adapters import AdapterConfig
    from peft_lightning.model_files.onnx_export import OnnxWritten
    from peft_lightning.tasks.base import FineTuneTask


def _hparams(obj: Any) -> dict[str, Any]:
    hp = getattr(obj, "hparams", None)
    return dict(hp) if isinstance(hp, Mapping) else {}


def _code(value: Any) -> str:
    return f"`{value}`"


def _metric_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def _run_folder(ckpt_path: Path) -> Path | None:
    """The run folder holding ``metrics.csv``: the checkpoint's own folder (hpc_ckpt) or the one above
    ``checkpoints/``."""
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / "metrics.csv").is_file():
            return folder
    return None


def _checkpoint_state(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The first ModelCheckpoint state (monitor, best score and path) among the checkpoint's callback states."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and state.get("monitor") and "best_model_score" in state:
            return dict(state)
    return {}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def evaluation(ckpt: Mapping[str, Any], ckpt_path: Path, monitor_mode: str | None) -> list[str]:
    """Markdown lines: the validation score this checkpoint's run recorded and the run's test metrics."""
    lines: list[str] = []
    state = _checkpoint_state(ckpt)
    report = (ckpt.get("callbacks") or {}).get("RunReport") or {}
    best = report.get("best") if isinstance(report, Mapping) else None
    monitor = state.get("monitor") or (best or {}).get("metric")
    score = _number(state.get("best_model_score"))
    if score is None and best and best.get("metric") == monitor:
        score = _number(best.get("value"))
    step = ckpt.get("global_step")
    is_best = False
    if monitor and score is not None:
        best_path = Path(str(state.get("best_model_path") or ""))
        is_best = bool(best_path.name) and best_path.name == ckpt_path.name
        where = ""
        if best and best.get("metric") == monitor:
            is_best = is_best or best.get("step") == step
            where = f", reached at epoch {best.get('epoch')}, step {best.get('step')}"
        file = f" ({_code(best_path.name)})" if best_path.name else ""
        direction = {"max": "higher", "min": "lower"}.get(monitor_mode or state.get("mode") or "", "")
        mine = (
            "this checkpoint holds those weights"
            if is_best
            else f"this checkpoint is from step {step}, not the best one"
        )
        lines.append(
            f"- validation {_code(monitor)}{f' ({direction} is better)' if direction else ''}: "
            f"**{score:.4f}**, the run's best when this checkpoint was written{where}{file}; {mine}."
        )
    folder = _run_folder(ckpt_path)
    tested = {}
    for row in _metric_rows(folder / "metrics.csv") if folder else []:
        values = {k: v for k, v in row.items() if k and k.startswith("test/") and v not in ("", None)}
        if values:
            tested = values
    if tested:
        shown = ", ".join(f"{_code(k)} {_number(v):.4f}" for k, v in sorted(tested.items()) if _number(v) is not None)
        whose = "this checkpoint" if is_best else "the run's best checkpoint, not necessarily this one"
        lines.append(f"- test: {shown} (the run's test after fit, of {whose}; from {_code(folder / 'metrics.csv')}).")
    if not lines:
        lines.append("- no validation or test metrics were recorded with this checkpoint.")
    return lines


def _count(n: int) -> str:
    return f"{n:,}"


def parameters(task: FineTuneTask, peft_model: nn.Module | None, phases: list[Mapping[str, Any]] | None = None) -> str:
    """Trainable parameters (adapters and fully trained modules) of all, the frozen head copy peft keeps excluded.
    Without adapters, the most that trained at once in the run's fine-tuning ``phases`` (RunReport), if recorded."""
    params = {n: p for n, p in task.named_parameters() if ".original_module." not in n}
    total = sum(p.numel() for p in params.values())
    names = task.trainable_parameter_names()
    trainable = set(params) if names is None else set(names) & set(params)
    n = sum(params[k].numel() for k in trainable)
    if peft_model is None and phases:
        n = max(int(p.get("trainable", 0)) for p in phases) or n
    text = f"{_count(n)} of {_count(total)} ({100 * n / max(total, 1):.2f}%)"
    if peft_model is not None:
        prefix = peft_model.base_model.prefix  # "lora_", "ia3_" ...: peft's adapter parameter names
        adapters = sum(params[k].numel() for k in trainable if prefix in k)
        text += f": {_count(adapters)} in the adapters, {_count(n - adapters)} in fully trained modules"
    return text


def adapter_rows(
    config: AdapterConfig | None, peft_model: nn.Module | None, default_targets: Any
) -> list[tuple[str, str]]:
    """(option, value) rows of the adapter: the method's own options and the modules peft actually wrapped."""
    method = config.method if config is not None else "none"
    row = ADAPTER_METHODS.get(method)
    rows = [
        (
            "method",
            f"{row.title} ({_code('peft')} {method})"
            if row is not None
            else "none: the weights themselves were fine-tuned, no adapters",
        )
    ]
    if row is not None and row.ranked:
        rows += [
            ("r", str(config.r)),
            ("alpha", f"{config.alpha:g} (updates scaled by alpha / r = {config.alpha / config.r:g})"),
        ]
        rows.append(("dropout", f"{config.dropout:g}"))
    if peft_model is not None:
        pc = peft_model.peft_config[peft_model.active_adapter]
        targets = sorted(pc.target_modules or [])
        shown = ", ".join(_code(t) for t in targets[:6]) + (f" and {len(targets) - 6} more" if len(targets) > 6 else "")
        asked = (
            f"from {', '.join(_code(p) for p in config.target_modules)}"
            if config.target_modules
            else f"the recipe's default targets {_code(default_targets)}"
        )
        rows.append(("target modules", f"{len(targets)} modules ({asked}): {shown}"))
        # The modules peft actually copied to train in full: its config may list names absent here (SEQ_CLS adds
        # `classifier` and `score` to whatever was asked).
        full = sorted(
            n.removeprefix("base_model.model.")
            for n, m in peft_model.named_modules()
            if type(m).__name__ == "ModulesToSaveWrapper"
        )
        rows.append(("trained in full", ", ".join(_code(m) for m in full) or "none"))
    if config is not None and config.adapter_path:
        rows.append(("started from", f"the adapter folder {_code(config.adapter_path)}"))
    return rows


def _model_name(task: FineTuneTask) -> str:
    return _hparams(task).get("model_name") or type(task).__name__


def _recipe_name(task: FineTuneTask, recipe: str | None) -> str:
    cls = type(task)
    return recipe or f"{cls.__module__}:{cls.__qualname__}"


def _class_names(ckpt: Mapping[str, Any]) -> list[str]:
    """The class names saved with the checkpoint, else the datamodule's ``label_names``."""
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return list(ckpt.get("class_names") or []) or list(data.get("label_names") or [])


def _outputs(task: FineTuneTask) -> Any:
    hp = _hparams(task)
    return hp.get("num_classes") or hp.get("num_labels")


def _front(task: FineTuneTask, name: str, peft_model: nn.Module | None, onnx: bool) -> list[str]:
    """Markdown lines: the YAML metadata the hub reads, the title and what the recipe is."""
    cls = type(task)
    config = task.adapter_config
    method = config.method if config is not None else "none"
    model_name = _model_name(task)
    title = (
        f"{name}: {ADAPTER_METHODS[method].title if method in ADAPTER_METHODS else method} adapter for {model_name}"
        if peft_model is not None
        else f"{name}: fine-tuned {model_name}"
    )
    meta = [
        "---",
        "library_name: peft" if peft_model is not None else "library_name: pytorch",
        "tags:",
        "- peft_lightning",
        f"- {name}",
    ]
    if method != "none":
        meta.append(f"- {method}")
    if onnx:
        meta.append("- onnx")
    hub_id = task.hub_base_model()
    if hub_id:
        meta.append(f"base_model: {hub_id}")  # the hub links the card to its base
    meta.append("---")
    description = cls.description
    return [
        *meta,
        "",
        f"# {title}",
        "",
        f"Fine-tuned with the peft_lightning recipe {_code(name)} ({_code(cls.__module__ + '.' + cls.__qualname__)}"
        + (f"; its defaults: {description}" if description else "")
        + "). This run's own settings follow.",
        "",
    ]


def _base_section(task: FineTuneTask, class_names: list[str]) -> list[str]:
    """Markdown lines: the base model, where its weights came from, and the new head."""
    library = task.library
    lines = [
        "## Base model",
        "",
        f"- {library + ' ' if library else ''}{_code(_model_name(task))}, weights from {task.weights_source()}",
    ]
    n_out = _outputs(task)
    if n_out:
        named = f": {', '.join(_code(c) for c in class_names)}" if class_names and len(class_names) == n_out else ""
        lines.append(f"- a new head of {n_out} outputs, trained in full{named}")
    return [*lines, ""]


def _data_section(task: FineTuneTask, ckpt: Mapping[str, Any], class_names: list[str]) -> list[str]:
    """Markdown lines: the datamodule's recorded arguments (dataset, sizes, split), and the classes."""
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    lines = ["## Data", ""]
    if data.get("dataset"):
        lines.append(
            f"- dataset (`--data.dataset`): {_code(data['dataset'])}"
            + (f", configuration {_code(data['config_name'])}" if data.get("config_name") else "")
        )
        for key, what in (
            ("image_size", "image size"),
            ("max_length", "tokens at most"),
            ("val_fraction", "validation fraction (carved from train where there is no validation split)"),
            ("max_train_samples", "training samples at most"),
        ):
            if data.get(key) is not None:
                lines.append(f"- {what}: {data[key]}")
    else:
        lines.append("- not recorded with this checkpoint (the datamodule's arguments are saved by a run of the CLI)")
    if class_names and not _outputs(task):
        lines.append(f"- classes: {', '.join(_code(c) for c in class_names)}")
    return [*lines, ""]


def _adapter_section(task: FineTuneTask, peft_model: nn.Module | None, ckpt: Mapping[str, Any]) -> list[str]:
    """Markdown lines: a table of the adapter's options (or of none) and the trainable parameters."""
    lines = ["## Adapter" if peft_model is not None else "## Parameters", "", "| option | value |", "|---|---|"]
    rows = adapter_rows(task.adapter_config, peft_model, task.default_adapter_targets)
    lines += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in rows]  # a | in a regex would end the cell
    report = (ckpt.get("callbacks") or {}).get("RunReport")
    phases = report.get("phases") if isinstance(report, Mapping) else None
    return [*lines, f"| trainable parameters | {parameters(task, peft_model, phases)} |", ""]


def _training_section(task: FineTuneTask, ckpt: Mapping[str, Any], ckpt_path: Path | None) -> list[str]:
    """Markdown lines: the checkpoint's epoch and step, the run's config file, and the optimizer settings."""
    hp = _hparams(task)
    lines = ["## Training", ""]
    if ckpt_path is not None:
        lines.append(
            f"- checkpoint {_code(ckpt_path.name)}: epoch {ckpt.get('epoch')}, global step "
            f"{ckpt.get('global_step')} ({_code(ckpt_path)})"
        )
        folder = _run_folder(ckpt_path)
        if folder is not None and (folder / "config.yaml").is_file():
            lines.append(f"- every setting of the run: {_code(folder / 'config.yaml')} (`fit -c` reruns it)")
    optim = [f"{k} {hp[k]}" for k in ("optimizer", "lr", "weight_decay", "scheduler", "warmup") if k in hp]
    if optim:
        lines.append(f"- {', '.join(optim)}")
    return [*lines, ""]


def _evaluation_section(task: FineTuneTask, ckpt: Mapping[str, Any], ckpt_path: Path | None) -> list[str]:
    """Markdown lines: the metrics recorded with the checkpoint (see ``evaluation``)."""
    shown = (
        evaluation(ckpt, ckpt_path, type(task).monitor_mode)
        if ckpt_path is not None
        else ["- exported from a model in memory: no checkpoint, no recorded metrics."]
    )
    return ["## Evaluation", "", *shown, ""]


def model_card(
    task: FineTuneTask,
    out: Path,
    files: list[Path],
    *,
    recipe: str | None = None,
    ckpt: Mapping[str, Any] | None = None,
    ckpt_path: Path | None = None,
    merged: Path | None = None,
    whole_task: bool = False,
    onnx: OnnxWritten | None = None,
) -> str:
    """The Markdown model card of an export of ``task`` (written to ``files`` in ``out``; ``merged``,
    ``whole_task`` and ``onnx``, the ``model.onnx`` written if any: see ``load_snippets``), from the checkpoint
    ``ckpt`` read from ``ckpt_path`` when there is one."""
    ckpt = ckpt or {}
    found = find(task)
    peft_model = found[1] if found is not None else None
    class_names = _class_names(ckpt)
    name = _recipe_name(task, recipe)
    lines = [
        *_front(task, name, peft_model, onnx is not None),
        *_base_section(task, class_names),
        *_data_section(task, ckpt, class_names),
        *_adapter_section(task, peft_model, ckpt),
        *_training_section(task, ckpt, ckpt_path),
        *_evaluation_section(task, ckpt, ckpt_path),
        "## How to load",
        "",
        *load_snippets(task, out, files, name, merged=merged, whole_task=whole_task, onnx=onnx),
    ]
    return "\n".join(lines).rstrip() + "\n"
