"""What a run records while it trains, and the progress bar that shows it.

- ``RunReport``: a callback that records which layer groups train from which step (and logs it as
  ``finetune/groups`` / ``finetune/round``, so TensorBoard and the plots mark the boundaries), the training
  throughput and the best validation metric, and writes the curves at the end of fit.
- ``PhaseProgressBar``: Lightning's ``RichProgressBar`` with the current phase beside the metrics.

The run's folder and loggers are ``run_folder.py``'s; everything printed about a run (the start-of-fit line, the
end-of-run table) is formatted in ``summary.py``.

Example (in a notebook, the same pieces the CLI wires):
    >>> from lightning.pytorch import Trainer  # doctest: +SKIP
    >>> from peft_lightning.output.run_folder import run_dir, run_loggers  # doctest: +SKIP
    >>> from peft_lightning.output.summary import print_summary, summary_rows  # doctest: +SKIP
    >>> folder = run_dir("runs", "effnet_fashion")  # doctest: +SKIP
    >>> report = RunReport()  # doctest: +SKIP
    >>> trainer = Trainer(default_root_dir=folder, logger=run_loggers(folder),
    ...                   callbacks=[FineTuning(), report, PhaseProgressBar()])  # doctest: +SKIP
    >>> trainer.fit(model, data)  # doctest: +SKIP
    >>> print_summary(summary_rows(trainer, model, recipe="effnet_fashion", report=report, wall=report.wall))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.contract import Tunable


def samples_in(batch: Any) -> int:
    """Samples in a batch: Lightning's ``extract_batch_size`` (the length of the first tensor; dicts, tuples and
    dataclasses searched in order), 0 for a batch that holds no tensor."""
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    try:
        return extract_batch_size(batch)
    except MisconfigurationException:
        return 0


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
        self._last_groups: tuple[str, ...] | None = None  # what the fine-tuning callback trained at the last step
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
        tunable = isinstance(pl_module, Tunable)  # any LightningModule may run with this report
        groups = pl_module.layer_groups() if tunable else [("all", list(params))]
        training = [name for name, names in groups if any(params[n].requires_grad for n in names if n in params)]
        ft = FineTuning.find(trainer)
        return {
            "groups": len(training),
            "n_groups": len(groups),
            "names": training,
            "round": ft.rounds.round if ft is not None and ft.rounds is not None else None,
            "lr_scale": float(pl_module.lr_scales.phase) if tunable else 1.0,
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
        # At each epoch's start, and within an epoch when the fine-tuning callback changed what trains (``auto``'s
        # probe after its linear probe): the groups are compared only then, not at every step.
        ft = FineTuning.find(trainer)
        now = ft.trainable_groups if ft is not None else None
        changed, self._last_groups = now != self._last_groups, now
        if batch_idx != 0 and not changed:
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
    # Hand-written, not Lightning's ThroughputMonitor: that callback logs its rates at every step to every logger (new
    # metrics.csv columns, and a warning without a `flops_per_batch` on the task), computes them over a sliding
    # window (`Throughput(window_size=100)`) rather than the whole fit, and keeps its clock running between epochs
    # (epoch-end hooks, checkpoint writes). The summary's row is the whole fit's training samples over its training
    # time; add `ThroughputMonitor` to a run for per-step rates and MFU on a GPU.
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        self._val_seconds = 0.0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_samples += samples_in(batch) * trainer.world_size

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_started = time.perf_counter()

    # The best validation metric is also ModelCheckpoint's `best_model_score`, which the summary prefers
    # (`summary.best_validation`). This record stays: it is all there is when no checkpoint callback monitors a
    # metric (`--trainer.enable_checkpointing false`, `--checkpoint.monitor null`), `tune` scores trials by it, and
    # the model card reads it from a checkpoint's callback state.
    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_started is not None:
            self._val_seconds += time.perf_counter() - self._val_started
            self._val_started = None
        if trainer.sanity_checking:
            return
        tunable = isinstance(pl_module, Tunable)
        monitor = pl_module.monitor if tunable else "val/loss"
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            return
        value = float(value)
        sign = 1.0 if tunable and pl_module.monitor_mode == "max" else -1.0
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
        ft = FineTuning.find(trainer)
        self.rounds = [dict(r) for r in ft.rounds.history] if ft is not None and ft.rounds is not None else []
        if not self.plot or not trainer.is_global_zero:
            return
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv is None:
            return
        csv.save()  # flush the rows still in memory
        try:
            from peft_lightning.output.plots import plot_run

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
