"""Every private name of another library that peft_lightning uses (``peft_lightning/internals.py``) still exists,
on the real classes or a tiny real Trainer: an upgrade that removes one fails here, naming the function to update,
not somewhere inside a resumed run. Also: the public replacements of hand-written helpers give the same answers."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from peft_lightning import internals


def _trainer(tmp_path: Path) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _fit_loop(tmp_path: Path) -> Any:
    return _trainer(tmp_path).fit_loop


def _csv_logger(tmp_path: Path) -> Any:
    return CSVLogger(save_dir=str(tmp_path), name="", version="")


def _csv_writer(tmp_path: Path) -> Any:
    return _csv_logger(tmp_path).experiment


def _datasets_dataset(tmp_path: Path) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"a": [1, 2]})


# (library, how to build a real object that has it, private name, the internals function that uses it)
PRIVATE: list[tuple[str, Callable[[Path], Any], str, str]] = [
    ("lightning", _fit_loop, "_combined_loader_states_to_load", "resume_loader_position"),
    ("lightning", _fit_loop, "_combined_loader", "resume_loader_position"),
    ("lightning", _fit_loop, "_data_fetcher", "resume_loader_position"),
    ("lightning", _fit_loop, "_load_combined_loader_states", "resume_loader_position"),
    ("lightning", lambda _: ModelCheckpoint(), "_save_last_checkpoint", "save_last_checkpoint"),
    ("lightning", lambda _: ModelCheckpoint(), "_monitor_candidates", "save_last_checkpoint"),
    ("lightning", lambda _: ModelCheckpoint(), "_should_save_on_train_epoch_end", "saves_on_train_epoch_end"),
    ("lightning", lambda _: ModelCheckpoint(), "_last_global_step_saved", "last_global_step_saved"),
    ("lightning", lambda _: DDPStrategy(), "_ddp_kwargs", "ddp_kwargs"),
    ("lightning", lambda _: BoringModel(), "_trainer", "attached_trainer"),
    ("torch", lambda _: nn.modules.batchnorm, "_BatchNorm", "BatchNorm"),
    ("torch", lambda _: nn.Linear(1, 1), "_compiled_call_impl", "is_compiled"),
    ("torch", lambda _: torch.zeros(1), "_version", "tensor_version"),
    ("datasets", _datasets_dataset, "_fingerprint", "dataset_fingerprint"),
    ("lightning", _csv_logger, "_experiment", "OVERRIDDEN (RunCSVLogger.experiment)"),
    ("lightning", _csv_logger, "_fs", "OVERRIDDEN (RunCSVLogger.experiment)"),
    ("lightning", _csv_writer, "_fs", "OVERRIDDEN (_ContinuedMetrics)"),
]


def _version(library: str) -> str:
    return importlib.import_module(library).__version__


@pytest.mark.parametrize(
    "library, build, name, user", PRIVATE, ids=[f"{user.split(' ')[0]}-{name}" for _, _, name, user in PRIVATE]
)
def test_each_private_name_still_exists(tmp_path, library, build, name, user):
    assert hasattr(build(tmp_path), name), (
        f"{library} {_version(library)} removed `{name}`: peft_lightning/internals.py `{user}` needs updating "
        f"(written for {library} {internals.WRITTEN_FOR[library]})"
    )


@pytest.mark.parametrize(
    "owner, name, where",
    [*internals.OVERRIDDEN, *internals.MIRRORED],
    ids=[f"{o.rsplit('.', 1)[1]}.{n}" for o, n, _ in (*internals.OVERRIDDEN, *internals.MIRRORED)],
)
def test_each_private_hook_we_override_or_mirror_still_exists(owner, name, where):
    module, _, cls_name = owner.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    members = dict(inspect.getmembers(cls))
    # `_experiment` is an instance attribute (checked above on a real CSVLogger); the rest are class members.
    if name != "_experiment":
        assert name in members, (
            f"lightning {lightning.__version__} removed `{cls_name}.{name}`: {where} needs updating (see "
            f"peft_lightning/internals.py, written for lightning {internals.WRITTEN_FOR['lightning']})"
        )


def test_cli_hparam_keys_are_still_lightnings():
    source = inspect.getsource(importlib.import_module("lightning.pytorch.cli"))
    for key in internals.CLI_HPARAM_KEYS:
        assert f'"{key}"' in source, (
            f"lightning {lightning.__version__} no longer saves `{key}` in a model's hyperparameters: "
            "peft_lightning/internals.py `CLI_HPARAM_KEYS` needs updating"
        )


def test_the_wrappers_do_what_the_private_names_did(tmp_path):
    trainer = _trainer(tmp_path)
    model = BoringModel()
    assert internals.attached_trainer(model) is None
    model.trainer = trainer
    assert internals.attached_trainer(model) is trainer
    assert internals.ddp_kwargs(DDPStrategy(find_unused_parameters=False)) == {"find_unused_parameters": False}
    assert internals.ddp_kwargs(trainer.strategy) is None  # not DDP
    assert issubclass(nn.BatchNorm2d, internals.BatchNorm) and issubclass(nn.SyncBatchNorm, internals.BatchNorm)
    assert not issubclass(nn.LayerNorm, internals.BatchNorm)
    layer = nn.Linear(2, 2)
    assert not internals.is_compiled(layer)
    layer.compile(backend="eager")
    assert internals.is_compiled(layer)
    weight = torch.zeros(3)
    before = internals.tensor_version(weight)
    weight.add_(1)
    assert internals.tensor_version(weight) > before
    callback = ModelCheckpoint()
    internals.set_last_global_step_saved(callback, 7)
    assert internals.last_global_step_saved(callback) == 7


def test_find_resume_finds_the_hpc_checkpoint_lightning_would(tmp_path):
    from peft_lightning.model_files.checkpoints import find_resume

    for n in (2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    trainer = _trainer(tmp_path)
    lightnings = trainer._checkpoint_connector._hpc_resume_path
    assert Path(lightnings).name == "hpc_ckpt_10.ckpt"
    assert find_resume(tmp_path) == Path(lightnings)


# --- public replacements of hand-written helpers ---
def test_samples_in_counts_every_batch_format_of_the_domains():
    from transformers import BatchEncoding

    from peft_lightning.output.report import samples_in

    vision = {"pixel_values": torch.zeros(5, 3, 8, 8), "labels": torch.zeros(5), "index": torch.arange(5)}
    cached = {"index": torch.arange(4), "labels": torch.zeros(4)}  # a prefix-cache epoch
    text = BatchEncoding({"input_ids": torch.zeros(6, 9), "attention_mask": torch.ones(6, 9), "labels": torch.zeros(6)})
    recsys = {
        "users": torch.arange(7),
        "items": torch.arange(7),
        "history": torch.zeros(7, 40, dtype=torch.bool),
        "negatives": torch.zeros(7, 4),
    }
    pair = (torch.zeros(3, 2), torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning warns when a batch's tensors disagree on its size: none here
        assert [samples_in(b) for b in (vision, cached, text, recsys, pair)] == [5, 4, 6, 7, 3]
    assert samples_in({"note": "no tensors"}) == 0


def test_final_line_is_the_line_the_cli_printed():
    """The result line's format; that the CLI prints this very line is test_run_output's
    test_the_summary_prints_every_field_and_the_run_folder."""
    from peft_lightning.output.summary import final_line

    line = final_line("vit_cifar", {"test/acc": 0.5, "test/loss": 1.0}, None, 61, "runs/x/best.ckpt")
    assert line == "vit_cifar: test/acc 0.5000  wall 1m01s  (best checkpoint runs/x/best.ckpt)"
    best = {"metric": "val/acc", "value": 0.25}
    assert (
        final_line("r", {}, best, 5, interrupted=True)
        == "r: best val/acc 0.2500  wall 0m05s  (final weights)  (interrupted)"
    )
