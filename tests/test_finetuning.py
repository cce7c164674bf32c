"""The FineTuning callback: which groups train when, at which LR; on a tiny timm ViT."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import BUILTIN, FreezeUnfreeze
from peft_lightning.data.vision import ImageDataModule
from peft_lightning.tasks.vision import ImageClassifier


def snapshot(model):
    return {
        name: [p.detach().clone() for n, p in model.named_parameters() if n in names]
        for name, names in model.layer_groups()
    }


def changed(before, model):
    after = snapshot(model)
    return [g for g in before if any(not torch.equal(a, b) for a, b in zip(before[g], after[g]))]


def fit(image_folder, callback, epochs=1, **trainer_kw):
    model = ImageClassifier("test_vit", num_classes=3, pretrained=False, lr=1e-2)
    dm = ImageDataModule(str(image_folder), batch_size=8, num_workers=0)
    dm.connect(**model.data_needs())
    before = snapshot(model)
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        **trainer_kw,
    )
    trainer.fit(model, dm)
    return model, before, trainer


@pytest.mark.parametrize(
    "epoch, strategy, kw, expected",
    [
        (0, "full", {}, 8),
        (5, "head", {}, 1),
        (0, "freeze_unfreeze", {"at_epoch": 2}, 1),
        (2, "freeze_unfreeze", {"at_epoch": 2}, 8),
        (2, "freeze_unfreeze", {"groups": 3}, 3),
        (0, "gradual", {}, 1),
        (1, "gradual", {}, 2),
        (3, "gradual", {"every": 2}, 3),
        (50, "gradual", {}, 8),
        (50, "gradual", {"groups": 4}, 4),
    ],
)
def test_schedule(epoch, strategy, kw, expected):
    groups = ["stem", *[f"blocks.{i}" for i in range(6)], "head"]
    chosen = FineTuning(BUILTIN[strategy](**kw)).phase(epoch, groups).groups
    assert chosen == groups[-expected:]  # the top `expected` groups


def test_head_only_trains_only_the_head(image_folder):
    model, before, _ = fit(image_folder, FineTuning("head"))
    assert changed(before, model) == ["head"]


def test_freeze_unfreeze_trains_top_groups_after_the_unfreeze(image_folder):
    model, before, _ = fit(image_folder, FineTuning(FreezeUnfreeze(at_epoch=1, groups=3)), epochs=2)
    assert changed(before, model) == ["blocks.4", "blocks.5", "head"]


def test_layer_wise_lr_decay_names_each_group(image_folder, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    monitor = LearningRateMonitor()
    model = ImageClassifier("test_vit", num_classes=3, pretrained=False, lr=1e-2, scheduler="constant")
    dm = ImageDataModule(str(image_folder), batch_size=8, num_workers=0)
    dm.connect(**model.data_needs())
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FineTuning("full", lr_decay=0.5), monitor],
    )
    trainer.fit(model, dm)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["head"] == pytest.approx(1e-2) and lrs["blocks.5"] == pytest.approx(5e-3)
    assert lrs["stem"] == pytest.approx(1e-2 * 0.5**7)
    assert any(k.endswith("/blocks.5") for k in monitor.lrs)


def test_frozen_batchnorm_stays_in_eval_mode(image_folder):
    model = ImageClassifier("resnet10t", num_classes=3, pretrained=False)
    dm = ImageDataModule(str(image_folder), image_size=32, batch_size=8, num_workers=0)
    dm.connect(**model.data_needs())
    stem_bn = model.model.bn1
    running = stem_bn.running_mean.clone()
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FineTuning("head")],
    )
    trainer.fit(model, dm)
    assert torch.equal(running, stem_bn.running_mean)  # frozen: statistics untouched


def test_batchnorm_of_an_unfrozen_group_updates_its_statistics_again(image_folder):
    """freeze_unfreeze: the stem's BatchNorm keeps its statistics while frozen (epoch 0, with a validation between
    the epochs) and updates them once its group trains (epoch 1), as a run resumed at epoch 1 would."""
    model = ImageClassifier("resnet10t", num_classes=3, pretrained=False)
    dm = ImageDataModule(str(image_folder), image_size=32, batch_size=8, num_workers=0)
    dm.connect(**model.data_needs())
    stem_bn = model.model.bn1
    seen: list[bool] = []

    class Modes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(stem_bn.training)

    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FineTuning(FreezeUnfreeze(at_epoch=1)), Modes()],
    )
    trainer.fit(model, dm)
    assert seen == [False, False, True, True]
    assert int(stem_bn.num_batches_tracked) == 2
