"""Everything a run prints about itself, formatted in one place: the lines at the start of fit (``RunSummary``,
``fresh_line``), the end-of-run table (``summary_rows`` / ``print_summary``), the one grep-able result line
(``final_line``), and which third-party notices are hidden (``hide_third_party_noise``). ``FineTuning`` prints its own
tables (probe, rounds, groups) when they happen; the summary reads what it kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import Auto
from peft_lightning.engine.batch import global_batch
from peft_lightning.output.run_folder import log_dir

if TYPE_CHECKING:
    from peft_lightning.output.report import RunReport


# --- the start of fit ---
class RunSummary(Callback):
    """Prints, at the start of fit on rank 0, the global batch, precision, strategy and learning rate, and which
    modules start from random weights (``fresh_line``; not on a resume, whose weights have trained).

    Args:
        precision_note: why this precision (the CLI sets it when the recipe's default was ``auto``).
    """

    def __init__(self, precision_note: str | None = None) -> None:
        self.precision_note = precision_note
        self.line = ""

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch = global_batch(trainer)
        note = f" ({self.precision_note})" if self.precision_note else ""
        parts = [
            f"global batch {batch}" if batch else "global batch: unknown (the datamodule has no batch_size)",
            f"precision {trainer.precision}{note}",
            f"strategy {type(trainer.strategy).__name__.removesuffix('Strategy')}",
        ]
        from peft_lightning.tasks.base import FineTuneTask

        if isinstance(pl_module, FineTuneTask):
            base, lr, rule = pl_module.base_lr, pl_module.lr, pl_module.scale_lr
            if rule != "none":
                parts.append(
                    f"lr {lr:.3g} ({rule}-scaled from {base:.3g} at reference batch {pl_module.reference_batch()})"
                )
            else:
                parts.append(f"lr {lr:.3g}")
        self.line = "; ".join(parts)
        rank_zero_info(self.line)
        fresh = fresh_line(pl_module) if trainer.ckpt_path is None else ""
        if fresh:
            rank_zero_info(fresh)


def fresh_line(model: LightningModule, most: int = 6) -> str:
    """``new (randomly initialised): model.classifier``: the modules the task's ``fresh_modules()`` names (those its
    pretrained weights did not hold, e.g. a new head), in this project's words: what transformers' LOAD REPORT says,
    which ``hide_third_party_noise`` hides. Empty when nothing is new or the model cannot say."""
    # Every domain task has `fresh_modules`; a plain LightningModule (a notebook's own) may not.
    fresh_modules = getattr(model, "fresh_modules", None)
    names = list(fresh_modules()) if callable(fresh_modules) else []
    if not names:
        return ""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"new (randomly initialised): {', '.join(names[:most])}{more}"


# --- the end of the run ---
def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,}"


def format_wall(seconds: float) -> str:
    """``4m05s``: whole seconds, rounded once (so 119.7 s is ``2m00s``, not ``1m60s``)."""
    total = round(seconds)
    return f"{total // 60}m{total % 60:02d}s"


def best_validation(trainer: Trainer, report: RunReport | None = None) -> dict[str, Any] | None:
    """The run's best validation score (``metric``, ``value``, ``epoch``, ``step``): the checkpoint callback's,
    which every resume restores and whose checkpoint the test after fit evaluates; else (no checkpointing, or no
    monitored metric) the best ``report`` saw."""
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    if score is not None and getattr(callback, "monitor", None):
        return {
            "metric": callback.monitor,
            "value": float(score),
            "epoch": getattr(callback, "best_epoch", None),
            "step": getattr(callback, "best_step", None),
        }
    return report.best if report is not None else None


Row = tuple[str, str]
"""One line of the end-of-run table: (field, value)."""


def summary_rows(
    trainer: Trainer,
    model: LightningModule,
    *,
    recipe: str,
    report: RunReport | None = None,
    test_metrics: Mapping[str, float] | None = None,
    wall: float | None = None,
    datamodule: Any = None,
) -> list[tuple[str, str]]:
    """(field, value) rows describing a finished run; see ``print_summary``."""
    ft = FineTuning.find(trainer)
    return [
        ("recipe", recipe),
        _model_row(model),
        _parameters_row(model, report),
        *_batch_rows(trainer, datamodule),
        ("precision", str(trainer.precision)),
        _strategy_row(trainer),
        *_schedule_rows(report, ft),
        *_probe_rows(ft),
        *_cache_rows(ft, model),
        *_result_rows(trainer, report, test_metrics, wall),
        *_file_rows(trainer, report),
    ]


def _model_row(model: LightningModule) -> Row:
    from peft_lightning.tasks.base import FineTuneTask

    name = model.hparams.get("model_name")
    adapter = model.adapter_config if isinstance(model, FineTuneTask) else None
    return ("model", f"{name or type(model).__name__}" + (f" + {adapter.method} adapters" if adapter else ""))


def _parameters_row(model: LightningModule, report: RunReport | None) -> Row:
    # After fit, requires_grad is whatever the last phase (or a later evaluation) left: the phases say what trained.
    total = sum(p.numel() for p in model.parameters())
    if report is not None and report.phases:
        peak = max(p["trainable"] for p in report.phases)
        first = report.phases[0]["trainable"]
        trained = _count(peak) if first == peak else f"{_count(first)} at first, up to {_count(peak)}"
    else:
        peak = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained = _count(peak)
    return ("parameters", f"{trained} trained of {_count(total)} ({100 * peak / max(total, 1):.1f}%)")


def _batch_rows(trainer: Trainer, datamodule: Any) -> list[Row]:
    size = global_batch(trainer, datamodule)  # the start-of-fit line's figure and wording (RunSummary)
    return [("effective batch", str(size))] if size is not None else []


def _strategy_row(trainer: Trainer) -> Row:
    accel = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    return (
        "strategy",
        f"{type(trainer.strategy).__name__} ({trainer.num_nodes} node(s) x {trainer.num_devices} {accel})",
    )


def _schedule_rows(report: RunReport | None, ft: Any) -> list[Row]:
    """One row per re-tuning round, else one per phase of the fine-tuning schedule."""
    rounds = (report.rounds if report is not None else []) or (
        ft.rounds.history if ft is not None and ft.rounds else []
    )
    rows = []
    for r in rounds:
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        rows.append(
            (
                f"round {r['round']}",
                f"{r['groups']} groups, {_count(r['trainable'])} trained, best {best}, {r['epochs']} epoch(s)",
            )
        )
    if rounds or report is None:
        return rows
    for i, p in enumerate(report.phases):
        names = ", ".join(p["names"]) if len(p["names"]) <= 3 else f"{p['names'][0]} ... {p['names'][-1]}"
        scale = f", LR x{p['lr_scale']:g}" if p["lr_scale"] != 1.0 else ""
        rows.append(
            (
                f"phase {i}" if ft is None else f"phase {i} ({ft.name})",
                f"from epoch {p['epoch']} (step {p['step']}): {p['groups']}/{p['n_groups']} groups "
                f"({names}), {_count(p['trainable'])} trained{scale}",
            )
        )
    return rows


def _probe_rows(ft: Any) -> list[Row]:
    if ft is None or not ft.probe:
        return []
    probe = ft.probe
    groups = list(probe["rgn"])
    when = f" at step {probe['step']}" if probe.get("step") else ""
    head = f"{probe['batches']} batches{when} in {probe['seconds']:.1f} s"
    signal = probe.get("signal")
    auto = ft.strategy if isinstance(ft.strategy, Auto) else None
    if signal is not None and auto is not None and auto.mode == "depth":
        chosen = probe.get("chosen") or []
        ranked = ", ".join(f"{g} {signal[g]:.2f}" for g in reversed(groups[:-1]) if g in signal)
        resolved = auto.resolves(signal, groups)
        why = (
            f"the top {len(chosen) - 1} of {len(groups) - 1} groups below the head hold "
            f"{100 * auto.coverage:.0f}% of the signal"
            if resolved and auto.coverage < 1
            else f"every group (LP-FT): no signal below the head reaches {auto.floor:g}, the probe cannot "
            "tell the groups apart"
            if not resolved
            else "every group (LP-FT)"
        )
        return [
            ("gradient probe", f"{head}; signal from the top: {ranked}"),
            ("auto chose", f"{', '.join(chosen)}: {why}"),
        ]
    norm = {g: v for g, v in Auto.normalised(probe["rgn"], groups).items() if g != groups[-1]}
    ranked = ", ".join(f"{g} {v:.2f}" for g, v in sorted(norm.items(), key=lambda kv: -kv[1])[:4])
    return [("gradient probe", f"{head}; RGN/max below the head: {ranked}{' ...' if len(norm) > 4 else ''}")]


def _cache_rows(ft: Any, model: LightningModule) -> list[Row]:
    notes = ft.cache_summary(model) if ft is not None else []
    return [("prefix cache" if i == 0 else "", note) for i, note in enumerate(notes)]


def _result_rows(
    trainer: Trainer, report: RunReport | None, test_metrics: Mapping[str, float] | None, wall: float | None
) -> list[Row]:
    """Best validation, test metrics, training throughput and wall time: those the run has."""
    rows = []
    b = best_validation(trainer, report)
    if b is not None:
        when = f" (epoch {b['epoch']}, step {b['step']})" if b.get("epoch") is not None else ""
        rows.append(("best validation", f"{b['metric']} {b['value']:.4f}{when}"))
    if test_metrics:
        rows.append(("test", "  ".join(f"{k} {v:.4f}" for k, v in sorted(test_metrics.items()))))
    if report is not None and report.samples_per_second:
        rows.append(
            (
                "throughput",
                f"{report.samples_per_second:,.1f} samples/s training "
                f"({report.train_samples:,} samples in {report.train_seconds:.0f} s)",
            )
        )
    if wall is not None:
        rows.append(("wall time", format_wall(wall)))
    return rows


def _file_rows(trainer: Trainer, report: RunReport | None) -> list[Row]:
    """Where the run's files are: the best checkpoint, the curves and the run folder."""
    rows = []
    checkpoint = trainer.checkpoint_callback
    ckpt = (checkpoint.best_model_path if checkpoint is not None else "") or ""
    if ckpt:
        rows.append(("best checkpoint", ckpt))
    if report is not None and report.plot_path is not None:
        rows.append(("curves", str(report.plot_path)))
    folder = log_dir(trainer)
    if folder:
        rows.append(("run folder", folder))
    return rows


