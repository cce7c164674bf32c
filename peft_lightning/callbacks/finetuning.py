"""Selective freezing, gradual unfreezing, layer-wise learning rates and evaluation-driven re-tuning rounds.

One callback for every domain. It relies only on the task protocol of ``FineTuneTask``: ``layer_groups()``
(ordered from the input side to the head), ``layer_lr_scales``, ``phase_lr_scale`` and ``schedule_epochs``, which
the task's LR schedule reads live. Design choices that make it correct where older callbacks broke:

- every parameter is in the optimizer from the first step (frozen ones get no gradient), so an unfreeze never
  adds param groups and the LR scheduler never sees its groups change;
- freezing is applied in ``on_fit_start``, after DDP has wrapped the model with every parameter registered, and
  DDP is switched to ``find_unused_parameters``: a group unfrozen later is all-reduced like any other, so
  replicas stay identical;
- which groups train is a function of the epoch (or of the re-tuning round kept in ``state_dict``), so a run
  resumed from any checkpoint trains exactly what an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from peft_lightning.callbacks.checkpoint import between_epochs
from peft_lightning.callbacks.feature_cache import FeatureCache
from peft_lightning.errors import UsageError

log = logging.getLogger(__name__)

Strategy = Literal["full", "head", "freeze_unfreeze", "gradual", "milestones", "retune"]


@dataclass
class Milestone:
    """From ``epoch`` on, the top ``groups`` layer groups train, at ``lr_scale`` times the scheduled LR."""

    epoch: int
    groups: int
    lr_scale: float = 1.0


class FineTuning(Callback):
    """Which layer groups train, when, and at which learning rate.

    Args:
        strategy: ``full`` trains everything; ``head`` only the top ``head_groups`` groups; ``freeze_unfreeze``
            the head until ``unfreeze_at_epoch``, then the top ``unfreeze_groups`` groups (all if None);
            ``gradual`` adds one more group from the top every ``unfreeze_every`` epochs (ULMFiT);
            ``milestones`` follows ``milestones``; ``retune`` runs evaluation-driven rounds (see below).
        head_groups: how many groups from the top count as the head (what trains first).
        unfreeze_at_epoch: epoch at which ``freeze_unfreeze`` unfreezes (and ``gradual`` starts unfreezing).
        unfreeze_groups: groups from the top trained after the unfreeze; None means all.
        unfreeze_every: epochs between two unfreezes in ``gradual``.
        milestones: for ``milestones``: a list of ``{epoch, groups, lr_scale}``; before the first, the head trains.
        lr_decay: layer-wise LR decay: the i-th group from the top trains at ``lr * lr_decay**i``.
        train_bn: keep BatchNorm layers of frozen groups in training mode (updating running stats).
        monitor: metric that ends a ``retune`` round; default: the task's ``monitor`` (e.g. ``val/acc``).
        mode: ``max`` or ``min`` for ``monitor``; default: the task's ``monitor_mode``.
        patience: ``retune``: epochs without an improvement of more than ``min_delta`` that end a round.
        min_delta: ``retune``: the smallest change that counts as an improvement.
        round_epochs: ``retune``: most epochs in one round; each round's LR schedule spans this many epochs.
        retune_groups: ``retune``: groups unfrozen at the start of each new round.
        retune_lr_scale: ``retune``: LR multiplier applied once more in each new round (e.g. 0.5 halves it).
        max_rounds: ``retune``: most rounds; None: until nothing is left to unfreeze or a round brings nothing.
        cache_features: while only the head trains, compute the frozen part's outputs once per training sample
            and train the head on them (epochs after the first skip the backbone). Needs deterministic training
            inputs (e.g. ``--data.augment false``) and a task that supports it; dropped the moment anything below
            the head unfreezes.
        show_groups: print the layer groups with their parameter counts and LR scales; the CLI then exits.

    In ``retune``, round 0 trains the head. When the monitored metric stops improving, the best weights are
    restored, ``retune_groups`` more groups unfreeze, and the next round starts with a fresh optimizer and LR
    schedule. The run stops when a round fails to beat the best by ``min_delta``, nothing is left to unfreeze, or
    ``max_rounds`` is reached; the final weights are the best seen, and a table of the rounds is printed.

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
        milestones: list[Milestone] | None = None,
        lr_decay: float = 1.0,
        train_bn: bool = False,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 1,
        min_delta: float = 0.0,
        round_epochs: int = 3,
        retune_groups: int = 1,
        retune_lr_scale: float = 1.0,
        max_rounds: int | None = None,
        cache_features: bool = False,
        show_groups: bool = False,
    ) -> None:
        if min(head_groups, unfreeze_every, patience, round_epochs, retune_groups) < 1 or unfreeze_at_epoch < 0:
            raise UsageError("head_groups, unfreeze_every, patience, round_epochs and retune_groups must be >= 1, "
                             "unfreeze_at_epoch >= 0")
        if unfreeze_groups is not None and unfreeze_groups < 1:
            raise UsageError(f"unfreeze_groups must be >= 1 or None, got {unfreeze_groups}")
        if not 0 < lr_decay <= 1 or retune_lr_scale <= 0:
            raise UsageError(f"lr_decay must be in (0, 1] and retune_lr_scale > 0, got {lr_decay}, {retune_lr_scale}")
        if strategy == "milestones" and not milestones:
            raise UsageError("strategy 'milestones' needs --finetuning.milestones, e.g. "
                             "'[{epoch: 0, groups: 1}, {epoch: 2, groups: 4, lr_scale: 0.5}]'")
        self.strategy = strategy
        self.head_groups = head_groups
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_groups = unfreeze_groups
        self.unfreeze_every = unfreeze_every
        self.milestones = sorted((m if isinstance(m, Milestone) else Milestone(**m) for m in milestones or []),
                                 key=lambda m: m.epoch)
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.round_epochs = round_epochs
        self.retune_groups = retune_groups
        self.retune_lr_scale = retune_lr_scale
        self.max_rounds = max_rounds
        self.cache_features = cache_features
        self.show_groups = show_groups
        self._trainable: int | None = None  # groups from the top that train now (for logging changes)
        self._round_started = time.perf_counter()
        # retune state, all of it in `state_dict` so a resumed run continues the same round
        self.round = 0
        self.round_groups = head_groups
        self.round_epochs_done = 0
        self.bad_epochs = 0
        self.best: float | None = None
        self.round_best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.pending: Literal["next", "stop"] | None = None
        self.history: list[dict[str, Any]] = []
        self.round_seconds = 0.0

    # --- the schedule ---
    def trainable_top_groups(self, epoch: int, n_groups: int) -> int:
        """How many groups, counted from the top, train in ``epoch`` (for ``retune``: in the current round)."""
        if self.strategy == "full":
            return n_groups
        if self.strategy == "retune":
            return min(self.round_groups, n_groups)
        if self.strategy == "milestones":
            active = [m for m in self.milestones if m.epoch <= epoch]
            return min(active[-1].groups if active else self.head_groups, n_groups)
        if self.strategy == "head" or epoch < self.unfreeze_at_epoch:
            return min(self.head_groups, n_groups)
        if self.strategy == "freeze_unfreeze":
            return min(self.unfreeze_groups or n_groups, n_groups)
        steps = (epoch - self.unfreeze_at_epoch) // self.unfreeze_every + 1  # gradual
        return min(self.head_groups + steps, self.unfreeze_groups or n_groups, n_groups)

    def phase_lr_scale(self, epoch: int) -> float:
        if self.strategy == "milestones":
            active = [m for m in self.milestones if m.epoch <= epoch]
            return active[-1].lr_scale if active else 1.0
        if self.strategy == "retune":
            return self.retune_lr_scale ** self.round
        return 1.0

    def apply(self, pl_module: LightningModule, epoch: int) -> list[str]:
        """Set ``requires_grad`` and the phase LR scale for ``epoch``; returns the names of the groups that train."""
        groups = pl_module.layer_groups()
        k = self.trainable_top_groups(epoch, len(groups))
        params = dict(pl_module.named_parameters())
        # With adapters, the task names what may ever train (adapters and head): frozen base weights stay frozen.
        allowed = getattr(pl_module, "trainable_parameter_names", lambda: None)()
        for i, (_, names) in enumerate(groups):
            for n in names:
                if n in params:
                    params[n].requires_grad_(i >= len(groups) - k and (allowed is None or n in allowed))
        pl_module.phase_lr_scale = self.phase_lr_scale(epoch)
        train_names = [name for name, _ in groups[len(groups) - k:]]
        if self.cache_features:
            head_only = k == 1 and getattr(pl_module, "supports_feature_cache", False)
            if not head_only:
                pl_module.feature_cache = None  # invalidated: the frozen part is about to change
            elif getattr(pl_module, "feature_cache", None) is None:
                pl_module.feature_cache = FeatureCache()
        if k != self._trainable:
            if self._trainable is not None:
                rank_zero_info(f"epoch {epoch}: training {k}/{len(groups)} layer groups: {', '.join(train_names)}")
            self._trainable = k
        return train_names

    def _freeze_bn(self, pl_module: LightningModule) -> None:
        """BatchNorm layers of frozen groups keep their running statistics (eval mode); those of training groups,
        including groups just unfrozen, update them (train mode), as in a run that never stopped."""
        if self.train_bn or not pl_module.training:
            return
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                ps = list(module.parameters(recurse=False))
                if ps:
                    module.train(any(p.requires_grad for p in ps))

    # --- hooks ---
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "layer_groups"):
            raise TypeError(f"{type(pl_module).__name__} has no layer_groups(): FineTuning needs a FineTuneTask")
        groups = pl_module.layer_groups()
        # Layer-wise LR decay: the head trains at lr, the group below at lr*decay, and so on.
        pl_module.layer_lr_scales = {name: self.lr_decay ** i for i, (name, _) in enumerate(reversed(groups))}
        self.monitor = self.monitor or getattr(pl_module, "monitor", "val/loss")
        self.mode = self.mode or getattr(pl_module, "monitor_mode", "min")
        if self.strategy == "retune":
            pl_module.schedule_epochs = self.round_epochs
        if self.cache_features and stage == "fit":
            dm = trainer.datamodule
            if not getattr(pl_module, "supports_feature_cache", False):
                raise UsageError(f"{type(pl_module).__name__} does not support feature caching: "
                                 "drop --finetuning.cache_features")
            if dm is None or not getattr(dm, "deterministic_train", False):
                raise UsageError("feature caching needs deterministic training inputs (no random augmentation): "
                                 "pass --data.augment false, or drop --finetuning.cache_features")
        # A group unfrozen after DDP wrapped the model must still be all-reduced: DDP registers every parameter
        # (nothing is frozen yet, see on_fit_start) and tolerates the ones that get no gradient.
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and self.strategy != "full":
            ddp_kwargs["find_unused_parameters"] = True
        kind = type(trainer.strategy).__name__
        if kind.startswith("DeepSpeed") and self.strategy != "full":
            raise UsageError("FineTuning cannot freeze or unfreeze layer groups under DeepSpeed (its optimizer "
                             "partitions only the parameters trainable at start): use --trainer.strategy fsdp or ddp")
        if kind.startswith("FSDP") and self.strategy != "full":
            # FSDP flattens each wrapped block's parameters into one; `use_orig_params` keeps requires_grad per
            # original parameter, so a block may hold frozen and trainable weights and unfreeze later.
            trainer.strategy.kwargs["use_orig_params"] = True

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)
        self._round_started = time.perf_counter()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A checkpoint is restored after `on_fit_start` (which saw epoch 0), and a run resumed mid-epoch gets no
        # `on_train_epoch_start` for that epoch: apply the restored epoch's groups here.
        self.apply(pl_module, trainer.current_epoch)
        self._freeze_bn(pl_module)
        if self.pending == "stop" and between_epochs(trainer):  # else at the restored epoch's end (see below)
            trainer.should_stop = True

    @property
    def stop_reason(self) -> str | None:
        """Why this callback stopped the run (``retune``: its last round ended), or None."""
        return "its re-tuning rounds are done" if self.strategy == "retune" and self.pending == "stop" else None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending == "next":
            self._next_round(trainer, pl_module)
        self.apply(pl_module, trainer.current_epoch)
        self._freeze_bn(pl_module)
        self._refresh_lrs(trainer)

    @staticmethod
    def _refresh_lrs(trainer: Trainer) -> None:
        # LambdaLR recomputes LRs only when it steps; a new phase scale must hold from the phase's first step.
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending == "stop":  # Lightning does not save `should_stop`: a resumed run whose rounds ended stops
            trainer.should_stop = True

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.strategy != "retune" or trainer.sanity_checking or self.pending == "stop":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(f"retune monitors {self.monitor!r}, which was not logged; logged: "
                           f"{', '.join(trainer.callback_metrics)}: pass --finetuning.monitor NAME")
        value = float(value)
        sign = 1.0 if self.mode == "max" else -1.0
        self.round_epochs_done += 1
        if self.round_best is None or sign * (value - self.round_best) > self.min_delta:
            self.round_best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.best is None or sign * (value - self.best) > 0:
            self.best = value
            # Only what training changes (with adapters: not the frozen base), so checkpoints stay adapter-sized.
            state = getattr(pl_module, "trainable_state_dict", pl_module.state_dict)()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if self.bad_epochs < self.patience and self.round_epochs_done < self.round_epochs:
            return
        n_groups = len(pl_module.layer_groups())
        improved = (self.round == 0 or not self.history
                    or sign * (self.round_best - self.history[-1]["best"]) > self.min_delta)
        self._close_round(pl_module)
        exhausted = self.round_groups >= n_groups or (self.max_rounds is not None and self.round + 1 >= self.max_rounds)
        if not improved or exhausted:
            self.pending = "stop"
            self._restore_best(pl_module)
            trainer.should_stop = True
        else:
            self.pending = "next"

    def _close_round(self, pl_module: LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.round_seconds += time.perf_counter() - self._round_started
        self.history.append({"round": self.round, "groups": self.round_groups, "trainable": trainable,
                             "best": self.round_best, "epochs": self.round_epochs_done,
                             "seconds": round(self.round_seconds, 1)})

    def _restore_best(self, pl_module: LightningModule) -> None:
        if self.best_state is not None:
            # With adapters the frozen base is left out of best_state on purpose: only then is a partial load fine.
            partial = getattr(pl_module, "trainable_parameter_names", lambda: None)() is not None
            pl_module.load_state_dict(self.best_state, strict=not partial)

    def _next_round(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_best(pl_module)
        self.round += 1
        self.round_groups += self.retune_groups
        self.round_epochs_done = self.bad_epochs = 0
        self.round_best = None
        self.round_seconds = 0.0
        self._round_started = time.perf_counter()
        self.pending = None
        self.apply(pl_module, trainer.current_epoch)
        # A fresh optimizer and LR schedule for the round (same named groups: nothing else changes shape).
        trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(f"retune round {self.round}: {self.round_groups} groups train, "
                       f"LR x{pl_module.phase_lr_scale:g}, from the best weights ({self.monitor} {self.best:.4f})")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.strategy != "retune":
            return
        if self.pending is None and self.round_epochs_done:  # max_epochs ended the run mid-round
            self._close_round(pl_module)
            self._restore_best(pl_module)
        if self.history and trainer.is_global_zero:
            print(self.round_table())

    def round_table(self) -> str:
        lines = [f"{'round':>5} {'groups':>6} {'trainable':>12} {'best ' + (self.monitor or ''):>14} {'epochs':>6} "
                 f"{'wall s':>7}"]
        for r in self.history:
            best = "-" if r["best"] is None or math.isnan(r["best"]) else f"{r['best']:.4f}"
            lines.append(f"{r['round']:>5} {r['groups']:>6} {r['trainable']:>12,} {best:>14} {r['epochs']:>6} "
                         f"{r['seconds']:>7.1f}")
        return "\n".join(lines)

    def print_groups(self, pl_module: LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        groups = pl_module.layer_groups()
        print(f"{'group':<24}{'params':>14}  lr scale")
        for i, (name, names) in enumerate(groups):
            count = sum(params[n].numel() for n in names if n in params)
            print(f"{name:<24}{count:>14,}  {self.lr_decay ** (len(groups) - 1 - i):.3g}")

    _STATE = ("round", "round_groups", "round_epochs_done", "bad_epochs", "best", "round_best", "best_state",
              "pending", "history", "round_seconds")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in self._STATE:
            if k in state_dict:
                setattr(self, k, state_dict[k])
