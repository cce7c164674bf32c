"""Selective freezing, gradual unfreezing, layer-wise learning rates and evaluation-driven re-tuning rounds.

One callback for every domain. Which groups train is decided by a strategy, one small class each
(``peft_lightning/callbacks/strategies.py``: the built-in ones, and how to write your own); this callback applies
its answer and keeps what a resume needs. What it needs from the task is one typed contract, checked once at
setup (``peft_lightning/contract.py``: ``layer_groups()`` from the input side to the head, ``lr_scales`` and
``schedule_epochs``, which the task's LR schedule reads live, the prefix split and cache ...). Design choices that
make it correct where older callbacks broke:

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
import re
import time
from typing import Any, Literal

import torch
from jsonargparse.typing import restricted_string_type
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from peft_lightning import internals, summary
from peft_lightning.callbacks import probe as gradient_probe
from peft_lightning.callbacks.caching import PrefixCaching
from peft_lightning.callbacks.checkpoint import between_epochs
from peft_lightning.callbacks.strategies import (
    BUILTIN,
    Auto,
    FreezeUnfreeze,
    Full,
    Gradual,
    Head,
    Milestone,
    Milestones,
    Phase,
    Retune,
    Selector,
    State,
    Strategy,
    import_strategy,
)
from peft_lightning.contract import check_task
from peft_lightning.errors import UsageError
from peft_lightning.tasks.schedules import refresh_lambda_lr

log = logging.getLogger(__name__)

STRATEGIES = ", ".join(BUILTIN)
STRATEGY_PATTERN = rf"^({'|'.join(BUILTIN)})$|^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
StrategyName = restricted_string_type("StrategyName", STRATEGY_PATTERN)
"""A built-in strategy's name or ``package.module:Class``: the CLI refuses anything else when it parses."""


