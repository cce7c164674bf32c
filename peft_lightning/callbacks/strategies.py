"""Which layer groups train: group selectors, and one small class per fine-tuning strategy.

A model's layer groups are ordered from the input side to the head (``stem, blocks.0 ... blocks.6, head``). A
*selector* names a set of them: a name (``head``), a range (``blocks.4-6``), a pattern (``layer.*``), or a count
from the top (``3``: the top three groups). Selectors combine in a list: ``[stem, blocks.0, head]``.

A *strategy* answers one question, in the spirit of Lightning's ``BaseFinetuning.finetune_function``: given where
the run is (``State``: the epoch, the re-tuning round, the monitored metric's history, the gradient probe), which
groups train and at which LR scale (``Phase``). Write your own by subclassing ``Strategy`` and pass it as
``--finetuning.strategy my_pkg.strategies:MyStrategy`` (options through ``--finetuning.strategy_args``):

    class FirstAndHead(Strategy):
        '''The first block and the head (the best choice for input-level shifts, Lee et al. 2023).'''

        def phase(self, state: State) -> Phase:
            return Phase(select_groups(["blocks.0", "head"], state.groups))

The ``FineTuning`` callback applies the phase (``requires_grad``, BatchNorm mode, LR scales), saves what it needs to
resume, and runs the rounds of evaluation-driven strategies (``rounds = True``).
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft_lightning.errors import UsageError

Selector = int | str | Sequence[int | str]
"""A count from the top, a name / range / pattern, or a list of them."""

_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<lo>\d+)-(?P<hi>\d+)$")


def select_groups(selector: Selector | None, groups: Sequence[str]) -> list[str]:
    """The groups ``selector`` names, in the model's order (input side first).

    Example:
        >>> g = ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
        >>> select_groups(["stem", "blocks.1-2"], g), select_groups(2, g), select_groups("blocks.*", g)
        (['stem', 'blocks.1', 'blocks.2'], ['blocks.2', 'head'], ['blocks.0', 'blocks.1', 'blocks.2'])
    """
    if selector is None:
        return list(groups)
    items = [selector] if isinstance(selector, (int, str)) else list(selector)
    chosen: set[str] = set()
    for item in items:
        found = _match(item, groups)
        if not found:
            raise UsageError(
                f"layer group selector {item!r} matches none of the model's groups "
                f"({', '.join(groups)}): see --finetuning.show_groups true"
            )
        chosen.update(found)
    return [g for g in groups if g in chosen]


def _match(item: int | str, groups: Sequence[str]) -> list[str]:
    if isinstance(item, bool):
        raise UsageError(f"layer group selector {item!r} is not a name, range, pattern or count")
    text = str(item).strip()
    if isinstance(item, int) or text.isdigit():
        count = int(text)
        if count < 1:
            raise UsageError(f"a count of layer groups must be >= 1, got {count}")
        return list(groups[-count:])
    if text in groups:
        return [text]
    if any(c in text for c in "*?["):
        return [g for g in groups if fnmatch.fnmatchcase(g, text)]
    m = _RANGE.match(text)
    if m:
        lo, hi = int(m["lo"]), int(m["hi"])
        wanted = {f"{m['prefix']}{i}" for i in range(min(lo, hi), max(lo, hi) + 1)}
        return [g for g in groups if g in wanted]
    return []


def top_down(groups: Sequence[str], among: Sequence[str]) -> list[str]:
    """``among`` ordered from the head down (the order gradual unfreezing adds them)."""
    wanted = set(among)
    return [g for g in reversed(groups) if g in wanted]


@dataclass
class State:
    """Where the run is, as a strategy sees it."""

    epoch: int
    groups: list[str]
    """Every layer group of the model, input side first."""
    round: int = 0
    """The re-tuning round (strategies with ``rounds = True``); 0 otherwise."""
    history: list[float] = field(default_factory=list)
    """The monitored validation metric after each validation so far."""
    probe: dict[str, float] | None = None
    """Each group's relative gradient norm from the last probe (``needs_probe`` strategies), else None."""
    signal: dict[str, float] | None = None
    """Each group's gradient signal from the last probe (the share of a batch's gradient that is the expected
    gradient, in [0, 1]), else None."""


