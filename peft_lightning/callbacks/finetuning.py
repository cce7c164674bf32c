"""Selective freezing, gradual unfreezing and layer-wise learning rates, for any task with layer groups.

The callback relies only on the task protocol of ``FineTuneTask``: ``layer_groups()`` (ordered from the input
side to the head) and ``layer_lr_scales``. Which groups train is a pure function of the epoch, so a run resumed
from any checkpoint trains exactly the groups an uninterrupted run would.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

log = logging.getLogger(__name__)

Strategy = Literal["full", "head", "freeze_unfreeze", "gradual"]


class FineTuning(Callback):
    """Which layer groups train, when, and at which learning rate.

    Args:
        strategy: ``full`` trains everything; ``head`` only the top ``head_groups`` groups; ``freeze_unfreeze``
            the head until ``unfreeze_at_epoch``, then the top ``unfreeze_groups`` groups (all if None);
            ``gradual`` adds one more group from the top every ``unfreeze_every`` epochs (ULMFiT).
        head_groups: how many groups from the top count as the head.
        unfreeze_at_epoch: epoch at which ``freeze_unfreeze`` unfreezes (and ``gradual`` starts unfreezing).
        unfreeze_groups: groups from the top trained after the unfreeze; None means all.
        unfreeze_every: epochs between two unfreezes in ``gradual``.
        lr_decay: layer-wise LR decay: the i-th group from the top trains at ``lr * lr_decay**i``.
        train_bn: keep BatchNorm layers of frozen groups in training mode (updating running stats).
        show_groups: print the layer groups with their parameter counts and stop before training.

    Example:
        >>> trainer = Trainer(callbacks=[FineTuning("freeze_unfreeze", unfreeze_at_epoch=1)])  # doctest: +SKIP
    """

    def __init__(
        self,
        strategy: Strategy = "full",
        head_groups: int = 1,
        unfreeze_at_epoch: int = 1,
        unfreeze_groups: int | None = None,
        unfreeze_every: int = 1,
        lr_decay: float = 1.0,
        train_bn: bool = False,
        show_groups: bool = False,
    ) -> None:
        if head_groups < 1 or unfreeze_every < 1 or unfreeze_at_epoch < 0:
            raise ValueError("head_groups and unfreeze_every must be >= 1 and unfreeze_at_epoch >= 0")
        if unfreeze_groups is not None and unfreeze_groups < 1:
            raise ValueError(f"unfreeze_groups must be >= 1 or None, got {unfreeze_groups}")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        self.strategy = strategy
        self.head_groups = head_groups
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_groups = unfreeze_groups
        self.unfreeze_every = unfreeze_every
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.show_groups = show_groups
        self._trainable: int | None = None  # groups from the top trained now

    # --- the schedule ---
    def trainable_top_groups(self, epoch: int, n_groups: int) -> int:
        """How many groups, counted from the top, train in ``epoch``."""
        if self.strategy == "full":
            return n_groups
        if self.strategy == "head" or epoch < self.unfreeze_at_epoch:
            return min(self.head_groups, n_groups)
        if self.strategy == "freeze_unfreeze":
            return min(self.unfreeze_groups or n_groups, n_groups)
        steps = (epoch - self.unfreeze_at_epoch) // self.unfreeze_every + 1  # gradual
        return min(self.head_groups + steps, self.unfreeze_groups or n_groups, n_groups)

    def apply(self, pl_module: LightningModule, epoch: int) -> list[str]:
        """Set ``requires_grad`` for ``epoch``; returns the names of the groups that train."""
        groups = pl_module.layer_groups()
        k = self.trainable_top_groups(epoch, len(groups))
        params = dict(pl_module.named_parameters())
        train_names = [name for name, _ in groups[len(groups) - k:]]
        for i, (_, names) in enumerate(groups):
            trainable = i >= len(groups) - k
            for n in names:
                if n in params:
                    params[n].requires_grad_(trainable)
        if k != self._trainable:
            if self._trainable is not None:
                log.info("epoch %d: training %d/%d layer groups: %s", epoch, k, len(groups), ", ".join(train_names))
            self._trainable = k
        return train_names

    def _freeze_bn(self, pl_module: LightningModule) -> None:
        if self.train_bn:
            return
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                ps = list(module.parameters(recurse=False))
                if ps and not any(p.requires_grad for p in ps):
                    module.eval()

    # --- hooks ---
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "layer_groups"):
            raise TypeError(f"{type(pl_module).__name__} has no layer_groups(): FineTuning needs a FineTuneTask")
        groups = pl_module.layer_groups()
        if self.show_groups:
            self.print_groups(pl_module)
            trainer.should_stop = True
        # Layer-wise LR decay: the head trains at lr, the group below at lr*decay, and so on.
        pl_module.layer_lr_scales = {name: self.lr_decay ** i for i, (name, _) in enumerate(reversed(groups))}
        if stage == "fit":
            self.apply(pl_module, 0)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.show_groups:
            raise SystemExit(0)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)
        self._freeze_bn(pl_module)

    def print_groups(self, pl_module: LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        groups = pl_module.layer_groups()
        print(f"{'group':<24}{'params':>14}  lr scale")
        for i, (name, names) in enumerate(groups):
            count = sum(params[n].numel() for n in names if n in params)
            print(f"{name:<24}{count:>14,}  {self.lr_decay ** (len(groups) - 1 - i):.3g}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"trainable": self._trainable}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._trainable = state_dict.get("trainable")
