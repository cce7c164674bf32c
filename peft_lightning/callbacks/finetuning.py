"""The fine-tuning callback: which layer groups train, when, and at which learning rate, in every domain.

A strategy decides which groups train (``callbacks/strategies.py``, its rounds ``rounds.py``, the gradient probe
``probe.py``); this callback applies its answer and keeps what a resume needs. What it needs from the task is one
typed contract, checked once at setup (``peft_lightning/contract.py``). Design choices that make it correct where
older callbacks broke:

- every parameter is in the optimizer from the first step (frozen ones get no gradient): an unfreeze never adds
  param groups, and the LR scheduler never sees its groups change;
- freezing is applied in ``on_fit_start``, after DDP wrapped every parameter (``find_unused_parameters``): a group
  unfrozen later is all-reduced like any other;
- which groups train is a function of the epoch (or of the round in ``state_dict``): a resumed run trains exactly
  what an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from peft_lightning.callbacks import probe as gradient_probe
from peft_lightning.callbacks.caching import PrefixCaching
from peft_lightning.callbacks.checkpoint import between_epochs
from peft_lightning.callbacks.groups import groups_table, set_frozen_modes
from peft_lightning.callbacks.rounds import Rounds
from peft_lightning.callbacks.strategies import Full, Phase, State, Strategy, StrategyName, build, short_name
from peft_lightning.contract import check_task
from peft_lightning.engine.strategy import allow_freezing
from peft_lightning.errors import UsageError
from peft_lightning.tasks.schedules import refresh_all


class FineTuning(Callback):
    """Which layer groups train, when, and at which learning rate.

    Args:
        strategy: which groups train when: a built-in strategy's name (``full``, ``head``, ``freeze_unfreeze``,
            ``gradual``, ``milestones``, ``retune``, ``auto``) with its default options, or a ``Strategy`` class
            with its options (``--finetuning.strategy Retune --finetuning.strategy.round_epochs 1``; a user's by
            import path; it keeps the options it shares with the strategy it replaces, the recipe's); in Python an
            instance. ``--finetuning.strategy.help Retune`` lists a strategy's options (docs/layers.md).
        lr_decay: layer-wise LR decay: the i-th group from the top trains at ``lr * lr_decay**i``.
        train_bn: keep BatchNorm layers of frozen groups in training mode (updating running stats; no caching).
        frozen_dropout: keep dropout and stochastic depth active in frozen groups (training mode, as in torch's
            default); off by default: frozen groups run in eval mode, as a feature extractor does. Caching needs
            it off.
        monitor: the metric a strategy sees after each validation (``State.history``) and that ends a re-tuning
            round; default: the task's ``monitor`` (e.g. ``val/acc``).
        mode: ``max`` or ``min`` for ``monitor``; default: the task's ``monitor_mode``.
        cache_features: keep the output of the frozen groups below the lowest one that trains, once per training
            example, and train the groups above from it (later epochs neither run the frozen layers nor read raw
            data). Exact: frozen layers run in eval mode, inputs must be deterministic (``--data.augment false``).
            None (default): on where it is exact, fits in ``cache_max_gb`` and a later epoch of the same phase reads
            it; ``true``: wherever it is exact (on disk beyond ``cache_max_gb``), else refused; ``false``: off.
        cache_max_gb: memory the cache may hold; default: a quarter of this machine's memory.
        show_groups: print the layer groups with their parameter counts, LR scales and what trains in each phase;
            the CLI then exits.

    Example:
        >>> from peft_lightning.callbacks.strategies import FreezeUnfreeze
        >>> trainer = Trainer(callbacks=[FineTuning(FreezeUnfreeze(at_epoch=1, groups=3))])  # doctest: +SKIP
    """

    def __init__(
        self,
        strategy: Strategy | StrategyName = "full",
        lr_decay: float = 1.0,
        train_bn: bool = False,
        frozen_dropout: bool = False,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        cache_features: bool | None = None,
        cache_max_gb: float | None = None,
        show_groups: bool = False,
    ) -> None:
        if not 0 < lr_decay <= 1:
            raise UsageError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if cache_max_gb is not None and not cache_max_gb > 0:
            raise UsageError(f"cache_max_gb must be > 0, got {cache_max_gb}")
        self.strategy = build(strategy)
        self.lr_decay, self.train_bn, self.frozen_dropout = lr_decay, train_bn, frozen_dropout
        self.monitor, self.mode = monitor, mode
        self.caching = PrefixCaching(cache_features, cache_max_gb, frozen_train_mode=frozen_dropout or train_bn)
        self.cache_features, self.show_groups = cache_features, show_groups
        self.trainable_groups: tuple[str, ...] | None = None  # the groups that train now (None before the first phase)
        self._rescaled = False  # auto scale measured new LR scales during this step
        # in `state_dict` (with the strategy's and its rounds'), so a resumed run continues where it was
        self.metric_history: list[float] = []  # the monitored metric after each validation (State.history)
        self.probe: dict[str, Any] | None = None  # the last gradient probe: rgn and params per group, cost

    @staticmethod
    def find(trainer: Trainer) -> FineTuning | None:
        """The trainer's ``FineTuning`` callback, or None."""
        return next((c for c in trainer.callbacks if isinstance(c, FineTuning)), None)

    @property
    def name(self) -> str:
        """The strategy's short name (``retune``), or its class's name."""
        return short_name(self.strategy)

    @property
    def rounds(self) -> Rounds | None:
        """The strategy's re-tuning rounds (``retune``, or a user strategy that holds a ``Rounds``), else None."""
        return self.strategy.rounds

    @property
    def stop_reason(self) -> str | None:
        """Why this callback stopped the run (its re-tuning rounds ended), or None."""
        return "its re-tuning rounds are done" if self.rounds is not None and self.rounds.stopping else None

    def state(self, epoch: int, groups: list[str]) -> State:
        probe, current = self.probe or {}, self.rounds.round if self.rounds is not None else 0
        history = list(self.metric_history)
        return State(epoch, groups, current, history, probe=probe.get("rgn"), signal=probe.get("signal"))

    def phase(self, epoch: int, groups: list[str]) -> Phase:
        """What trains in ``epoch`` (for round strategies: in the current round), from the strategy."""
        phase = self.strategy.phase(self.state(epoch, groups))
        unknown = [g for g in phase.groups if g not in groups]
        if unknown or not phase.groups:
            raise UsageError(
                f"strategy {self.name!r} chose {phase.groups or 'no groups'}: a phase names one or more "
                f"of the model's groups ({', '.join(groups)})"
            )
        return phase

    def layer_scales(self, groups: list[str]) -> dict[str, float]:
        """Layer-wise LR decay: the head trains at lr, the group below at lr * decay, and so on."""
        return {name: self.lr_decay**i for i, name in enumerate(reversed(groups))}

    def apply(self, pl_module: LightningModule, epoch: int) -> list[str]:
        """Set ``requires_grad`` and the LR scales for ``epoch``; returns the names of the groups that train."""
        groups = pl_module.layer_groups()
        phase = self.phase(epoch, [name for name, _ in groups])
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
        if self.rounds is not None:
            self.rounds.round_groups = len(phase.groups)
        if tuple(phase.groups) != self.trainable_groups:
            if self.trainable_groups is not None:
                rank_zero_info(
                    f"epoch {epoch}: training {len(phase.groups)}/{len(groups)} layer groups: {', '.join(phase.groups)}"
                )
            self.trainable_groups = tuple(phase.groups)
        return list(phase.groups)

    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The gradient probe on the strategy's ``probe_batches``: kept for it, its choice applied, printed, logged."""
        self.probe = gradient_probe.measure(trainer, pl_module, self.strategy.probe_batches)
        self.probe["round"] = self.rounds.round if self.rounds is not None else 0
        chosen = self.apply(pl_module, trainer.current_epoch)
        self._refresh_lrs(trainer)
        self.probe["chosen"] = chosen
        self.probe["step"] = trainer.global_step
        if trainer.is_global_zero:
            print(gradient_probe.table(self.probe, self.phase(trainer.current_epoch, list(self.probe["rgn"]))))
        gradient_probe.log_figures(trainer, self.probe, [name for name, _ in pl_module.layer_groups()])

    def _set_modes(self, pl_module: LightningModule) -> None:
        if pl_module.training:
            set_frozen_modes(pl_module, train_bn=self.train_bn, frozen_dropout=self.frozen_dropout)

    def _reused(self, trainer: Trainer, epoch: int, names: list[str], lowest: int) -> bool:
        """Whether a later epoch will train from the same frozen prefix (``cache_features`` None caches only then)."""
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch + 1:
            return False
        return self.rounds is not None or min(names.index(g) for g in self.phase(epoch + 1, names).groups) == lowest

    def _update_cache(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ready = not (self.strategy.needs_probe and self.probe is None)  # else the groups that train are not chosen
        names = [name for name, _ in pl_module.layer_groups()]
        self.caching.update(trainer, pl_module, ready, lambda epoch, low: self._reused(trainer, epoch, names, low))

    def cache_summary(self, pl_module: LightningModule | None = None) -> list[str]:
        """What the prefix cache did in this run, for the run summary."""
        return self.caching.summary(pl_module)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_task(pl_module)  # the one check of what this callback uses (peft_lightning/contract.py)
        names = [name for name, _ in pl_module.layer_groups()]
        pl_module.lr_scales.layer = self.layer_scales(names)
        self.monitor = self.monitor or pl_module.monitor
        self.mode = self.mode or pl_module.monitor_mode
        if self.rounds is not None:
            self.rounds.watch(self.monitor, self.mode)
            pl_module.schedule_epochs = self.rounds.round_epochs
        self.phase(0, names)  # a selector that names no group stops here, before any work
        if self.cache_features and stage == "fit":
            why = self.caching.refusal(trainer, pl_module)
            if why is not None:
                raise UsageError(f"--finetuning.cache_features true cannot be exact here: {why}; or drop it")
        if not isinstance(
            self.strategy, Full
        ):  # DDP, FSDP configured for groups that unfreeze later; DeepSpeed refused
            allow_freezing(trainer.strategy, probes=self.strategy.needs_probe)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)
        if self.rounds is not None:
            self.rounds.start()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A checkpoint is restored after `on_fit_start` (which saw epoch 0), and a run resumed mid-epoch gets no
        # `on_train_epoch_start` for that epoch: apply the restored epoch's groups here.
        self.apply(pl_module, trainer.current_epoch)
        self.strategy.plan(max(1, int(trainer.estimated_stepping_batches)))
        # A resumed run restores the probe (and so the choice) from its checkpoint instead of probing again.
        if self.strategy.needs_probe and self.probe is None and trainer.global_step >= self.strategy.warmup_steps:
            self.run_probe(trainer, pl_module)
        self._set_modes(pl_module)
        self._update_cache(trainer, pl_module)
        if self.stop_reason and between_epochs(trainer):  # else at the restored epoch's end (see below)
            trainer.should_stop = True

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.strategy.needs_probe and self.probe is None and trainer.global_step >= self.strategy.warmup_steps > 0:
            self.run_probe(trainer, pl_module)  # after the head's warm-up steps
            self._set_modes(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # auto scale: the LR scales follow the training gradients themselves (already all-reduced under DDP, so
        # every rank computes the same scales); no extra forward or backward pass.
        every = self.strategy.rescale_every
        if not every or trainer.global_step == 0 or trainer.global_step % every or self.probe is None:
            return
        self.probe["rgn"] = gradient_probe.remeasure(trainer, pl_module)
        names = [name for name, _ in pl_module.layer_groups()]
        pl_module.lr_scales.group = dict(self.phase(trainer.current_epoch, names).group_lr_scales)
        self._rescaled = True  # this step trains at the LRs already set (and logged); the next one at the new scales

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        # auto's body warm-up: the groups its probe chose start at a small LR that rises to the schedule's over
        # `ramp_steps` (a function of the step, so a resumed run ramps alike)
        factor = gradient_probe.warmup_factor(self.probe, trainer.global_step, self.strategy.ramp_steps)
        if factor is not None:
            head = pl_module.layer_groups()[-1][0]
            pl_module.lr_scales.group = {g: factor for g in self.probe["chosen"] if g != head}
        if self._rescaled or factor is not None:  # after the schedulers stepped: the next step's LRs, under every one
            self._rescaled = False
            self._refresh_lrs(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.rounds is not None and self.rounds.pending == "next":
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
        refresh_all(config.scheduler for config in trainer.lr_scheduler_configs)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cache = pl_module.prefix_cache
        if cache is not None and trainer.world_size > 1 and not cache.complete and not cache.failed:
            cache.sync()  # each rank filled the rows its sampler gave it: every rank gets every row
        if self.stop_reason:  # Lightning does not save `should_stop`: a resumed run whose rounds ended stops
            trainer.should_stop = True

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.stop_reason:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None and self.rounds is None:
            return
        if value is None:
            raise KeyError(
                f"{self.name} monitors {self.monitor!r}, which was not logged; logged: "
                f"{', '.join(trainer.callback_metrics)}: pass --finetuning.monitor NAME"
            )
        self.metric_history.append(float(value))
        if self.rounds is None or not self.rounds.observe(float(value), pl_module):
            return
        nothing_left = self.strategy.done(self.state(trainer.current_epoch, [n for n, _ in pl_module.layer_groups()]))
        self.rounds.end_round(pl_module, nothing_left)
        if self.rounds.stopping:
            trainer.should_stop = True

    def _next_round(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rounds = self.rounds
        rounds.next_round(pl_module)
        if self.strategy.needs_probe:  # which groups this round adds follows the gradients of the best weights
            self.run_probe(trainer, pl_module)
        self.apply(pl_module, trainer.current_epoch)
        # A fresh optimizer and LR schedule for the round (same named groups: nothing else changes shape).
        trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(
            f"retune round {rounds.round}: {rounds.round_groups} groups train, "
            f"LR x{pl_module.lr_scales.phase:g}, from the best weights ({self.monitor} {rounds.best:.4f})"
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.caching.drop(trainer, pl_module, end=True)
        if self.rounds is not None:
            self.rounds.finish(pl_module)
            if self.rounds.history and trainer.is_global_zero:
                print(self.rounds.table())

    def print_groups(self, pl_module: LightningModule, epochs: int = 1) -> None:
        """The model's groups, their parameter counts and LR scales, and which train in each phase of the first
        ``epochs`` epochs; a round strategy's later rounds and ``auto``'s choice depend on the run."""
        names = [name for name, _ in pl_module.layer_groups()]
        rounds, probes = self.rounds is not None, self.strategy.needs_probe
        notes = ["later rounds add groups as the monitored metric stops improving (retune)"] * rounds
        notes += ["the groups that train are chosen by the gradient probe at the start of fit (auto)"] * probes
        label = "round 0" if rounds else "before probe" if probes else "epoch"
        phase_of = lambda epoch: set(self.phase(epoch, names).groups)  # noqa: E731
        print(groups_table(pl_module, self.layer_scales(names), phase_of, epochs, label, notes))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"metric_history": self.metric_history, "probe": self.probe}
        rounds = self.rounds.state_dict() if self.rounds is not None else {}
        return {**state, **rounds, "strategy_state": self.strategy.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metric_history = state_dict.get("metric_history", self.metric_history)
        self.probe = state_dict.get("probe", self.probe)
        if self.rounds is not None:
            self.rounds.load_state_dict(state_dict)
        self.strategy.load_state_dict(state_dict.get("strategy_state", {}))
