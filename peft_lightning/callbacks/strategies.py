"""Which layer groups train: one small class per fine-tuning strategy, each with its own options.

A strategy answers one question, in the spirit of Lightning's ``BaseFinetuning.finetune_function``: given where the
run is (``State``: the epoch, the re-tuning round, the monitored metric's history, the gradient probe), which groups
train and at which LR scale (``Phase``; groups are named by selectors, ``callbacks/groups.py``). Its options are its
constructor's typed arguments with their docstrings: the CLI checks them, and ``--help`` and ``--print_config`` show
them, the LightningCLI way: ``--finetuning.strategy retune`` (a built-in one by its short name, default options),
``--finetuning.strategy Retune --finetuning.strategy.round_epochs 1`` (its class, with options; in YAML
``strategy: {class_path: Retune, init_args: {round_epochs: 1}}``), ``--finetuning.strategy.help Retune``. A user's
strategy is a subclass of ``Strategy`` given by import path (``my_pkg.strategies.FirstAndHead``), its options typed
the same way (docs/layers.md, docs/contributing.md). The ``FineTuning`` callback applies the phase, saves what a
resume needs, and runs the rounds of a strategy that holds a ``Rounds`` (``callbacks/rounds.py``).

Here: the built-in strategies (``auto`` in ``auto.py``), their short names (``BUILTIN``), and, re-exported for a
user's strategy, the hook's types (``strategy_base.py``: ``State``, ``Phase``, ``Strategy``) and the selectors.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peft_lightning.callbacks.auto import Auto
from peft_lightning.callbacks.groups import Selector, select_groups, top_down
from peft_lightning.callbacks.rounds import Rounds
from peft_lightning.callbacks.strategy_base import Phase, State, Strategy, check_counts
from peft_lightning.errors import UsageError


class Full(Strategy):
    """Every group trains, from the first step."""

    def phase(self, state: State) -> Phase:
        return Phase(list(state.groups))


class Head(Strategy):
    """Only ``groups`` train, throughout: a linear probe (the default), or any fixed set.

    Args:
        groups: the groups that train: names, ranges, patterns (``[blocks.0, head]``, ``blocks.4-6``, ``layer.*``) or
            a count from the top (``3``).
    """

    def __init__(self, groups: Selector = 1) -> None:
        check_counts(groups=groups)
        self.groups = groups

    def phase(self, state: State) -> Phase:
        return Phase(select_groups(self.groups, state.groups))


class FreezeUnfreeze(Strategy):
    """``head`` until ``at_epoch``, then ``groups``.

    Args:
        head: the groups that train first (a count from the top, or names).
        at_epoch: the epoch of the unfreeze.
        groups: the groups that train from ``at_epoch`` on (a count from the top, or names); None: every group.
    """

    def __init__(self, head: Selector = 1, at_epoch: int = 1, groups: Selector | None = None) -> None:
        if at_epoch < 0:
            raise UsageError(f"at_epoch must be >= 0, got {at_epoch}")
        check_counts(head=head, groups=groups)
        self.head, self.at_epoch, self.groups = head, at_epoch, groups

    def phase(self, state: State) -> Phase:
        chosen = self.head if state.epoch < self.at_epoch else self.groups
        return Phase(select_groups(chosen, state.groups))


class Gradual(Strategy):
    """ULMFiT's gradual unfreezing: one more group every ``every`` epochs, from the top down.

    ``head`` trains until ``at_epoch``, then one more group of ``groups`` every ``every`` epochs (groups outside
    ``groups`` stay frozen, so the set may have holes).

    Args:
        head: the groups that train first (a count from the top, or names).
        at_epoch: the epoch of the first unfreeze.
        every: epochs between two unfreezes.
        groups: the groups it unfreezes, one at a time from the top (a count from the top, or names); None: all.
    """

    def __init__(self, head: Selector = 1, at_epoch: int = 1, every: int = 1, groups: Selector | None = None) -> None:
        if at_epoch < 0 or every < 1:
            raise UsageError(f"at_epoch must be >= 0 and every >= 1, got {at_epoch}, {every}")
        check_counts(head=head, groups=groups)
        self.head, self.at_epoch, self.every, self.groups = head, at_epoch, every, groups

    def phase(self, state: State) -> Phase:
        head = select_groups(self.head, state.groups)
        if state.epoch < self.at_epoch:
            return Phase(head)
        more = (state.epoch - self.at_epoch) // self.every + 1
        queue = [g for g in top_down(state.groups, select_groups(self.groups, state.groups)) if g not in head]
        chosen = set(head) | set(queue[:more])
        return Phase([g for g in state.groups if g in chosen])


@dataclass
class Milestone:
    """From ``epoch`` on, ``groups`` train (a count from the top, or selectors), at ``lr_scale`` x the schedule."""

    epoch: int
    groups: int | str | list[int | str]
    lr_scale: float = 1.0


class Milestones(Strategy):
    """Follows ``milestones``; before the first one, ``head`` trains.

    Args:
        milestones: a list of ``{epoch, groups, lr_scale}`` (``groups``: a count from the top or selectors), e.g.
            ``[{epoch: 0, groups: 1}, {epoch: 2, groups: [blocks.0, head], lr_scale: 0.5}]``.
        head: the groups that train before the first milestone.
    """

    def __init__(self, milestones: list[Milestone] | None = None, head: Selector = 1) -> None:
        if not milestones:
            raise UsageError(
                "strategy milestones needs its milestones, e.g. --finetuning.strategy Milestones "
                "--finetuning.strategy.milestones '[{epoch: 0, groups: 1}, {epoch: 2, groups: [blocks.0, head], "
                "lr_scale: 0.5}]'"
            )
        check_counts(head=head)
        ms = [m if isinstance(m, Milestone) else Milestone(**m) for m in milestones]
        self.milestones = sorted(ms, key=lambda m: m.epoch)
        self.head = head

    def phase(self, state: State) -> Phase:
        active = [m for m in self.milestones if m.epoch <= state.epoch]
        if not active:
            return Phase(select_groups(self.head, state.groups))
        return Phase(select_groups(active[-1].groups, state.groups), lr_scale=active[-1].lr_scale)


class Retune(Strategy):
    """Evaluation-driven re-tuning rounds, each adding groups, from the best weights so far.

    Round 0 trains ``head``; each later round (``Rounds``) starts from the best weights with a fresh optimizer and LR
    schedule and adds ``per_round`` groups of ``groups``, from the top down
    (``order="top"``) or those whose relative gradient norm is highest now (``order="rgn"``: a probe at each round's
    start), at ``lr_scale ** round``. Rounds end, and the run stops, as ``Rounds`` says (``--finetuning.monitor``).

    Args:
        head: the groups round 0 trains (a count from the top, or names).
        per_round: groups unfrozen at the start of each new round.
        lr_scale: LR multiplier applied once more in each new round (e.g. 0.5 halves it).
        groups: the groups rounds may unfreeze (a count from the top, or names); None: all.
        order: which groups a new round unfreezes: the next ones from the top (``top``), or the frozen ones whose
            relative gradient norm is highest at the round's start (``rgn``: a probe each round).
        patience: validations without an improvement of more than ``min_delta`` that end a round.
        min_delta: the smallest change of the monitored metric that counts as an improvement.
        round_epochs: most epochs in one round; each round's LR schedule spans this many epochs.
        max_rounds: most rounds; None: until nothing is left to unfreeze or a round brings nothing.
        probe_batches: ``order rgn``: training batches the gradient probe runs forward and backward.
    """

    def __init__(
        self,
        head: Selector = 1,
        per_round: int = 1,
        lr_scale: float = 1.0,
        groups: Selector | None = None,
        order: Literal["top", "rgn"] = "top",
        patience: int = 1,
        min_delta: float = 0.0,
        round_epochs: int = 3,
        max_rounds: int | None = None,
        probe_batches: int = 8,
    ) -> None:
        if min(per_round, probe_batches) < 1 or lr_scale <= 0 or order not in ("top", "rgn"):
            raise UsageError(
                f"per_round and probe_batches must be >= 1, lr_scale > 0 and order top or rgn, got {per_round}, "
                f"{probe_batches}, {lr_scale}, {order!r}"
            )
        check_counts(head=head, groups=groups)
        self.head, self.per_round, self.lr_scale, self.groups, self.order = head, per_round, lr_scale, groups, order
        self.rounds = Rounds(patience, min_delta, round_epochs, max_rounds)
        self.needs_probe = order == "rgn"  # only the rgn order probes
        self.probe_batches = probe_batches
        self.added: list[str] = []  # groups added by rounds 1.., in the order they were (saved: resume continues)

    def _queue(self, state: State) -> list[str]:
        head = select_groups(self.head, state.groups)
        queue = [g for g in top_down(state.groups, select_groups(self.groups, state.groups)) if g not in head]
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


StrategyName = Literal["full", "head", "freeze_unfreeze", "gradual", "milestones", "retune", "auto"]
"""The built-in strategies' short names: each stands for its class (``BUILTIN``) with its default options."""

