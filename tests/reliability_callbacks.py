"""Callbacks the reliability tests add to real CLI runs (``--trainer.callbacks+=reliability_callbacks.KillAt``).

They stand in for the outside world: a machine that dies (SIGKILL) or a scheduler that pre-empts (SIGTERM) at a
chosen training step, and a record of every validation's metrics to compare runs by.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback

from recipes.vit_cifar import VitCifar


class KillAt(Callback):
    """Send ``signum`` (default SIGKILL) to this process at global step ``step``: ``where="optimizer_step"`` in
    the middle of that step (gradients computed, weights not yet updated), ``"batch_end"`` after it. In the test
    after fit: ``"test"`` before its test batch number ``step``, ``"test_end"`` once its metrics are computed."""

    def __init__(self, step: int, where: str = "optimizer_step", signum: int = int(signal.SIGKILL)) -> None:
        self.step = step
        self.where = where
        self.signum = signum
        self.sent = False

    def _maybe(self, trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe(trainer, "optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe(trainer, "batch_end")

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._maybe(trainer, "validation")

    def on_validation_end(self, trainer, pl_module):
        # Before the checkpoint callbacks' own hook (Lightning runs them last): the validation-end save is not made.
        if not trainer.sanity_checking:
            self._maybe(trainer, "validation_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe(trainer, "epoch_end")  # after the validation-end save, before the epoch-end one

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "test" and batch_idx == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_test_epoch_end(self, trainer, pl_module):
        if self.where == "test_end" and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class RecordMetrics(Callback):
    """Each validation's metrics (and, with ``weights``, a digest of the weights after every training step) as JSON
    lines.

    The rows are part of the run's state (every checkpoint holds them) and the file is rewritten from it: a resumed
    run's file is the history of the checkpoints it descends from, so a validation that a resume skips or runs twice
    shows, and what a killed run did after its last checkpoint does not count.
    """

    def __init__(self, path: str, weights: bool = False) -> None:
        self.path = path
        self.weights = weights
        self.rows: list[dict] = []

    def _write(self) -> None:
        Path(self.path).write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.weights:
            digest = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
            self.rows.append({"step": trainer.global_step, "weights": round(digest, 6)})

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                **{k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            }
        )
        self._write()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write()

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))


class NanAt(VitCifar):
    """A recipe (``--recipe reliability_callbacks:NanAt``) whose training loss turns NaN at one step."""

    def __init__(self, nan_at_step: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at_step else loss


class MemoryProbe(Callback):
    """After each training epoch, append the process's resident memory and its count of live tensors (JSON lines):
    what a leak per epoch (cached tensors, metric states, logged values) would make grow."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        import gc

        import torch

        gc.collect()
        tensors = sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
        rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
        row = {"epoch": trainer.current_epoch, "rss_mib": rss_kib / 1024, "tensors": tensors}
        with Path(self.path).open("a") as f:
            f.write(json.dumps(row) + "\n")
