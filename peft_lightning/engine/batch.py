"""The global batch of a run and the learning rate that follows it: effective batch = per-device batch x devices
x nodes x gradient accumulation, and the factor of ``--model.scale_lr linear|sqrt`` relative to the batch a
recipe's learning rate was tuned at."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

ScaleLR = Literal["none", "linear", "sqrt"]


@dataclass(frozen=True)
class GlobalBatch:
    """Samples per optimizer step across the whole run."""

    per_device: int
    devices: int
    nodes: int
    accumulate: int

    @property
    def size(self) -> int:
        return self.per_device * self.devices * self.nodes * self.accumulate

    def __str__(self) -> str:
        return (
            f"{self.size} = {self.per_device} per device x {self.devices} device{'s' * (self.devices != 1)} x "
            f"{self.nodes} node{'s' * (self.nodes != 1)} x {self.accumulate} accumulated"
        )


def per_device_batch(datamodule: Any) -> int | None:
    """The training batch size of one process: the datamodule's ``batch_size`` (a hyperparameter or an attribute;
    any LightningDataModule may be attached, or none)."""
    hp = getattr(datamodule, "hparams", None)
    size = hp.get("batch_size") if hp is not None and hasattr(hp, "get") else getattr(datamodule, "batch_size", None)
    return int(size) if size else None


def global_batch(trainer: Trainer, datamodule: Any = None) -> GlobalBatch | None:
    """Per-device batch x devices x nodes x gradient accumulation of ``trainer`` (None if the batch is unknown), the
    batch read from ``datamodule`` (default: the trainer's)."""
    size = per_device_batch(datamodule if datamodule is not None else trainer.datamodule)
    if size is None:
        return None
    return GlobalBatch(size, int(trainer.num_devices), int(trainer.num_nodes), int(trainer.accumulate_grad_batches))


def lr_scale(rule: ScaleLR, batch: int, reference: int) -> float:
    """The learning-rate factor for a global ``batch`` when the recipe's LR was tuned at ``reference``:
    ``linear`` (Goyal et al. 2017, for SGD), ``sqrt`` (Krizhevsky 2014; the usual choice for Adam/AdamW) or
    ``none``.

    Example:
        >>> lr_scale("linear", 512, 128), lr_scale("sqrt", 512, 128)
        (4.0, 2.0)
    """
    if rule == "none":
        return 1.0
    if batch < 1 or reference < 1:
        raise UsageError(f"cannot scale the learning rate: global batch {batch}, reference batch {reference}")
    if rule == "linear":
        return batch / reference
    if rule == "sqrt":
        return math.sqrt(batch / reference)
    raise UsageError(f"unknown scale_lr {rule!r}: use none, linear or sqrt")