@dataclass
class Phase:
    """What trains now: ``groups`` (names), each at ``lr_scale`` x ``group_lr_scales.get(name, 1)`` x its layer-wise
    decay x the schedule's LR."""

    groups: list[str]
    lr_scale: float = 1.0
    group_lr_scales: dict[str, float] = field(default_factory=dict)


class Strategy:
    """The hook every strategy implements: ``phase(state)``.

    Class attributes tell the callback what else the strategy needs:
    ``rounds``: evaluation-driven rounds (the callback ends a round when the monitored metric stops improving,
    restores the best weights and starts the next with a fresh optimizer and schedule, ``State.round`` + 1);
    ``needs_probe``: a gradient probe before training (``State.probe``), after ``warmup_steps`` training steps;
    ``ramp_steps``: steps over which the groups the probe chose warm up their LR from near 0 (0: none);
    ``rescale_every``: steps between two re-measurements of the probe from the training gradients (0: never).
    A strategy with state of its own implements ``state_dict`` / ``load_state_dict`` (saved in checkpoints).
    """

    rounds: ClassVar[bool] = False
    needs_probe: ClassVar[bool] = False
    warmup_steps: int = 0
    ramp_steps: int = 0
    rescale_every: int = 0

    def phase(self, state: State) -> Phase:
        raise NotImplementedError

    def plan(self, total_steps: int) -> None:
        """Called once the run's optimizer steps are known (before training), for a strategy whose phases depend
        on them (``auto``'s linear probe is a share of the run)."""

    def done(self, state: State) -> bool:
        """For ``rounds`` strategies: whether no further round could train anything new."""
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Full(Strategy):
    """Every group trains, from the first step."""

    def phase(self, state: State) -> Phase:
        return Phase(list(state.groups))


class Head(Strategy):
    """Only ``groups`` (default: the top ``head_groups``) train, throughout: a linear probe, or any fixed set."""

    def __init__(self, groups: Selector = 1) -> None:
        self.groups = groups

    def phase(self, state: State) -> Phase:
        return Phase(select_groups(self.groups, state.groups))


class FreezeUnfreeze(Strategy):
    """``head`` until ``at_epoch``, then ``target`` (default: every group)."""

    def __init__(self, head: Selector = 1, at_epoch: int = 1, target: Selector | None = None) -> None:
        self.head, self.at_epoch, self.target = head, at_epoch, target

    def phase(self, state: State) -> Phase:
        chosen = self.head if state.epoch < self.at_epoch else self.target
        return Phase(select_groups(chosen, state.groups))


class Gradual(Strategy):
    """ULMFiT's gradual unfreezing: ``head`` until ``at_epoch``, then one more group of ``target`` every ``every``
    epochs, from the top down (groups outside ``target`` stay frozen, so the set may have holes)."""

    def __init__(self, head: Selector = 1, at_epoch: int = 1, every: int = 1, target: Selector | None = None) -> None:
        self.head, self.at_epoch, self.every, self.target = head, at_epoch, every, target

    def phase(self, state: State) -> Phase:
        head = select_groups(self.head, state.groups)
        if state.epoch < self.at_epoch:
            return Phase(head)
        more = (state.epoch - self.at_epoch) // self.every + 1
        queue = [g for g in top_down(state.groups, select_groups(self.target, state.groups)) if g not in head]
        chosen = set(head) | set(queue[:more])
        return Phase([g for g in state.groups if g in chosen])


@dataclass
class Milestone:
    """From ``epoch`` on, ``groups`` train (a count from the top, or selectors), at ``lr_scale`` x the schedule."""

    epoch: int
    groups: int | str | list[int | str]
    lr_scale: float = 1.0


class Milestones(Strategy):
    """Follows ``milestones``; before the first one, ``head`` trains."""

    def __init__(self, milestones: Sequence[Milestone], head: Selector = 1) -> None:
        self.milestones = sorted(milestones, key=lambda m: m.epoch)
        self.head = head

    def phase(self, state: State) -> Phase:
        active = [m for m in self.milestones if m.epoch <= state.epoch]
        if not active:
            return Phase(select_groups(self.head, state.groups))
        return Phase(select_groups(active[-1].groups, state.groups), lr_scale=active[-1].lr_scale)