def print_summary(rows: list[tuple[str, str]], title: str = "run summary") -> None:
    """The rows as a two-column table (rich; plain text when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field, value in rows:
        table.add_row(field, value)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for paths, no wrapping at 80 columns
        console = Console(width=140)
    console.print(table)


def final_line(
    recipe: str,
    test_metrics: Mapping[str, float],
    best: Mapping[str, Any] | None,
    wall: float,
    best_checkpoint: str = "",
    interrupted: bool = False,
) -> str:
    """The one grep-able line printed before the end-of-run table (CI logs, tests): the test metrics (losses left
    out), else the best validation score, the wall time and which weights they are from.

    Example:
        >>> final_line("vit_cifar", {"test/acc": 0.91, "test/loss": 0.3}, None, 65.2)
        'vit_cifar: test/acc 0.9100  wall 1m05s  (final weights)'
    """
    shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(test_metrics.items()) if not k.endswith("loss"))
    if not shown and best is not None:
        shown = f"best {best['metric']} {best['value']:.4f}"
    stopped = "  (interrupted)" if interrupted else ""
    weights = "best checkpoint " + best_checkpoint if best_checkpoint else "final weights"
    return f"{recipe}: {shown}  wall {format_wall(wall)}  ({weights}){stopped}"


THIRD_PARTY_NOISE = (
    r"💡 Tip: ",  # Lightning's advertisements for its cloud loggers and model registry
    # transformers' table of the keys a checkpoint lacked (a new head: MISSING), held in vain or held at another
    # size: the start of fit names the new modules in one line (`fresh_line`).
    r".*LOAD REPORT",
    r"Loading `train_dataloader` to estimate number of stepping batches",
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # RunReport sets it from the data
    r"Precision .* is not supported by the model summary",  # the size estimate is in fp32 anyway
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree on a newer torch
)
"""Messages of the libraries under a run that tell a user of this project nothing they can act on; the CLI hides
them unless ``PEFT_LIGHTNING_DEBUG=1`` (``hide_third_party_noise``)."""


class _Hide(logging.Filter):
    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def hide_third_party_noise() -> None:
    """Hide ``THIRD_PARTY_NOISE`` (warnings, and Lightning's and transformers' log records), the progress bars
    ``datasets`` draws while it converts and caches data, and transformers' "Loading weights" bar; idempotent."""
    import os
    import sys
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging  # no model code: transformers imports lazily

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # its own bars: "Loading weights" at every `from_pretrained`
    if downloads_shown:  # ... and the hub's, switched with them: a first download (minutes) keeps its bar
        enable_progress_bars()
    transformers_logging.get_logger()  # transformers attaches its handler now, for the filter below
    for pattern in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _Hide) for f in handler.filters):
                handler.addFilter(_Hide(THIRD_PARTY_NOISE))
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    else:  # read by datasets when it is imported
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
