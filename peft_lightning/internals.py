"""Every use of another library's private API, in one place, each written for the versions below.

A private name can change in any release. Each one this project needs is wrapped here in a small function (or named
in ``OVERRIDDEN`` when a class of ours overrides it), with the version it was written for and the upstream issue it
works around where there is one; ``tests/test_internals.py`` fails with the function to update when an upgrade
removes one. Nothing outside this module reaches into another library's private names; a subclass's override of a
private hook has to live in its class, and is listed in ``OVERRIDDEN`` instead.

Written for lightning 2.6.6, torch 2.14.1, datasets 5.2.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

WRITTEN_FOR = {"lightning": "2.6.6", "torch": "2.14.1", "datasets": "5.2.0"}


# --- Lightning's fit loop: the train loader's saved position (lightning 2.6.6) ---
def resume_loader_position(trainer: Trainer) -> None:
    """Give a resumed fit its train loader's saved position; call at ``on_train_start``.

    Lightning hands a checkpoint's loader state back when it builds the training loader after restoring the
    checkpoint. A learning-rate schedule sized by ``trainer.estimated_stepping_batches`` makes it build the loader,
    and its iterator, earlier (in ``configure_optimizers``), so the state is never given back and a resumed epoch
    starts over from its first batch (and, with worker processes, draws the previous epoch's order). Here, with the
    loops restored and the resumed epoch not yet begun: load the saved position (it sets the sampler's epoch) and
    create the iterator again.

    Upstream: Lightning issue #20550 (open), fix proposed in PR #21765, which does the same inside
    ``_FitLoop.setup_data``; drop this once a released Lightning has it. Private names used:
    ``_FitLoop._combined_loader_states_to_load``, ``._combined_loader``, ``._data_fetcher``,
    ``._load_combined_loader_states()``.
    """
    loop = trainer.fit_loop
    states = getattr(loop, "_combined_loader_states_to_load", None)
    if not states or not loop.restarting or loop._combined_loader is None or loop._data_fetcher is None:
        return  # a fresh fit, or Lightning already gave the state back
    loop._load_combined_loader_states()
    iter(loop._data_fetcher)


# --- Lightning's ModelCheckpoint (lightning 2.6.6; no upstream issue found for any of these) ---
# ResumableCheckpoint writes last.ckpt at times ModelCheckpoint has no public way to ask for (mid-epoch on a clock,
# at every validation end, on a signal), through ModelCheckpoint's own save-last path.
def save_last_checkpoint(callback: ModelCheckpoint, trainer: Trainer) -> None:
    """Write ``callback``'s ``last.ckpt`` now (``ModelCheckpoint._save_last_checkpoint`` with its
    ``_monitor_candidates``: the file name template sees the current metrics)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def saves_on_train_epoch_end(callback: ModelCheckpoint, trainer: Trainer) -> bool:
    """Whether ``callback`` saves at the training epoch's end rather than at the validation's
    (``ModelCheckpoint._should_save_on_train_epoch_end``)."""
    return bool(callback._should_save_on_train_epoch_end(trainer))


def last_global_step_saved(callback: ModelCheckpoint) -> int:
    """The step ``callback`` last saved at: it skips any other save at that step
    (``ModelCheckpoint._last_global_step_saved``)."""
    return callback._last_global_step_saved


def set_last_global_step_saved(callback: ModelCheckpoint, step: int) -> None:
    """Put back ``last_global_step_saved``: an extra ``last.ckpt`` must not cost that step its top-k checkpoint."""
    callback._last_global_step_saved = step


# --- Lightning's DDP strategy (lightning 2.6.6; no upstream issue found) ---
def ddp_kwargs(strategy: Any) -> dict[str, Any] | None:
    """The keyword arguments ``DDPStrategy`` will pass to ``DistributedDataParallel`` (``DDPStrategy._ddp_kwargs``),
    a dict changed in place before the model is wrapped; None for any other strategy. ``FineTuning`` sets
    ``find_unused_parameters`` in it: groups unfrozen after DDP wrapped the model must still be all-reduced, and
    Lightning sets this only from the strategy's constructor."""
    found = getattr(strategy, "_ddp_kwargs", None)
    return found if isinstance(found, dict) else None


# --- LightningModule (lightning 2.6.6; no upstream issue found) ---
def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or None (``LightningModule._trainer``): the public ``trainer`` property
    raises when there is none, e.g. while a checkpoint is saved outside a fit."""
    return getattr(module, "_trainer", None)


CLI_HPARAM_KEYS = ("_instantiator", "_class_path")
"""Keys LightningCLI adds to a model's saved hyperparameters (``LightningCLI._add_instantiators`` and
``_add_class_path_generator``, lightning 2.6.6), which are no argument of the model."""


# --- torch (2.14.1) ---
BatchNorm = nn.modules.batchnorm._BatchNorm
"""The base of every BatchNorm (1d/2d/3d, lazy, SyncBatchNorm, timm's BatchNormAct2d): what Lightning's own
``BaseFinetuning`` tests against. No public base class; no upstream issue found."""


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` already ran on it (``nn.Module._compiled_call_impl``, set by ``compile``; no
    public way to ask, no upstream issue found)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's version counter (``Tensor._version``): it rises with every in-place change (optimizer steps,
    ``load_state_dict``), so an unchanged version means unchanged values. No public API; no upstream issue found."""
    return tensor._version


# --- datasets (5.2.0) ---
def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` keys its cache by (``Dataset._fingerprint``; ``datasets.fingerprint`` offers only
    ways to compute new ones). No upstream issue found."""
    return dataset._fingerprint


# --- private hooks and attributes our subclasses override or set (they live in their classes) ---
OVERRIDDEN: tuple[tuple[str, str, str], ...] = (
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_save_checkpoint",
        "peft_lightning/callbacks/checkpoint.py ResumableCheckpoint._save_checkpoint (refuses non-finite weights, "
        "records the best checkpoint's epoch and step)",
    ),
    (
        "lightning.pytorch.loggers.csv_logs.ExperimentWriter",
        "_check_log_dir_exists",
        "peft_lightning/output/run_folder.py _ContinuedMetrics (continues metrics.csv instead of deleting it; it also reads "
        "the writer's `_fs`)",
    ),
    (
        "lightning.pytorch.loggers.CSVLogger",
        "_experiment",
        "peft_lightning/output/run_folder.py RunCSVLogger.experiment (builds _ContinuedMetrics as Lightning's property "
        "builds its writer, through `_experiment` and `_fs`)",
    ),
    (
        "lightning.pytorch.cli.LightningCLI",
        "_parse_ckpt_path",
        "peft_lightning/cli/lightning_cli.py PeftLightningCLI._parse_ckpt_path, a thin call into "
        "cli/resume.py config_from_checkpoint (fills the model's and --peft.* arguments from the checkpoint; no "
        "public hook runs between parsing and Lightning's own checkpoint read)",
    ),
)
"""(class, private name, where ours overrides or sets it): checked by ``tests/test_internals.py``."""

MIRRORED: tuple[tuple[str, str, str], ...] = (
    (
        "lightning.pytorch.trainer.connectors.checkpoint_connector._CheckpointConnector",
        "_hpc_resume_path",
        "peft_lightning/model_files/checkpoints.py find_resume (finds the highest hpc_ckpt_N.ckpt in a run folder, as "
        "Lightning does for `ckpt_path='hpc'`)",
    ),
)
"""(class, private name, where ours repeats what it does): checked by ``tests/test_internals.py``."""