class FineTuning(Callback):
    """Which layer groups train, when, and at which learning rate.

    Args:
        strategy: ``full`` trains everything; ``head`` only ``groups`` (default: the top ``head_groups``);
            ``freeze_unfreeze`` the head until ``unfreeze_at_epoch``, then ``groups`` (default: the top
            ``unfreeze_groups``, all if None); ``gradual`` adds one more group of those from the top every
            ``unfreeze_every`` epochs (ULMFiT); ``milestones`` follows ``milestones``; ``retune`` runs
            evaluation-driven rounds (see below); ``auto`` chooses from a gradient probe (``auto_*``); or
            ``package.module:Class``, a subclass of ``strategies.Strategy`` built with ``strategy_args``.
        groups: the layer groups the strategy works with: names, ranges and patterns (``[stem, blocks.0, head]``,
            ``blocks.4-6``, ``layer.*``) or a count from the top (``3``); the set may have holes.
            ``--finetuning.show_groups true`` lists the model's groups and what trains in each phase.
        strategy_args: keyword arguments of a ``package.module:Class`` strategy.
        head_groups: how many groups from the top count as the head (what trains first).
        unfreeze_at_epoch: epoch at which ``freeze_unfreeze`` unfreezes (and ``gradual`` starts unfreezing).
        unfreeze_groups: groups from the top trained after the unfreeze (when ``groups`` is not given); None: all.
        unfreeze_every: epochs between two unfreezes in ``gradual``.
        milestones: for ``milestones``: a list of ``{epoch, groups, lr_scale}`` (``groups``: a count from the top or
            selectors, e.g. ``[blocks.0, head]``); before the first, the head trains.
        lr_decay: layer-wise LR decay: the i-th group from the top trains at ``lr * lr_decay**i``.
        train_bn: keep BatchNorm layers of frozen groups in training mode (updating running stats; no caching).
        monitor: metric that ends a ``retune`` round; default: the task's ``monitor`` (e.g. ``val/acc``).
        mode: ``max`` or ``min`` for ``monitor``; default: the task's ``monitor_mode``.
        patience: ``retune``: epochs without an improvement of more than ``min_delta`` that end a round.
        min_delta: ``retune``: the smallest change that counts as an improvement.
        round_epochs: ``retune``: most epochs in one round; each round's LR schedule spans this many epochs.
        retune_groups: ``retune``: groups unfrozen at the start of each new round.
        retune_lr_scale: ``retune``: LR multiplier applied once more in each new round (e.g. 0.5 halves it).
        retune_order: ``retune``: which groups a new round unfreezes: the next ones from the top (``top``), or the
            frozen ones whose relative gradient norm is highest at the round's start (``rgn``: a probe each round).
        max_rounds: ``retune``: most rounds; None: until nothing is left to unfreeze or a round brings nothing.
        probe_batches: ``auto`` (and ``retune_order rgn``): training batches the gradient probe runs forward and
            backward to measure each group's gradient signal and relative gradient norm (``callbacks/probe.py``).
        auto_mode: ``depth`` (the default, the best on the mean in ``benchmarks.run choose``): the head trains alone
            for the first ``auto_lp`` of the steps (a linear probe), then the probe measures each group's gradient
            signal and the fewest top groups holding ``auto_coverage`` of the body's signal train, with the head
            (LP-FT with a measured depth); ``select``: the groups with the highest normalised RGN
            (``auto_threshold`` or ``auto_count``; the head always) train; ``scale``: every group trains at
            ``RGN / max(RGN)`` times its LR (Auto-RGN), re-measured every ``auto_every`` steps.
        auto_threshold: ``select``: the normalised RGN a group needs to train.
        auto_count: ``select``: train the ``auto_count`` groups of highest RGN instead of a threshold.
        auto_every: ``scale``: steps between two re-measurements of the LR scales (0: only the probe's).
        auto_lp: ``depth``: the share of the run's optimizer steps in which the head trains alone before the probe.
        auto_coverage: ``depth``: the share of the body's gradient signal the groups that train must hold.
        auto_floor: ``depth``: a body whose every group's signal is below this (the probe cannot tell the groups
            apart) trains every group after the linear probe (LP-FT).
        probe_after: ``auto``: training steps of the head alone before the probe (0: probe before the first step;
            ``depth``: 0 means ``auto_lp`` of the run).
        cache_features: keep the output of the frozen groups below the lowest one that trains, once per training
            example, and train the groups above from it: epochs after the first neither run the frozen layers nor
            read raw data (no decoding, resizing, tokenizing). Exact: frozen layers run in eval mode, and inputs
            must be deterministic (``--data.augment false``). Dropped and rebuilt when that group changes
            (an unfreeze). None (default): on where it is exact, fits in ``cache_max_gb`` and a later epoch of
            the same phase reads it; ``true``: wherever it is exact (on disk in the run folder beyond
            ``cache_max_gb``), refusing a run where it cannot be; ``false``: off.
        cache_max_gb: memory the cache may hold; default: a quarter of this machine's memory.
        frozen_dropout: keep dropout and stochastic depth active in frozen groups (training mode, as in torch's
            default); off by default: frozen groups run in eval mode, as a feature extractor does. Caching needs
            it off.
        show_groups: print the layer groups with their parameter counts, LR scales and what trains in each phase;
            the CLI then exits.

    In ``retune``, round 0 trains the head. When the monitored metric stops improving, the best weights are
    restored, ``retune_groups`` more groups unfreeze, and the next round starts with a fresh optimizer and LR
    schedule. The run stops when a round fails to beat the best by ``min_delta``, nothing is left to unfreeze, or
    ``max_rounds`` is reached; the final weights are the best seen, and a table of the rounds is printed.

    Example:
        >>> trainer = Trainer(callbacks=[FineTuning("freeze_unfreeze", unfreeze_at_epoch=1)])  # doctest: +SKIP
    """

    def __init__(
        self,
        strategy: StrategyName = "full",  # type: ignore[valid-type]
        groups: int | str | list[int | str] | None = None,
        strategy_args: dict[str, Any] | None = None,
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
        retune_order: Literal["top", "rgn"] = "top",
        max_rounds: int | None = None,
        probe_batches: int = 8,
        auto_mode: Literal["depth", "select", "scale"] = "depth",
        auto_threshold: float = 0.5,
        auto_count: int | None = None,
        auto_every: int = 0,
        auto_lp: float = 0.1,
        auto_coverage: float = 0.6,
        auto_floor: float = 0.02,
        probe_after: int = 0,
        cache_features: bool | None = None,
        cache_max_gb: float | None = None,
        frozen_dropout: bool = False,
        show_groups: bool = False,
    ) -> None:
        if (
            min(head_groups, unfreeze_every, patience, round_epochs, retune_groups, probe_batches) < 1
            or unfreeze_at_epoch < 0
        ):
            raise UsageError(
                "head_groups, unfreeze_every, patience, round_epochs, retune_groups and probe_batches "
                "must be >= 1, unfreeze_at_epoch >= 0"
            )
        if unfreeze_groups is not None and unfreeze_groups < 1:
            raise UsageError(f"unfreeze_groups must be >= 1 or None, got {unfreeze_groups}")
        if not 0 < lr_decay <= 1 or retune_lr_scale <= 0:
            raise UsageError(f"lr_decay must be in (0, 1] and retune_lr_scale > 0, got {lr_decay}, {retune_lr_scale}")
        if strategy == "milestones" and not milestones:
            raise UsageError(
                "strategy 'milestones' needs --finetuning.milestones, e.g. "
                "'[{epoch: 0, groups: 1}, {epoch: 2, groups: [blocks.0, head], lr_scale: 0.5}]'"
            )
        if not re.match(STRATEGY_PATTERN, strategy):  # the parser's rule, for a FineTuning built in Python
            raise UsageError(
                f"--finetuning.strategy {strategy!r} is unknown: use one of {STRATEGIES}, or "
                "package.module:Class (a subclass of peft_lightning.callbacks.strategies.Strategy)"
            )
        self.strategy = strategy
        self.groups = groups
        self.head_groups = head_groups
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_groups = unfreeze_groups
        self.unfreeze_every = unfreeze_every
        self.milestones = sorted(
            (m if isinstance(m, Milestone) else Milestone(**m) for m in milestones or []), key=lambda m: m.epoch
        )
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
        self.probe_batches = probe_batches
        if cache_max_gb is not None and not cache_max_gb > 0:
            raise UsageError(f"cache_max_gb must be > 0, got {cache_max_gb}")
        self.cache_features = cache_features
        self.cache_max_gb = cache_max_gb
        self.frozen_dropout = frozen_dropout
        self.caching = PrefixCaching(cache_features, cache_max_gb, frozen_train_mode=frozen_dropout or train_bn)
        self.show_groups = show_groups
        self.schedule: Strategy = self._build(
            strategy,
            strategy_args,
            retune_order,
            Auto(auto_mode, auto_threshold, auto_count, auto_every, probe_after, auto_lp, auto_coverage, auto_floor)
            if strategy == "auto"
            else None,
        )
        self._trainable: tuple[str, ...] | None = None  # the groups that train now (for logging changes)
        self._round_started = time.perf_counter()
        self._rescaled = False  # auto scale measured new LR scales during this step
        # rounds and probe state, all of it in `state_dict` so a resumed run continues the same round
        self.round = 0
        self.round_groups = head_groups  # groups that train in the current round (the round table's column)
        self.round_epochs_done = 0
        self.bad_epochs = 0
        self.best: float | None = None
        self.round_best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.pending: Literal["next", "stop"] | None = None
        self.history: list[dict[str, Any]] = []
        self.round_seconds = 0.0
        self.metric_history: list[float] = []  # the monitored metric after each validation (State.history)
        self.probe: dict[str, Any] | None = None  # the last gradient probe: rgn and params per group, cost

    def _build(self, strategy: str, args: dict[str, Any] | None, order: str, auto: Auto | None) -> Strategy:
        head: Selector = self.head_groups
        target: Selector | None = self.groups if self.groups is not None else self.unfreeze_groups
        if strategy == "full":
            return Full()
        if strategy == "head":
            return Head(self.groups if self.groups is not None else head)
        if strategy == "freeze_unfreeze":
            return FreezeUnfreeze(head, self.unfreeze_at_epoch, target)
        if strategy == "gradual":
            return Gradual(head, self.unfreeze_at_epoch, self.unfreeze_every, target)
        if strategy == "milestones":
            return Milestones(self.milestones, head)
        if strategy == "retune":
            return Retune(head, self.retune_groups, self.retune_lr_scale, self.groups, order)
        if auto is not None:
            return auto
        return import_strategy(strategy, args)

    @property
    def trainable_groups(self) -> tuple[str, ...] | None:
        """The groups that train now (None before the first phase is applied)."""
        return self._trainable

    @property
    def uses_rounds(self) -> bool:
        """Whether the strategy runs evaluation-driven rounds (``retune``, or a user strategy with ``rounds``)."""
        return self.schedule.rounds

    # --- the schedule ---
    def state(self, epoch: int, groups: list[str]) -> State:
        rgn = self.probe["rgn"] if self.probe else None
        signal = self.probe.get("signal") if self.probe else None
        return State(
            epoch=epoch, groups=groups, round=self.round, history=list(self.metric_history), probe=rgn, signal=signal
        )

    def phase(self, epoch: int, groups: list[str]) -> Phase:
        """What trains in ``epoch`` (for round strategies: in the current round), from the strategy."""
        phase = self.schedule.phase(self.state(epoch, groups))
        unknown = [g for g in phase.groups if g not in groups]
        if unknown or not phase.groups:
            raise UsageError(
                f"strategy {self.strategy!r} chose {phase.groups or 'no groups'}: a phase names one or more "
                f"of the model's groups ({', '.join(groups)})"
            )
        return phase

    def apply(self, pl_module: LightningModule, epoch: int) -> list[str]:
        """Set ``requires_grad`` and the LR scales for ``epoch``; returns the names of the groups that train."""
        groups = pl_module.layer_groups()
        names = [name for name, _ in groups]
        phase = self.phase(epoch, names)
        chosen = set(phase.groups)
        params = dict(pl_module.named_parameters())
        # With adapters, the task names what may ever train (adapters and head): frozen base weights stay frozen.
        allowed = pl_module.trainable_parameter_names()
        for name, members in groups:
            for n in members:
                if n in params:
                    params[n].requires_grad_(name in chosen and (allowed is None or n in allowed))
        pl_module.lr_scales.phase = phase.lr_scale
        pl_module.lr_scales.group = dict(phase.group_lr_scales)
        if self.uses_rounds:
            self.round_groups = len(phase.groups)
        if tuple(phase.groups) != self._trainable:
            if self._trainable is not None:
                rank_zero_info(
                    f"epoch {epoch}: training {len(phase.groups)}/{len(groups)} layer groups: {', '.join(phase.groups)}"
                )
            self._trainable = tuple(phase.groups)
        return list(phase.groups)

    # --- the gradient probe (auto, retune_order rgn) ---
    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure each group's relative gradient norm on ``probe_batches`` training batches (every rank the same
        figures), keep it for the strategy, print and log it."""
        # A loader of its own from the data module: iterating the fit's loader (whose iterator Lightning holds, and
        # persistent workers share) would move the epoch under it.
        dm = trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        allowed = pl_module.trainable_parameter_names()
        cache, pl_module.prefix_cache = pl_module.prefix_cache, None  # the probe runs every layer
        # A short run spends at most a quarter of its steps' worth on the probe (at least 2 batches: the signal
        # compares batches).
        batches = min(self.probe_batches, max(2, int(trainer.estimated_stepping_batches) // 4))
        try:
            result = gradient_probe.probe(trainer, pl_module, loader, batches, allowed)
        finally:
            pl_module.prefix_cache = cache
        self.probe = {
            "rgn": result.rgn,
            "signal": result.signal,
            "params": result.params,
            "batches": result.batches,
            "seconds": round(result.seconds, 2),
            "round": self.round,
        }
        chosen = self.apply(pl_module, trainer.current_epoch)
        self._refresh_lrs(trainer)
        self.probe["chosen"] = chosen
        self.probe["step"] = trainer.global_step
        if trainer.is_global_zero:
            print(self.probe_table())
        names = [name for name, _ in pl_module.layer_groups()]
        figures = {
            **{f"probe/rgn/{g}": v for g, v in result.rgn.items()},
            **{f"probe/signal/{g}": v for g, v in result.signal.items()},
            # what the probe chose: the lowest group that trains (its index from the input side) and how many do
            "probe/lowest_trained": float(min(names.index(g) for g in chosen)),
            "probe/groups_trained": float(len(chosen)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)

    def probe_table(self) -> str:
        if not self.probe:
            return ""
        groups = list(self.probe["rgn"])
        return summary.probe_table(self.probe, self.schedule.phase(self.state(0, groups)))

    def _set_modes(self, pl_module: LightningModule) -> None:
        if pl_module.training:
            set_frozen_modes(pl_module, train_bn=self.train_bn, frozen_dropout=self.frozen_dropout)

    # --- the prefix cache ---
    def _reused(self, trainer: Trainer, epoch: int, names: list[str], lowest: int) -> bool:
        """Whether a later epoch will train from the same frozen prefix (``cache_features`` None caches only then)."""
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch + 1:
            return False
        if self.uses_rounds:
            return True
        later = self.phase(epoch + 1, names).groups
        return min(names.index(g) for g in later) == lowest

    def _update_cache(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ready = not (self.schedule.needs_probe and self.probe is None)  # else the groups that train are not chosen
        names = [name for name, _ in pl_module.layer_groups()]
        self.caching.update(trainer, pl_module, ready, lambda epoch, low: self._reused(trainer, epoch, names, low))

    def cache_summary(self, pl_module: LightningModule | None = None) -> list[str]:
        """What the prefix cache did in this run, for the run summary."""
        return self.caching.summary(pl_module)

    # --- hooks ---
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_task(pl_module)  # the one check of what this callback uses (peft_lightning/contract.py)
        groups = pl_module.layer_groups()
        # Layer-wise LR decay: the head trains at lr, the group below at lr*decay, and so on.
        pl_module.lr_scales.layer = {name: self.lr_decay**i for i, (name, _) in enumerate(reversed(groups))}
        self.monitor = self.monitor or pl_module.monitor
        self.mode = self.mode or pl_module.monitor_mode
        if self.uses_rounds:
            pl_module.schedule_epochs = self.round_epochs
        self.phase(0, [name for name, _ in groups])  # a selector that names no group stops here, before any work
        if self.cache_features and stage == "fit":
            why = self.caching.refusal(trainer, pl_module)
            if why is not None:
                raise UsageError(f"--finetuning.cache_features true cannot be exact here: {why}; or drop it")
        # A group unfrozen after DDP wrapped the model must still be all-reduced: DDP registers every parameter
        # (nothing is frozen yet, see on_fit_start) and tolerates the ones that get no gradient.
        ddp_kwargs = internals.ddp_kwargs(trainer.strategy)
        if ddp_kwargs is not None and self.strategy != "full":
            ddp_kwargs["find_unused_parameters"] = True
        if isinstance(trainer.strategy, DeepSpeedStrategy) and self.strategy != "full":
            raise UsageError(
                "FineTuning cannot freeze or unfreeze layer groups under DeepSpeed (its optimizer "
                "partitions only the parameters trainable at start): use --trainer.strategy fsdp or ddp"
            )
        if isinstance(trainer.strategy, FSDPStrategy) and self.schedule.needs_probe:
            # FSDP's forward runs on unsharded copies of the parameters: their gradients reach the flat parameters
            # only through its backward hooks, which the probe must not fire outside a training step.
            raise UsageError(
                "the gradient probe (--finetuning.strategy auto, retune_order rgn) does not run under "
                "FSDP: use --trainer.strategy ddp, or choose the groups with --finetuning.groups"
            )
        if isinstance(trainer.strategy, FSDPStrategy) and self.strategy != "full":
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
        self.schedule.plan(max(1, int(trainer.estimated_stepping_batches)))
        # A resumed run restores the probe (and so the choice) from its checkpoint instead of probing again.
        if self.schedule.needs_probe and self.probe is None and trainer.global_step >= self._probe_after:
            self.run_probe(trainer, pl_module)
        self._set_modes(pl_module)
        self._update_cache(trainer, pl_module)
        if self.pending == "stop" and between_epochs(trainer):  # else at the restored epoch's end (see below)
            trainer.should_stop = True

    @property
    def stop_reason(self) -> str | None:
        """Why this callback stopped the run (its re-tuning rounds ended), or None."""
        return "its re-tuning rounds are done" if self.uses_rounds and self.pending == "stop" else None

    @property
    def _probe_after(self) -> int:
        return self.schedule.warmup_steps

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.schedule.needs_probe and self.probe is None and trainer.global_step >= self._probe_after > 0:
            self.run_probe(trainer, pl_module)  # after the head's warm-up steps
            self._set_modes(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # auto scale: the LR scales follow the training gradients themselves (already all-reduced under DDP, so
        # every rank computes the same scales); no extra forward or backward pass.
        every = self.schedule.rescale_every
        if not every or trainer.global_step == 0 or trainer.global_step % every or self.probe is None:
            return
        groups = pl_module.layer_groups()
        allowed = pl_module.trainable_parameter_names()
        g2, w2 = gradient_probe.group_norms(pl_module, groups, allowed)
        self.probe["rgn"] = gradient_probe.rgn_from_norms(trainer, [name for name, _ in groups], g2, w2)
        pl_module.lr_scales.group = dict(self.phase(trainer.current_epoch, [n for n, _ in groups]).group_lr_scales)
        self._rescaled = True  # this step trains at the LRs already set (and logged); the next one at the new scales

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        ramped = self._ramp(trainer, pl_module)
        if self._rescaled or ramped:  # after the schedulers stepped: the next step's LRs, under every scheduler
            self._rescaled = False
            self._refresh_lrs(trainer)

    def _ramp(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """``auto``'s body warm-up: the groups its probe chose start at a small LR that rises linearly to the
        schedule's over ``ramp_steps`` steps (a function of the step, so a resumed run ramps alike)."""
        steps = self.schedule.ramp_steps
        if not steps or not self.probe or "step" not in self.probe:
            return False
        done = trainer.global_step - self.probe["step"]
        if not 0 <= done <= steps:
            return False
        head = pl_module.layer_groups()[-1][0]
        factor = min(1.0, (done + 1) / (steps + 1))
        pl_module.lr_scales.group = {g: factor for g in self.probe["chosen"] if g != head}
        return True

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending == "next":
            self._next_round(trainer, pl_module)
        self.apply(pl_module, trainer.current_epoch)
        self._set_modes(pl_module)
        self._refresh_lrs(trainer)
        cache = pl_module.prefix_cache
        if cache is not None and cache.failed:
            pl_module.prefix_cache = None
        self._update_cache(trainer, pl_module)

    @staticmethod
    def _refresh_lrs(trainer: Trainer) -> None:
        # A scheduler applies the task's LR scales only when it steps (per step, or per epoch under plateau): a new
        # phase's scales must hold from its first step. The task's schedulers have `refresh()`
        # (tasks/schedules.py); a plain LambdaLR of a task of one's own is recomputed the same way.
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if hasattr(sched, "refresh"):
                sched.refresh()
            elif isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                refresh_lambda_lr(sched)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cache = pl_module.prefix_cache
        if cache is not None and trainer.world_size > 1 and not cache.complete and not cache.failed:
            cache.sync()  # each rank filled the rows its sampler gave it: every rank gets every row
        if self.pending == "stop":  # Lightning does not save `should_stop`: a resumed run whose rounds ended stops
            trainer.should_stop = True

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.pending == "stop":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None and not self.uses_rounds:
            return
        if value is None:
            raise KeyError(
                f"{self.strategy} monitors {self.monitor!r}, which was not logged; logged: "
                f"{', '.join(trainer.callback_metrics)}: pass --finetuning.monitor NAME"
            )
        value = float(value)
        self.metric_history.append(value)
        if not self.uses_rounds:
            return
        sign = 1.0 if self.mode == "max" else -1.0
        self.round_epochs_done += 1
        if self.round_best is None or sign * (value - self.round_best) > self.min_delta:
            self.round_best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.best is None or sign * (value - self.best) > 0:
            self.best = value
            # Only what training changes (with adapters: not the frozen base), so checkpoints stay adapter-sized.
            state = pl_module.trainable_state_dict()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if self.bad_epochs < self.patience and self.round_epochs_done < self.round_epochs:
            return
        names = [name for name, _ in pl_module.layer_groups()]
        improved = (
            self.round == 0 or not self.history or sign * (self.round_best - self.history[-1]["best"]) > self.min_delta
        )
        self._close_round(pl_module)
        exhausted = self.schedule.done(self.state(trainer.current_epoch, names)) or (
            self.max_rounds is not None and self.round + 1 >= self.max_rounds
        )
        if not improved or exhausted:
            self.pending = "stop"
            self._restore_best(pl_module)
            trainer.should_stop = True
        else:
            self.pending = "next"

    def _close_round(self, pl_module: LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.round_seconds += time.perf_counter() - self._round_started
        self.history.append(
            {
                "round": self.round,
                "groups": self.round_groups,
                "trainable": trainable,
                "best": self.round_best,
                "epochs": self.round_epochs_done,
                "seconds": round(self.round_seconds, 1),
            }
        )

    def _restore_best(self, pl_module: LightningModule) -> None:
        if self.best_state is not None:
            # With adapters the frozen base is left out of best_state on purpose: only then is a partial load fine.
            partial = pl_module.trainable_parameter_names() is not None
            pl_module.load_state_dict(self.best_state, strict=not partial)

    def _next_round(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_best(pl_module)
        self.round += 1
        self.round_epochs_done = self.bad_epochs = 0
        self.round_best = None
        self.round_seconds = 0.0
        self._round_started = time.perf_counter()
        self.pending = None
        if self.schedule.needs_probe:  # which groups this round adds follows the gradients of the best weights
            self.run_probe(trainer, pl_module)
        self.apply(pl_module, trainer.current_epoch)
        # A fresh optimizer and LR schedule for the round (same named groups: nothing else changes shape).
        trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(
            f"retune round {self.round}: {self.round_groups} groups train, "
            f"LR x{pl_module.lr_scales.phase:g}, from the best weights ({self.monitor} {self.best:.4f})"
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.caching.drop(trainer, pl_module, end=True)
        if not self.uses_rounds:
            return
        if self.pending is None and self.round_epochs_done:  # max_epochs ended the run mid-round
            self._close_round(pl_module)
            self._restore_best(pl_module)
        if self.history and trainer.is_global_zero:
            print(self.round_table())

    def round_table(self) -> str:
        return summary.round_table(self.history, self.monitor)

    def print_groups(self, pl_module: LightningModule, epochs: int = 1) -> None:
        """The model's groups, their parameter counts and LR scales, and which train in each phase of the first
        ``epochs`` epochs (``x``); a round strategy's later rounds and ``auto``'s choice depend on the run."""
        params = dict(pl_module.named_parameters())
        groups = pl_module.layer_groups()
        names = [name for name, _ in groups]
        phases: list[tuple[int, set[str]]] = []
        for epoch in range(max(1, epochs)):
            chosen = set(self.phase(epoch, names).groups)
            if not phases or phases[-1][1] != chosen:
                phases.append((epoch, chosen))
        label = "round 0" if self.uses_rounds else "before probe" if self.schedule.needs_probe else "epoch"
        rows = [
            (name, sum(params[n].numel() for n in members if n in params), self.lr_decay ** (len(groups) - 1 - i))
            for i, (name, members) in enumerate(groups)
        ]
        notes = []
        if self.uses_rounds:
            notes.append("later rounds add groups as the monitored metric stops improving (retune)")
        if self.schedule.needs_probe:
            notes.append("the groups that train are chosen by the gradient probe at the start of fit (auto)")
        print(summary.groups_table(rows, label, phases, notes))

    _STATE = (
        "round",
        "round_groups",
        "round_epochs_done",
        "bad_epochs",
        "best",
        "round_best",
        "best_state",
        "pending",
        "history",
        "round_seconds",
        "metric_history",
        "probe",
    )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._STATE}, "strategy_state": self.schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in self._STATE:
            if k in state_dict:
                setattr(self, k, state_dict[k])
        self.schedule.load_state_dict(state_dict.get("strategy_state", {}))


def set_frozen_modes(module: nn.Module, train_bn: bool = False, frozen_dropout: bool = False) -> None:
    """Frozen groups run in eval mode: every largest submodule whose weights are all frozen (its dropout and
    stochastic depth off, its BatchNorm on running statistics), unless ``frozen_dropout`` (then only its BatchNorm)
    or ``train_bn`` (its BatchNorm updates its statistics). Everything else trains, including groups just
    unfrozen, as in a run that never stopped."""
    ps = list(module.parameters())
    if ps and not any(p.requires_grad for p in ps):
        for m in module.modules():
            m.training = train_bn if isinstance(m, internals.BatchNorm) else frozen_dropout
        return
    module.training = True
    for child in module.children():
        set_frozen_modes(child, train_bn, frozen_dropout)