BUILTIN: dict[str, type[Strategy]] = {
    "full": Full,
    "head": Head,
    "freeze_unfreeze": FreezeUnfreeze,
    "gradual": Gradual,
    "milestones": Milestones,
    "retune": Retune,
    "auto": Auto,
}


def build(strategy: Strategy | str | Mapping[str, Any]) -> Strategy:
    """``strategy`` itself; the built-in one a short name stands for, with its default options; or, in Python, the
    ``{class_path, init_args}`` a recipe's ``finetuning_defaults`` holds for the parser.

    Example:
        >>> build({"class_path": "peft_lightning.callbacks.strategies.Head", "init_args": {"groups": 2}}).groups
        2
    """
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, Mapping):
        module, _, attr = strategy["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), attr) if module else _CLASSES[attr]
        return cls(**strategy.get("init_args", {}))
    if strategy not in BUILTIN:
        raise UsageError(
            f"--finetuning.strategy {strategy!r} is unknown: use one of {', '.join(BUILTIN)}, or the import path of a "
            "subclass of peft_lightning.callbacks.strategies.Strategy"
        )
    return BUILTIN[strategy]()


def short_name(strategy: Strategy) -> str:
    """A built-in strategy's short name, else its class's name."""
    for cls in type(strategy).__mro__:  # a jsonargparse lazy_instance (a recipe's default) subclasses its class
        if cls in _NAMES:
            return _NAMES[cls]
        if not cls.__module__.startswith("jsonargparse"):
            return cls.__name__
    return type(strategy).__name__


_NAMES = {cls: short for short, cls in BUILTIN.items()}
_CLASSES = {cls.__name__: cls for cls in BUILTIN.values()}
