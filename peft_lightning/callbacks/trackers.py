"""What the user's experiment trackers get beyond what Lightning sends every logger.

Lightning sends each logger the metrics and the task's and data module's hyper-parameters. A tracker the user
adds (``--trainer.logger MLFlowLogger ...``, beside the run folder's own loggers: ``run_folder.run_loggers``) also
gets, from ``Trackers``:

- at the start of fit, the whole resolved config (``config.yaml``: trainer, fine-tuning strategy, checkpoint,
  adapters ...) as hyper-parameters under ``config/``, the run folder as ``run_folder``, and the ``config.yaml``
  file itself where the tracker keeps files (MLflow: an artifact; W&B: a run file), so that
  ``fit -c config.yaml`` reruns it;
- at the end of fit, the best checkpoint's path as ``best_checkpoint``. The checkpoint files themselves are the
  tracker's to upload, with its own ``log_model`` argument (MLFlowLogger, WandbLogger).

A tracker that refuses any of these (a server down, a value it will not change) costs a warning, not the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from peft_lightning.output.run_folder import log_dir


class Trackers(Callback):
    """Sends ``trackers`` the run's config, folder and best checkpoint path (see the module docstring).

    Args:
        trackers: the user's loggers, not the run folder's own (whose folder already holds all of it).
    """

    def __init__(self, trackers: Sequence[Logger]) -> None:
        self.trackers = list(trackers)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = log_dir(trainer)
        # Written by LightningCLI's SaveConfigCallback in its `setup`, before this hook (none under fast_dev_run).
        config = Path(folder, "config.yaml") if folder and Path(folder, "config.yaml").is_file() else None
        params: dict[str, Any] = {"run_folder": folder}
        if config is not None:
            # Under `config/`: the task's own hyper-parameters (Lightning's, unprefixed) keep their names, and no
            # key is sent twice with two spellings of one value (MLflow refuses to change a parameter).
            params["config"] = yaml.safe_load(config.read_text())
        for tracker in self.trackers:
            _send(tracker, "the run's config", tracker.log_hyperparams, params)
            if config is not None:
                _send(tracker, "config.yaml", _upload, tracker, config)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best = (checkpoint.best_model_path if checkpoint is not None else "") or ""
        if not best or not trainer.is_global_zero:
            return
        for tracker in self.trackers:
            _send(tracker, "the best checkpoint's path", tracker.log_hyperparams, {"best_checkpoint": best})


def _upload(tracker: Logger, path: Path) -> None:
    """``path`` into the tracker's files for this run, where it keeps files (MLflow, W&B); nothing elsewhere."""
    if isinstance(tracker, MLFlowLogger):
        tracker.experiment.log_artifact(tracker.run_id, str(path))
    elif isinstance(tracker, WandbLogger):
        # Under the run folder's name: W&B keeps the run's own config (the hyper-parameters) as files/config.yaml.
        tracker.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")


def _send(tracker: Logger, what: str, send: Callable[..., object], *args: Any) -> None:
    try:
        send(*args)
    except Exception as err:  # the run itself goes on: its folder holds all of it
        rank_zero_warn(f"could not send {what} to {type(tracker).__name__} ({type(err).__name__}: {err})")
