"""Checkpoints a run can always resume from: ``last.ckpt`` often, never torn, never from a broken run.

``ResumableCheckpoint`` is Lightning's ``ModelCheckpoint`` (the CLI's ``--checkpoint.*``) with five additions,
each closing a way a long run on a pre-emptible machine loses work:

- ``last.ckpt`` is written every ``last_every_minutes`` (and/or ``last_every_n_train_steps``) mid-epoch, and at
  every validation end. Lightning's own ``save_last`` only follows a *top-k* save (an epoch whose monitored metric
  did not improve leaves ``last.ckpt`` behind), and its ``every_n_train_steps`` would also judge the top-k
  checkpoint on stale validation metrics. Never between an epoch's last step and its validation's end: Lightning
  resumes such a checkpoint as an epoch already ended, skipping its validation and ``on_train_epoch_end``.
- SIGTERM (what a pre-empted cluster job receives) and SIGINT (Ctrl+C) stop the run at the end of the current
  training step (in an epoch's last step or a validation: at that validation's end), write ``last.ckpt`` and leave
  by ``SIGTERMException``; the CLI exits ``128 + signal`` (143 / 130) with one line. A second Ctrl+C interrupts at
  once.
- A resume keeps what Lightning drops: the best score when the resumed run writes to a new folder, and a stop a
  callback decided (retune's rounds done, early stopping); a fit's end is saved, so
  ``checkpoints.finished_reason`` tells a finished run from an interrupted one.
- Every file is written to a temporary file beside its target, flushed to disk and renamed over it
  (``AtomicCheckpointIO``): a kill during the write leaves the previous file whole. Lightning's own
  ``_atomic_save`` stages the bytes in the system temp folder and ``shutil.move``s them, which is a plain (tearable)
  copy when that folder is on another filesystem than the checkpoints, as on most clusters.
- A non-finite training loss stops the run before its backward pass, and no checkpoint is ever written from
  non-finite weights: the last good checkpoint stays the last one on disk.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from peft_lightning import internals
from peft_lightning.errors import UsageError

# The signal that stopped the last fit in this process (None: none did). The CLI turns it into the exit code.
_stop_signal: int | None = None


def _is_local(path: Any) -> bool:
    # What Lightning's private `_is_local_file_protocol` does, through fsspec's public helper.
    return get_protocol(str(path)) == "file"


def stop_signal() -> int | None:
    """The signal (``signal.SIGTERM`` / ``signal.SIGINT``) that made the last ``fit`` stop early, if any."""
    return _stop_signal


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target's folder, ``fsync``, then ``os.replace`` over the target.

    A reader (or a resumed run) sees either the previous complete file or the new complete one, never a prefix, even
    when the process is killed mid-write. A killed write can leave a ``.NAME.*.tmp`` file beside the target; it is
    never read. Remote paths (``s3://`` ...) keep Lightning's fsspec transaction.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable (a power cut after it must not bring back the old entry)
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always recent, whole and finite; see the module docstring.

    Args:
        last_every_minutes: also write ``last.ckpt`` after a training step when this many minutes passed since the
            last write (a SIGKILL loses at most about this much training). None or 0: off.
        last_every_n_train_steps: also write ``last.ckpt`` every this many optimizer steps. 0: off.
        stop_on_nonfinite_loss: stop with one line when the training loss is NaN or infinite, before its backward
            pass changes any weight.
        graceful_stop: on SIGTERM or SIGINT, finish the current step, write ``last.ckpt`` and stop.
        **kwargs: ``ModelCheckpoint``'s arguments (``monitor``, ``save_top_k``, ``dirpath`` ...).
    """

    def __init__(
        self,
        *args: Any,
        last_every_minutes: float | None = 10.0,
        last_every_n_train_steps: int = 0,
        stop_on_nonfinite_loss: bool = True,
        graceful_stop: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_train_steps < 0 or (last_every_minutes is not None and last_every_minutes < 0):
            raise UsageError("--checkpoint.last_every_n_train_steps and --checkpoint.last_every_minutes must be >= 0")
        self.last_every_minutes = last_every_minutes
        self.last_every_n_train_steps = last_every_n_train_steps
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.graceful_stop = graceful_stop
        self._last_written_step: int | None = None
        self._writes = 0  # last.ckpt writes so far
        self._last_written_time = time.monotonic()
        self._signal: int | None = None
        self._saved_for_signal = False
        self._previous_sigint: Any = None
        self._deferred = False  # a save due at an epoch's last batch, made at the epoch's end instead
        self._held: Callable[[], None] | None = None  # a signal's stop, held until the validation ends
        # Saved in every checkpoint: when the best checkpoint was written (for the summary), and why a callback
        # stopped the run (retune rounds done, early stopping), which a resumed fit must honour.
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.stopped: str | None = None

    # --- setup: atomic writes, signals ---
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.stopped = None  # a fresh fit runs; a resumed one gets its checkpoint's (load_state_dict, next)
        # Only the plain torch writer is replaced; a strategy's own (sharded, remote) checkpoint IO is left alone.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        global _stop_signal
        _stop_signal = None
        self._signal, self._saved_for_signal, self._held = None, False, None
        self._last_written_time = time.monotonic()
        if self.graceful_stop:
            self._install_signal_handlers(trainer)
        if self.stopped and between_epochs(trainer):  # else at the end of the restored epoch (on_train_epoch_end)
            trainer.should_stop = True

    def _install_signal_handlers(self, trainer: Trainer) -> None:
        # Lightning's SIGTERM handler (set `trainer.received_sigterm`: stop after this step) is in place by now.
        # Ours records which signal came, and SIGINT takes the same road instead of a KeyboardInterrupt wherever it
        # lands (mid optimizer step); a second Ctrl+C interrupts at once.
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def on_signal(signum: int, frame: Any) -> None:
            global _stop_signal
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = _stop_signal = signum
            # In an epoch's last step or in a validation, Lightning would stop inside the validation, and a checkpoint
            # from there resumes as if the epoch had ended, its validation skipped: the stop waits for its end.
            hold = (trainer.validating and not trainer.sanity_checking) or (
                trainer.training and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
            )
            rank_zero_info(
                f"received {signal.Signals(signum).name}: stopping after this "
                f"{'validation' if hold else 'step'} and saving last.ckpt (Ctrl+C again to interrupt at once)"
            )
            forward = (lambda: lightning_sigterm(signal.SIGTERM, frame)) if callable(lightning_sigterm) else None
            if hold:
                self._held = forward
            elif forward is not None:
                forward()

        try:
            signal.signal(signal.SIGTERM, on_signal)
            self._previous_sigint = signal.signal(signal.SIGINT, on_signal)
        except ValueError:  # not the main thread (e.g. a notebook's worker): Lightning's SIGTERM handling only
            self._previous_sigint = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            try:
                signal.signal(signal.SIGINT, self._previous_sigint)
            except ValueError:
                pass
            self._previous_sigint = None

    # --- when last.ckpt is written ---
    def _write_last(self, trainer: Trainer, again: bool = False) -> None:
        """Write ``last.ckpt`` now, unless it already holds this step (``again``: unless it was just written)."""
        if not self.save_last or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._saved_last_now(trainer) and not again:
            return
        internals.save_last_checkpoint(self, trainer)

    def _saved_last_now(self, trainer: Trainer) -> bool:
        return self._last_written_step == trainer.global_step

    def _due(self, trainer: Trainer) -> bool:
        step = trainer.global_step
        if self._saved_last_now(trainer) or step == 0:
            return False
        due = bool(self.last_every_n_train_steps) and step % self.last_every_n_train_steps == 0
        if self.last_every_minutes:
            elapsed = time.monotonic() - self._last_written_time >= 60 * self.last_every_minutes
            due = due or trainer.strategy.broadcast(elapsed)  # rank 0's clock decides: every rank must save
        return due

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._ends_epoch(trainer, batch_idx):
            self._release()  # held since the previous epoch's end (Lightning's last-batch flag outlives it)
        signalled = trainer.received_sigterm and not self._saved_for_signal
        if not (signalled or self._due(trainer)):
            return
        if self._ends_epoch(trainer, batch_idx):
            # Lightning restores a checkpoint written after an epoch's last step as that epoch ended: it skips the
            # epoch's validation and on_train_epoch_end (retune's round decision, the best checkpoint ...). This
            # save waits for the epoch's end (validation end, or on_train_epoch_end), where a signal stops anyway.
            self._deferred = True
            return
        # Saved here, after the step: the state Lightning resumes mid-epoch from.
        self._write_last(trainer)
        self._saved_for_signal = self._saved_for_signal or bool(signalled)

    @staticmethod
    def _ends_epoch(trainer: Trainer, batch_idx: int) -> bool:
        """Whether this training batch is its epoch's last (what Lightning's restore treats as the epoch's end)."""
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) or (
            batch_idx + 1 >= trainer.num_training_batches
        )

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After validation the callbacks' state moved on (best scores, re-tuning decisions): last.ckpt must hold it
        # even when a periodic save already wrote this step just before validation.
        writes = self._writes
        super().on_validation_end(trainer, pl_module)
        if self._writes == writes:
            self._write_last(trainer, again=True)
        if not trainer.sanity_checking:
            self._release()  # a signal held during the validation (or the step before it) stops the run now

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stopped:  # Lightning does not save `should_stop`: a run a callback stopped stays stopped when resumed
            trainer.should_stop = True
        super().on_train_epoch_end(trainer, pl_module)
        if internals.saves_on_train_epoch_end(self, trainer) or self._deferred:
            self._write_last(trainer)
        self._deferred = False
        self._release()  # held since the epoch's last step, with no validation after it

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # The fit is over: last.ckpt must say so (written after its last epoch's end, with why a callback stopped it)
        # so that `fit --ckpt_path` of it trains nothing more (see `checkpoints.finished_reason`).
        self._write_last(trainer, again=True)

    def _stop_reason(self, trainer: Trainer) -> str | None:
        if not trainer.should_stop:
            return None
        for callback in trainer.callbacks:
            # a callback that stops the run says why in `stop_reason` (FineTuning: its re-tuning rounds are done)
            reason = getattr(callback, "stop_reason", None) if callback is not self else None
            if isinstance(reason, str) and reason:
                return reason
            if isinstance(callback, EarlyStopping) and callback.stopping_reason_message:
                return f"early stopping on {callback.monitor}"
        return self.stopped or "a callback stopped it"

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # A signal held to a validation's end, or one between epochs, stops there, not after a training step.
        if isinstance(exception, SIGTERMException):
            # Stopped after an epoch's on_train_epoch_end: save that state, past the epoch's end, as a fit ending
            # there would (the validation-end last.ckpt would replay the epoch's end hooks).
            ended_epoch = between_epochs(trainer)
            if ended_epoch or not self._saved_for_signal:
                self._write_last(trainer, again=ended_epoch)
                self._saved_for_signal = True
            global _stop_signal
            _stop_signal = _stop_signal or signal.SIGTERM
            rank_zero_info(
                f"stopped at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                f"resume with --ckpt_path last ({self.last_model_path})"
            )

    @override
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # A private hook of ModelCheckpoint (listed in internals.OVERRIDDEN, checked by tests/test_internals.py): the
        # one place every checkpoint file passes through.
        module = trainer.lightning_module
        bad = next(
            (n for n, p in module.named_parameters() if p.is_floating_point() and not p.isfinite().all()),
            None,
        )
        if bad is not None:
            raise UsageError(
                f"weight {bad} is not finite at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}: nothing was saved (the last good checkpoint is "
                f"{self.last_model_path or 'none'}); lower --model.lr or use --trainer.gradient_clip_val"
            )
        saved_step = internals.last_global_step_saved(self)
        self.stopped = self._stop_reason(trainer)
        if filepath == self.best_model_path:  # a new best: ModelCheckpoint set its path and score just before
            self.best_epoch, self.best_step = trainer.current_epoch, trainer.global_step
        super()._save_checkpoint(trainer, filepath)
        if os.path.basename(filepath).startswith(self.CHECKPOINT_NAME_LAST):
            # ModelCheckpoint skips any save at a step it already saved at: an extra last.ckpt (periodic, or at
            # validation end) must not cost that step its top-k ("best") checkpoint.
            internals.set_last_global_step_saved(self, saved_step)
            self._last_written_step = trainer.global_step
            self._writes += 1
            self._last_written_time = time.monotonic()

    # --- state ---
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "stopped": self.stopped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes to a new folder, and for another folder Lightning restores only best_model_path, not
        # its score: the resumed run's first validation would become the best checkpoint whatever its score, and
        # the test after fit would evaluate that one. The scores are kept while the previous folder's best file is
        # there (ModelCheckpoint removes files only in its own folder: that one is never deleted).
        best = state_dict.get("best_model_path") or ""
        if not best or not _is_local(best) or Path(best).is_file():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)
        self.best_epoch, self.best_step = state_dict.get("best_epoch"), state_dict.get("best_step")
        self.stopped = state_dict.get("stopped")

    # --- non-finite loss ---
    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self.stop_on_nonfinite_loss:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # one rank alone must not leave the others waiting in an all-reduce
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = float(loss.detach().float().mean()) if loss.numel() else math.nan
            raise UsageError(
                f"the training loss is {value} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}: stopped before it changed any weight; the last good checkpoint "
                f"is {self.last_model_path or 'none (nothing saved yet)'}. Lower --model.lr, set "
                "--trainer.gradient_clip_val, or check the data and --trainer.precision"
            )


def between_epochs(trainer: Trainer) -> bool:
    """Whether the fit stands between two epochs (the last one started has ended), not inside one; e.g. a fit resumed
    from a checkpoint written at an epoch's end, not at its validation's."""
    progress = trainer.fit_loop.epoch_progress.current
    return progress.processed == progress.started
