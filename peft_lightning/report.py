"""What a run leaves behind and shows: its folder, the fine-tuning phase in the progress bar, the plots, and the
summary printed at the end.

- ``run_dir`` / ``run_loggers``: one folder per run, ``<root>/<recipe>/<YYYYmmdd-HHMMSS>`` (under a launcher that
  restarts jobs, ``<root>/<recipe>/slurm-<job>-<hash>``, continued by the restart), holding the resolved
  ``config.yaml`` (LightningCLI's SaveConfigCallback), ``metrics.csv`` (CSVLogger), ``tensorboard/`` (when
  tensorboard is installed), ``checkpoints/`` (ModelCheckpoint resolves its folder from the first logger) and
  ``curves.png``.
- ``RunReport``: a callback that records which layer groups train from which step (and logs it as
  ``finetune/groups`` / ``finetune/round``, so TensorBoard and the plots mark the boundaries), the training
  throughput and the best validation metric, and writes the curves at the end of fit.
- ``PhaseProgressBar``: Lightning's ``RichProgressBar`` with the current phase beside the metrics.
- ``summary_rows`` / ``print_summary``: the end-of-run table.

Example (in a notebook, the same pieces the CLI wires):
    >>> from lightning.pytorch import Trainer  # doctest: +SKIP
    >>> folder = run_dir("runs", "effnet_fashion")  # doctest: +SKIP
    >>> report = RunReport()  # doctest: +SKIP
    >>> trainer = Trainer(default_root_dir=folder, logger=run_loggers(folder),
    ...                   callbacks=[FineTuning(), report, PhaseProgressBar()])  # doctest: +SKIP
    >>> trainer.fit(model, data)  # doctest: +SKIP
    >>> print_summary(summary_rows(trainer, model, recipe="effnet_fashion", report=report, wall=report.wall))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


def run_dir(root: str | Path, recipe: str, now: float | None = None, key: str | None = None) -> Path:
    """A new folder name ``root/<recipe>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` ... if taken); not created here.

    ``key`` (e.g. ``slurm-4242-1a2b3c``, from the launcher: see ``cli.run_key``) names the folder instead, taken or
    not: a requeued job must find its own folder again (Lightning looks for ``hpc_ckpt_N.ckpt`` in it), and every
    rank and node must agree on it. A recipe given as ``package.module:Class`` becomes ``package.module_Class``.
    Without a key, every process computes its own name, but only rank 0 writes, and Lightning broadcasts rank 0's
    checkpoint and log folders.
    """
    slug = re.sub(r"[^\w.-]+", "_", recipe).strip("_.") or "run"
    if key is not None:
        return Path(root) / slug / (re.sub(r"[^\w.-]+", "_", key).strip("_.") or "run")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path, n = Path(root) / slug / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / slug / f"{stamp}-{n}"
    return path


class _ContinuedMetrics(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted (Lightning
    deletes it when the folder is not empty): a requeued or restarted run appends to its own file. Rows logged
    between the checkpoint it resumed from and the stop appear twice, with the same steps; a checkpoint written in
    ``on_train_batch_end`` (Lightning's hpc one, on SIGUSR1) precedes that step's logging, which no start then logs."""

    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            # The header's keys: a new key later rewrites the file with the wider header, keeping every row.
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the folder's ``metrics.csv`` if there is one (see ``_ContinuedMetrics``)."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetrics(log_dir=self.log_dir)
        return self._experiment


def run_loggers(folder: str | Path) -> list[Logger]:
    """CSV metrics in ``folder/metrics.csv`` and, when tensorboard is installed, TensorBoard events in
    ``folder/tensorboard``. The CSV logger comes first: ``trainer.log_dir`` and the checkpoints resolve to
    ``folder`` itself (empty name and version: no ``version_N`` level). A folder used again (a requeued job)
    continues both: rows appended to ``metrics.csv``, a new events file beside the old ones."""
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(folder), name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(
            TensorBoardLogger(save_dir=str(folder), name="", version="", sub_dir="tensorboard", default_hp_metric=False)
        )
    return loggers


def _batch_size(batch: Any) -> int | None:
    """Samples in a batch: the length of the first tensor in it (dicts and tuples searched in order)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.ndim else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    if isinstance(batch, str):
        return None
    for value in values:
        n = _batch_size(value)
        if n is not None:
            return n
    return None


def _finetuning(trainer: Trainer) -> Any:
    # By name, not by import: the report must not depend on which fine-tuning callback (if any) drives the run.
    return next((c for c in trainer.callbacks if type(c).__name__ == "FineTuning"), None)


class RunReport(Callback):
    """Records what the summary and the plots need, and writes ``curves.png`` at the end of fit.

    - **Phases**: at the first batch of every epoch (after the fine-tuning callback has applied the epoch's
      schedule), which layer groups have trainable parameters; a change starts a new phase, logged to every logger
      as ``finetune/groups`` (and ``finetune/round`` for ``retune``) at that step.
    - **Throughput**: training samples per second over the training loop, validation excluded, all processes.
    - **Best validation metric**: the task's ``monitor`` (``mode`` from ``monitor_mode``), with its epoch and step;
      the summary shows the checkpoint callback's best instead when there is one (``best_validation``).

    Args:
        plot: write ``curves.png`` next to ``metrics.csv`` at the end of fit (needs a ``CSVLogger``).
    """

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.phases: list[dict[str, Any]] = []
        self.train_samples = 0
        self.train_seconds = 0.0
        self.best: dict[str, Any] | None = None
        self.plot_path: Path | None = None
        self.rounds: list[dict[str, Any]] = []  # the retune round table, as fit left it
        self.started = time.perf_counter()
        self._fit_done = False
        self._epoch_started: float | None = None
        self._val_started: float | None = None
        self._val_seconds = 0.0

    @property
    def wall(self) -> float:
        """Seconds since this callback was created."""
        return time.perf_counter() - self.started

    # --- phases ---
    def current_phase(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        params = dict(pl_module.named_parameters())
        groups = pl_module.layer_groups() if hasattr(pl_module, "layer_groups") else [("all", list(params))]
        training = [name for name, names in groups if any(params[n].requires_grad for n in names if n in params)]
        ft = _finetuning(trainer)
        return {
            "groups": len(training),
            "n_groups": len(groups),
            "names": training,
            "round": ft.round if ft is not None and ft.uses_rounds else None,
            "lr_scale": float(getattr(pl_module, "phase_lr_scale", 1.0)),
            "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
            "total": sum(p.numel() for p in params.values()),
        }

    def phase_text(self) -> str:
        """The current phase in a few words, e.g. ``4/7 groups`` or ``round 1, 5/7 groups``."""
        if not self.phases:
            return ""
        p = self.phases[-1]
        text = f"{p['groups']}/{p['n_groups']} groups"
        return f"round {p['round']}, {text}" if p["round"] is not None else text

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        phase = self.current_phase(trainer, pl_module)
        key = ("groups", "round", "lr_scale", "trainable")
        if self.phases and all(self.phases[-1][k] == phase[k] for k in key):
            return
        self.phases.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **phase})
        logged = {"finetune/groups": float(phase["groups"]), "epoch": float(trainer.current_epoch)}
        if phase["round"] is not None:
            logged["finetune/round"] = float(phase["round"])
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)

    # --- logging interval ---
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The interval follows the data: an epoch shorter than `log_every_n_steps` still logs its training loss
        # (Lightning would only warn, and metrics.csv would have no training curve).
        steps = trainer.num_training_batches
        if steps != float("inf") and steps > 0:
            per_epoch = max(1, int(steps) // max(1, trainer.accumulate_grad_batches))
            trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, per_epoch))

    # --- throughput ---
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        self._val_seconds = 0.0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_samples += (_batch_size(batch) or 0) * trainer.world_size

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_started = time.perf_counter()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_started is not None:
            self._val_seconds += time.perf_counter() - self._val_started
            self._val_started = None
        if trainer.sanity_checking:
            return
        monitor = getattr(pl_module, "monitor", "val/loss")
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            return
        value = float(value)
        sign = 1.0 if getattr(pl_module, "monitor_mode", "min") == "max" else -1.0
        if self.best is None or sign * (value - self.best["value"]) > 0:
            self.best = {
                "metric": monitor,
                "value": value,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
            }

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_started is not None:
            self.train_seconds += time.perf_counter() - self._epoch_started - self._val_seconds
            self._epoch_started = None

    @property
    def samples_per_second(self) -> float | None:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 and self.train_samples else None

    # --- plots ---
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_done = False

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # `trainer.test(ckpt_path="best")` after fit restores every callback's state from that checkpoint; what fit
        # saw is kept (see load_state_dict), and the round table copied before the fine-tuning callback's is.
        self._fit_done = True
        ft = _finetuning(trainer)
        self.rounds = [dict(r) for r in getattr(ft, "history", [])] if ft is not None and ft.uses_rounds else []
        if not self.plot or not trainer.is_global_zero:
            return
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv is None:
            return
        csv.save()  # flush the rows still in memory
        try:
            from peft_lightning.plots import plot_run

            self.plot_path = plot_run(Path(csv.log_dir))
        except Exception as err:  # the run itself succeeded: a plot must not lose it, but say what happened
            rank_zero_warn(f"could not write the training curves ({type(err).__name__}: {err})")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"phases": self.phases, "best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fit_done:  # evaluating a checkpoint after fit: keep this fit's record
            return
        self.phases = list(state_dict.get("phases", []))
        self.best = state_dict.get("best")


class PhaseProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing the fine-tuning phase (``phase: 4/7 groups``; ``retune``:
    ``phase: round 1, 5/7 groups``) beside the metrics. The phase comes from the trainer's ``RunReport``."""

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run folder names the run: a version number says nothing here
        report = next((c for c in trainer.callbacks if isinstance(c, RunReport)), None)
        phase = report.phase_text() if report is not None else ""
        return {"phase": phase, **items} if phase else items


# --- the summary ---
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
    rows: list[tuple[str, str]] = [("recipe", recipe)]
    hp = getattr(model, "hparams", {})
    name = hp.get("model_name") if isinstance(hp, Mapping) else None
    adapter = getattr(model, "adapter_config", None)
    model_text = f"{name or type(model).__name__}" + (f" + {adapter.method} adapters" if adapter else "")
    rows.append(("model", model_text))
    # After fit, requires_grad is whatever the last phase (or a later evaluation) left: the phases say what trained.
    total = sum(p.numel() for p in model.parameters())
    if report is not None and report.phases:
        peak = max(p["trainable"] for p in report.phases)
        first = report.phases[0]["trainable"]
        trained = _count(peak) if first == peak else f"{_count(first)} at first, up to {_count(peak)}"
    else:
        peak = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained = _count(peak)
    rows.append(("parameters", f"{trained} trained of {_count(total)} ({100 * peak / max(total, 1):.1f}%)"))
    dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    batch = getattr(getattr(dm, "hparams", None), "batch_size", None) or getattr(dm, "batch_size", None)
    if batch:  # the same figure and wording as the start-of-fit line (engine.RunSummary)
        from peft_lightning.engine import GlobalBatch

        size = GlobalBatch(
            int(batch), int(trainer.num_devices), int(trainer.num_nodes), int(trainer.accumulate_grad_batches)
        )
        rows.append(("effective batch", str(size)))
    rows.append(("precision", str(trainer.precision)))
    accel = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    rows.append(
        (
            "strategy",
            f"{type(trainer.strategy).__name__} ({trainer.num_nodes} node(s) x {trainer.num_devices} {accel})",
        )
    )
    ft = _finetuning(trainer)
    rounds = (report.rounds if report is not None else []) or (ft.history if ft is not None and ft.uses_rounds else [])
    if rounds:
        for r in rounds:
            best = "-" if r["best"] is None else f"{r['best']:.4f}"
            rows.append(
                (
                    f"round {r['round']}",
                    f"{r['groups']} groups, {_count(r['trainable'])} trained, best {best}, {r['epochs']} epoch(s)",
                )
            )
    elif report is not None:
        for i, p in enumerate(report.phases):
            names = ", ".join(p["names"]) if len(p["names"]) <= 3 else f"{p['names'][0]} ... {p['names'][-1]}"
            scale = f", LR x{p['lr_scale']:g}" if p["lr_scale"] != 1.0 else ""
            rows.append(
                (
                    f"phase {i}" if ft is None else f"phase {i} ({ft.strategy})",
                    f"from epoch {p['epoch']} (step {p['step']}): {p['groups']}/{p['n_groups']} groups "
                    f"({names}), {_count(p['trainable'])} trained{scale}",
                )
            )
    if ft is not None and ft.probe:
        from peft_lightning.callbacks.strategies import Auto

        rgn = ft.probe["rgn"]
        norm = {g: v for g, v in Auto.normalised(rgn, list(rgn)).items() if g != list(rgn)[-1]}
        ranked = ", ".join(f"{g} {v:.2f}" for g, v in sorted(norm.items(), key=lambda kv: -kv[1])[:4])
        rows.append(
            (
                "gradient probe",
                f"{ft.probe['batches']} batches in {ft.probe['seconds']:.1f} s; RGN/max below "
                f"the head: {ranked}{' ...' if len(norm) > 4 else ''}",
            )
        )
    for i, note in enumerate(ft.cache_summary(model) if ft is not None else []):
        rows.append(("prefix cache" if i == 0 else "", note))
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
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    if ckpt:
        rows.append(("best checkpoint", ckpt))
    if report is not None and report.plot_path is not None:
        rows.append(("curves", str(report.plot_path)))
    folder = _log_dir(trainer)
    if folder:
        rows.append(("run folder", folder))
    return rows


def _log_dir(trainer: Trainer) -> str | None:
    # Not `trainer.log_dir`: it broadcasts, a collective that would hang when only rank 0 prints.
    if trainer.loggers:
        lg = trainer.loggers[0]
        folder = lg.log_dir if isinstance(lg, (CSVLogger, TensorBoardLogger)) else lg.save_dir
        return str(Path(folder)) if folder else None
    return str(Path(trainer.default_root_dir))


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


THIRD_PARTY_NOISE = (
    r"💡 Tip: ",  # Lightning's advertisements for its cloud loggers and model registry
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
    """Hide ``THIRD_PARTY_NOISE`` (warnings and Lightning's log records) and the progress bars ``datasets`` draws
    while it converts and caches data; idempotent."""
    import os
    import sys
    import warnings

    for pattern in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _Hide) for f in handler.filters):
                handler.addFilter(_Hide(THIRD_PARTY_NOISE))
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    else:  # read by datasets when it is imported
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