class Retune(Strategy):
    """Evaluation-driven rounds: round 0 trains ``head``; each later round adds ``per_round`` groups of
    ``target``, from the top down (``order="top"``) or those whose relative gradient norm is highest now
    (``order="rgn"``: a probe at each round's start), at ``lr_scale ** round``."""

    rounds = True

    def __init__(
        self,
        head: Selector = 1,
        per_round: int = 1,
        lr_scale: float = 1.0,
        target: Selector | None = None,
        order: str = "top",
    ) -> None:
        self.head, self.per_round, self.lr_scale, self.target, self.order = head, per_round, lr_scale, target, order
        self.needs_probe = order == "rgn"  # type: ignore[misc]  (per instance: only the rgn order probes)
        self.added: list[str] = []  # groups added by rounds 1.., in the order they were (saved: resume continues)

    def _queue(self, state: State) -> list[str]:
        head = select_groups(self.head, state.groups)
        queue = [g for g in top_down(state.groups, select_groups(self.target, state.groups)) if g not in head]
        if self.order == "rgn" and state.probe:
            queue.sort(key=lambda g: -state.probe.get(g, 0.0))  # stable: ties keep the top-down order
        return [g for g in queue if g not in self.added]

    def phase(self, state: State) -> Phase:
        while len(self.added) < state.round * self.per_round:  # entering a round: pick its groups once
            queue = self._queue(state)
            if not queue:
                break
            self.added.extend(queue[: self.per_round])
        chosen = set(select_groups(self.head, state.groups)) | set(self.added[: state.round * self.per_round])
        return Phase([g for g in state.groups if g in chosen], lr_scale=self.lr_scale**state.round)

    def done(self, state: State) -> bool:
        return not self._queue(state)

    def state_dict(self) -> dict[str, Any]:
        return {"added": list(self.added)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.added = list(state.get("added", []))


class Auto(Strategy):
    """Chooses the layer groups that train from a gradient probe (``peft_lightning/callbacks/probe.py``).

    - ``mode="depth"`` (the default): a linear probe first, then fine-tuning from the depth the gradients ask for
      (LP-FT, Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
      ICLR 2022). The head trains alone for the first ``lp`` of the run's steps (``warmup_steps``, set by the
      callback once the step count is known): a new head sends only noise into the body, a trained one says what
      the task needs. The probe then measures each group's *signal* (the share of a batch's gradient that is the
      expected gradient), and the fewest groups from the top that hold ``coverage`` of the body's signal train,
      with every group above them and the head, at the run's LR, which rises linearly from near 0 over as many
      steps as the linear probe took (``ramp_steps``: the body's own warm-up). What stays frozen below costs no backward
      pass, and its output is cached where epochs repeat. When no group below the head shows a signal of at
      least ``floor`` (small noisy batches: the probe cannot tell the groups apart), every group trains: LP-FT.
    - ``mode="select"``: the groups whose RGN, normalised by the largest among the groups below the head, is at
      least ``threshold`` (or the ``count`` highest) train, and the head.
    - ``mode="scale"``: every group trains at ``RGN / max(RGN)`` times its LR, re-measured from the training
      gradients every ``every`` steps (Auto-RGN, Lee et al., ICLR 2023).

    RGN and signal are printed side by side. ``benchmarks.run choose`` measures ``depth`` against fixed choices on
    tasks none of them was tuned on (docs/layers.md).
    """

    needs_probe = True

    def __init__(
        self,
        mode: str = "depth",
        threshold: float = 0.5,
        count: int | None = None,
        every: int = 0,
        warmup_steps: int = 0,
        lp: float = 0.1,
        coverage: float = 0.6,
        floor: float = 0.02,
    ) -> None:
        if mode not in ("depth", "select", "scale"):
            raise UsageError(f"auto_mode must be depth, select or scale, got {mode!r}")
        if not 0 <= threshold <= 1 or (count is not None and count < 1) or min(every, warmup_steps) < 0:
            raise UsageError(
                "auto_threshold must be in [0, 1], auto_count >= 1 or None, auto_every and probe_after >= 0"
            )
        if not (0 <= lp < 1 and 0 < coverage <= 1 and 0 <= floor < 1):
            raise UsageError("auto_lp must be in [0, 1), auto_coverage in (0, 1], auto_floor in [0, 1)")
        self.mode, self.threshold, self.count, self.every = mode, threshold, count, every
        self.lp, self.coverage, self.floor = lp, coverage, floor
        self.warmup_steps = warmup_steps  # the head trains alone this many steps, then the probe runs
        self.rescale_every = every if mode == "scale" else 0  # the LR scales follow the training gradients

    def plan(self, total_steps: int) -> None:
        """``depth``: the linear probe's share of the run in steps, unless ``probe_after`` gave a number."""
        if self.mode == "depth":
            if not self.warmup_steps:
                self.warmup_steps = round(self.lp * total_steps)  # 0 (a run of a few steps): the probe comes first
            self.ramp_steps = self.warmup_steps  # the body warms up as long as the head trained alone

    @staticmethod
    def normalised(probe: dict[str, float], groups: Sequence[str]) -> dict[str, float]:
        """Each group's figure over the largest of the groups below the head; the head gets 1."""
        body = {g: probe.get(g, 0.0) for g in groups[:-1]}
        top = max(body.values(), default=0.0)
        return {**{g: (v / top if top > 0 else 1.0) for g, v in body.items()}, groups[-1]: 1.0}

    def resolves(self, signal: dict[str, float], groups: Sequence[str]) -> bool:
        """Whether some group below the head has a signal of at least ``floor`` (else the probe cannot rank them)."""
        return max((signal.get(g, 0.0) for g in groups[:-1]), default=0.0) >= self.floor

    def cut(self, signal: dict[str, float], groups: Sequence[str]) -> list[str]:
        """``depth``: the fewest top groups that hold ``coverage`` of the body's signal, and the head."""
        body = list(groups[:-1])
        shares = [max(0.0, signal.get(g, 0.0)) for g in body]
        total = sum(shares)
        if self.coverage >= 1 or not self.resolves(signal, groups):
            return list(groups)  # all of the signal, or a signal the probe cannot resolve: every group (LP-FT)
        held = 0.0
        for i in range(len(body) - 1, -1, -1):
            held += shares[i]
            if held >= self.coverage * total:
                return list(groups[i:])
        return list(groups)

    def phase(self, state: State) -> Phase:
        if not state.probe:  # before the probe: the head's warm-up, or (``show_groups``) every candidate
            if self.mode == "depth":  # the linear probe
                return Phase(state.groups[-1:])
            return Phase(state.groups[-1:] if self.warmup_steps else list(state.groups))
        if self.mode == "depth":
            return Phase(self.cut(state.signal or {}, state.groups))
        scales = self.normalised(state.probe, state.groups)
        if self.mode == "scale":
            return Phase(list(state.groups), group_lr_scales=scales)
        body = state.groups[:-1]
        ranked = sorted(body, key=lambda g: -scales[g])
        chosen = set(ranked[: self.count]) if self.count else {g for g in body if scales[g] >= self.threshold}
        chosen.add(state.groups[-1])
        return Phase([g for g in state.groups if g in chosen])


BUILTIN = {
    "full": Full,
    "head": Head,
    "freeze_unfreeze": FreezeUnfreeze,
    "gradual": Gradual,
    "milestones": Milestones,
    "retune": Retune,
    "auto": Auto,
}


def import_strategy(path: str, args: dict[str, Any] | None) -> Strategy:
    """A user's strategy from ``package.module:Class``, built with ``args`` as keyword arguments."""
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(
            f"cannot import strategy {path!r} ({err}): pass a built-in name "
            f"({', '.join(BUILTIN)}) or package.module:Class on PYTHONPATH"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UsageError(f"strategy {path!r} is not a subclass of peft_lightning.callbacks.strategies.Strategy")
    try:
        return cls(**(args or {}))
    except TypeError as err:
        raise UsageError(f"strategy {path!r} does not take --finetuning.strategy_args {args}: {err}") from None
