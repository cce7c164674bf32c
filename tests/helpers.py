"""Small training harness shared by the callback tests: a tiny timm ViT on a synthetic image folder."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.data.vision import ImageDataModule
from peft_lightning.tasks.vision import ImageClassifier

SEED = 7


def tiny_model(**kw) -> ImageClassifier:
    seed_everything(SEED)
    return ImageClassifier("test_vit", num_classes=3, pretrained=False, **{"lr": 1e-2, **kw})


def tiny_data(folder: Path, **kw) -> ImageDataModule:
    # augment=False: training batches are deterministic, so runs can be compared weight for weight.
    return ImageDataModule(str(folder), **{"batch_size": 8, "num_workers": 0, "augment": False, "seed": SEED, **kw})


class PhaseRecorder(Callback):
    """Which layer groups changed during each epoch, and the LR of each named group at its start."""

    def __init__(self) -> None:
        self.changed: list[list[str]] = []
        self.lrs: list[dict[str, float]] = []

    def _snap(self, m):
        return {g: [p.detach().clone() for n, p in m.named_parameters() if n in names] for g, names in m.layer_groups()}

    def on_train_epoch_start(self, trainer, pl_module):
        self._before = self._snap(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_epoch_end(self, trainer, pl_module):
        after = self._snap(pl_module)
        self.changed.append([g for g in after if any(not torch.equal(a, b) for a, b in zip(after[g], self._before[g]))])


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def train(folder: Path, finetuning: FineTuning, epochs: int, *, root: Path | None = None, extra=(), ckpt_path=None,
          model_kw=None, limit_val_batches: int | float = 1.0, logger=False):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = tiny_model(**(model_kw or {}))
    callbacks = [finetuning, *extra]
    if root is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, save_last=True))
    trainer = Trainer(max_epochs=epochs, logger=logger, enable_checkpointing=root is not None,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                      limit_val_batches=limit_val_batches, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, tiny_data(folder), ckpt_path=ckpt_path)
    return model, trainer


def tiny_cli_args(dataset: Path, root: Path, *extra: str, recipe: str = "vit_cifar") -> list[str]:
    """``fit`` of a tiny random EfficientNet (3 classes, 32 px, batch 4, a fifth of the folder for validation, fp32,
    no progress bar, no test after fit) on an image folder, for tests that drive the CLI; ``extra`` flags go last
    (a later flag wins)."""
    return ["fit", "--recipe", recipe, "--model.model_name", "test_efficientnet", "--model.pretrained", "false",
            "--model.num_classes", "3", "--data.dataset", str(dataset), "--data.image_size", "32",
            "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_fraction", "0.2",
            "--trainer.precision", "32-true", "--trainer.accumulate_grad_batches", "1", "--test_after_fit", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra]
