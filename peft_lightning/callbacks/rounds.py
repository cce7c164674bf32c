"""Evaluation-driven re-tuning rounds: when a round ends, which weights it keeps, and when the run stops.

A strategy that re-tunes (``Retune``, or a user's strategy) holds a ``Rounds``; the ``FineTuning`` callback feeds it
the monitored metric after each validation and, when a round ends, starts the next one (the strategy's next phase,
a fresh optimizer and LR schedule, from the best weights). Everything here is kept in the callback's ``state_dict``,
so a resumed run continues the same round.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Literal

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import LightningModule


class Rounds:
    """Round 0 trains what the strategy starts with. A round ends after ``patience`` validations without an
    improvement of more than ``min_delta``, or after ``round_epochs``; then the best weights are restored and the next
    round starts. The run stops when a round fails to beat the best by ``min_delta``, the strategy has nothing left to
    add (``Strategy.done``), or ``max_rounds`` is reached; the final weights are the best seen.

    Args:
        patience: validations without an improvement of more than ``min_delta`` that end a round.
        min_delta: the smallest change of the monitored metric that counts as an improvement.
        round_epochs: most epochs in one round; each round's LR schedule spans this many epochs.
        max_rounds: most rounds; None: until nothing is left to add or a round brings nothing.
    """

    STATE = (
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
    )
    """What a resume needs, saved under these keys in the callback's ``state_dict``."""

    def __init__(self, patience: int = 1, min_delta: float = 0.0, round_epochs: int = 3, max_rounds: int | None = None):
        if min(patience, round_epochs) < 1:
            raise UsageError(f"patience and round_epochs must be >= 1, got {patience}, {round_epochs}")
        self.patience, self.min_delta, self.round_epochs, self.max_rounds = (
            patience,
            min_delta,
            round_epochs,
            max_rounds,
        )
        self.monitor: str | None = None  # set by the callback at setup (its monitor, else the task's)
        self.sign = 1.0  # +1: higher is better (mode max), -1: lower
        self.round = 0
        self.round_groups = 0  # groups that train in the current round (the table's column)
        self.round_epochs_done = 0
        self.bad_epochs = 0
        self.best: float | None = None
        self.round_best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.pending: Literal["next", "stop"] | None = None
        self.history: list[dict[str, Any]] = []
        self.round_seconds = 0.0
        self.started = time.perf_counter()

    def watch(self, monitor: str, mode: Literal["min", "max"]) -> None:
        """The metric that ends a round, and whether higher (``max``) or lower is better."""
        self.monitor, self.sign = monitor, 1.0 if mode == "max" else -1.0

    def start(self) -> None:
        """The current round's clock starts (at the start of fit: a resumed round counts from there)."""
        self.started = time.perf_counter()

    @property
    def stopping(self) -> bool:
        """Whether the rounds are over (the run stops, or was stopped, with the best weights)."""
        return self.pending == "stop"

    def observe(self, value: float, pl_module: LightningModule) -> bool:
        """Count one validation's ``value``, keep the best weights; True when this round ends."""
        self.round_epochs_done += 1
        if self.round_best is None or self.sign * (value - self.round_best) > self.min_delta:
            self.round_best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.best is None or self.sign * (value - self.best) > 0:
            self.best = value
            # Only what training changes (with adapters: not the frozen base), so checkpoints stay adapter-sized.
            state = pl_module.trainable_state_dict()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return self.bad_epochs >= self.patience or self.round_epochs_done >= self.round_epochs

    def end_round(self, pl_module: LightningModule, nothing_left: bool) -> None:
        """Close the round; stop (best weights restored) when it brought nothing, ``nothing_left`` or at
        ``max_rounds``, else the next round starts at the next epoch."""
        improved = (
            self.round == 0
            or not self.history
            or self.sign * (self.round_best - self.history[-1]["best"]) > self.min_delta
        )
        self._close(pl_module)
        if not improved or nothing_left or (self.max_rounds is not None and self.round + 1 >= self.max_rounds):
            self.pending = "stop"
            self.restore_best(pl_module)
        else:
            self.pending = "next"

    def next_round(self, pl_module: LightningModule) -> None:
        """Enter the next round from the best weights (the callback then applies its phase and a fresh optimizer)."""
        self.restore_best(pl_module)
        self.round += 1
        self.round_epochs_done = self.bad_epochs = 0
        self.round_best = None
        self.round_seconds = 0.0
        self.started = time.perf_counter()
        self.pending = None

    def finish(self, pl_module: LightningModule) -> None:
        """At the end of fit: a round cut short by ``max_epochs`` is closed, and the best weights restored."""
        if self.pending is None and self.round_epochs_done:
            self._close(pl_module)
            self.restore_best(pl_module)

    def restore_best(self, pl_module: LightningModule) -> None:
        if self.best_state is not None:
            # With adapters the frozen base is left out of best_state on purpose: only then is a partial load fine.
            partial = pl_module.trainable_parameter_names() is not None
            pl_module.load_state_dict(self.best_state, strict=not partial)

    def _close(self, pl_module: LightningModule) -> None:
        self.round_seconds += time.perf_counter() - self.started
        self.history.append(
            {
                "round": self.round,
                "groups": self.round_groups,
                "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                "best": self.round_best,
                "epochs": self.round_epochs_done,
                "seconds": round(self.round_seconds, 1),
            }
        )

    def table(self) -> str:
        """One line per round: groups, trainable parameters, best monitored value, epochs and wall time."""
        lines = [
            f"{'round':>5} {'groups':>6} {'trainable':>12} {'best ' + (self.monitor or ''):>14} {'epochs':>6} "
            f"{'wall s':>7}"
        ]
        for r in self.history:
            best = "-" if r["best"] is None or math.isnan(r["best"]) else f"{r['best']:.4f}"
            lines.append(
                f"{r['round']:>5} {r['groups']:>6} {r['trainable']:>12,} {best:>14} {r['epochs']:>6} "
                f"{r['seconds']:>7.1f}"
            )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE:
            if k in state:
                setattr(self, k, state[k])
