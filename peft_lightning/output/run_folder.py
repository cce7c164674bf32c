"""A run's folder and what logs into it: ``<root>/<recipe>/<YYYYmmdd-HHMMSS>`` (under a launcher that restarts
jobs, ``<root>/<recipe>/slurm-<job>-<hash>``, continued by the restart), holding the resolved ``config.yaml``
(LightningCLI's SaveConfigCallback), ``metrics.csv`` (CSVLogger), ``tensorboard/`` (when tensorboard is installed),
``checkpoints/`` (ModelCheckpoint resolves its folder from the first logger) and ``curves.png``. The user's own
experiment trackers (``--trainer.logger MLFlowLogger``, W&B, Comet ...) log beside these, after them.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import time
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
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

    # A private hook of Lightning's writer, and its `_fs` (internals.OVERRIDDEN, checked by tests/test_internals.py).
    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            # The header's keys: a new key later rewrites the file with the wider header, keeping every row.
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the folder's ``metrics.csv`` if there is one (see ``_ContinuedMetrics``)."""

    # Lightning's own property with another writer: it sets the logger's `_experiment` and reads its `_fs`
    # (internals.OVERRIDDEN, checked by tests/test_internals.py).
    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetrics(log_dir=self.log_dir)
        return self._experiment


def run_loggers(folder: str | Path, trackers: Iterable[Logger] = ()) -> list[Logger]:
    """CSV metrics in ``folder/metrics.csv`` and, when tensorboard is installed, TensorBoard events in
    ``folder/tensorboard``, then ``trackers`` (the user's: see ``user_trackers``). The CSV logger comes first:
    ``trainer.log_dir``, ``config.yaml`` and the checkpoints resolve to ``folder`` itself (empty name and version: no
    ``version_N`` level) whatever trackers follow, and ``curves.png``, ``plot``, the run summary and ``card`` read its
    ``metrics.csv``. A folder used again (a requeued job) continues both: rows appended to ``metrics.csv``, a new
    events file beside the old ones."""
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(folder), name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(
            TensorBoardLogger(save_dir=str(folder), name="", version="", sub_dir="tensorboard", default_hp_metric=False)
        )
    return [*loggers, *trackers]


def user_trackers(logger: bool | Logger | Iterable[Logger] | None) -> list[Logger]:
    """The loggers ``--trainer.logger`` gives (one, or a list), which log beside the run folder's own; none for
    ``true``, ``false`` or unset (``false``: no logger at all, the folder still holds the checkpoints).

    Example:
        >>> user_trackers(True), user_trackers(None)
        ([], [])
    """
    if logger is None or isinstance(logger, bool):
        return []
    return [logger] if isinstance(logger, Logger) else list(logger)


def log_dir(trainer: Trainer) -> str | None:
    """The run folder, as the first logger resolves it (the trainer's ``default_root_dir`` without loggers)."""
    # Not `trainer.log_dir`: it broadcasts, a collective that would hang when only rank 0 prints.
    if trainer.loggers:
        lg = trainer.loggers[0]
        folder = lg.log_dir if isinstance(lg, (CSVLogger, TensorBoardLogger)) else lg.save_dir
        return str(Path(folder)) if folder else None
    return str(Path(trainer.default_root_dir))
