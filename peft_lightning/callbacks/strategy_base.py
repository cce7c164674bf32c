"""The base of every fine-tuning strategy: what it sees (``State``), what it answers (``Phase``), and the hook
(``Strategy``). The built-in strategies are in ``strategies.py`` (``auto`` in ``auto.py``), which re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peft_lightning.callbacks.groups import Selector
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.callbacks.rounds import Rounds


@dataclass
class State:
    """Where the run is, as a strategy sees it."""

    epoch: int
    groups: list[str]
    """Every layer group of the model, input side first."""
    round: int = 0
    """The re-tuning round (strategies that hold a ``Rounds``); 0 otherwise."""
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
    """The hook every strategy implements: ``phase(state)``; its options are its constructor's typed arguments.

    Attributes tell the callback what else the strategy needs:
    ``rounds``: a ``Rounds`` for evaluation-driven rounds (the callback ends a round when the monitored metric stops
    improving, restores the best weights and starts the next with a fresh optimizer and schedule, ``State.round`` +
    1); None: no rounds.
    ``needs_probe``: a gradient probe of ``probe_batches`` training batches (``State.probe``), after ``warmup_steps``
    training steps; ``ramp_steps``: steps over which the groups the probe chose warm up their LR from near 0 (0:
    none); ``rescale_every``: steps between two re-measurements of the probe from the training gradients (0: never).
    A strategy with state of its own implements ``state_dict`` / ``load_state_dict`` (saved in checkpoints).
    """

    rounds: Rounds | None = None
    needs_probe: bool = False
    probe_batches: int = 8
    warmup_steps: int = 0
    ramp_steps: int = 0
    rescale_every: int = 0

    def phase(self, state: State) -> Phase:
        raise NotImplementedError

    def plan(self, total_steps: int) -> None:
        """Called once the run's optimizer steps are known (before training), for a strategy whose phases depend
        on them (``auto``'s linear probe is a share of the run)."""

    def done(self, state: State) -> bool:
        """For a strategy with ``rounds``: whether no further round could train anything new."""
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_counts(**selectors: Selector | None) -> None:
    """A count of groups in a selector must be >= 1 (checked when the strategy is built, before any work)."""
    for name, selector in selectors.items():
        items = [] if selector is None else [selector] if isinstance(selector, (int, str)) else list(selector)
        for item in items:
            if not isinstance(item, bool) and str(item).strip().isdigit() and int(item) < 1:
                raise UsageError(f"{name} must be >= 1 when it counts groups from the top, got {item}")
