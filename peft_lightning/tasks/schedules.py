"""The learning-rate shapes of every task's schedule: linear warmup, then cosine, linear or constant, or the shape of
torch's ``OneCycleLR``, as a multiplier for ``LambdaLR`` (``FineTuneTask.configure_optimizers`` applies it per
layer group, times the fine-tuning callback's ``lr_scales``); and the two schedulers that apply those scales, the
step-wise ``GroupLambdaLR`` and the plateau-driven ``GroupPlateau``, both with ``refresh()``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

ONECYCLE_DIV = 25.0
"""OneCycle starts at ``lr / 25`` (torch's ``div_factor``) ..."""
ONECYCLE_FINAL_DIV = 1e4
"""... and ends at ``lr / 25 / 1e4`` (``final_div_factor``)."""


def _cos(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0, kind: str = "cosine"):
    """LR multiplier for ``LambdaLR``: linear warmup, then cosine/linear decay to ``min_ratio`` or constant;
    ``onecycle``: torch's ``OneCycleLR`` shape (cosine from 1/25 up to 1 over ``warmup_steps``, then down to
    1/25e4 at ``total_steps``).

    Defined for every step count >= 1 and every warmup (0, all of the run, more than the run), and past
    ``total_steps`` (held at its last value): a short round or a resumed run never divides by a zero-length phase
    nor steps past the end, as torch's ``OneCycleLR`` does (it raises on both).

    Example:
        >>> f = warmup_cosine(0, 1, kind="onecycle"); f(0), round(f(1), 6)
        (1.0, 4e-06)
    """
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if kind == "onecycle":
            low = 1.0 / ONECYCLE_DIV
            if step < warmup_steps:
                return _cos(low, 1.0, step / warmup_steps)
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return _cos(1.0, low / ONECYCLE_FINAL_DIV, progress)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def refresh_lambda_lr(sched: LambdaLR) -> None:
    """Recompute a ``LambdaLR``'s current LRs now (it does so only when it steps)."""
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)


def refresh_all(schedulers: Iterable[Any]) -> None:
    """Apply the LR scales now: a scheduler applies them only when it steps (per step, or per epoch under plateau),
    and a new phase's scales must hold from its first step. The task's schedulers have ``refresh()``; a plain
    ``LambdaLR`` of a task of one's own is recomputed the same way."""
    for sched in schedulers:
        if hasattr(sched, "refresh"):
            sched.refresh()
        elif isinstance(sched, LambdaLR):
            refresh_lambda_lr(sched)


class GroupLambdaLR(LambdaLR):
    """``LambdaLR`` with one multiplier per parameter group that reads the fine-tuning callback's LR scales live,
    and ``refresh()``: the current step's LRs recomputed at once (a new phase holds from its first step)."""

    def refresh(self) -> None:
        refresh_lambda_lr(self)


class GroupPlateau(ReduceLROnPlateau):
    """``ReduceLROnPlateau`` on one multiplier that every parameter group shares: group ``i`` trains at
    ``peak x scale x factors[i]()``, where ``scale`` halves (``factor``) when the monitored metric stops improving
    and ``factors`` read the fine-tuning callback's LR scales (layer decay, phase, per group). torch's
    ``ReduceLROnPlateau`` alone multiplies each group's current LR, so a scale set between epochs never reached
    the optimizer; here ``refresh()`` applies it, and so does every ``step``.

    Args:
        optimizer: the optimizer, each group's ``lr`` set to the peak.
        factors: one callable per parameter group, its LR multiplier now.
        mode, factor, patience: as ``ReduceLROnPlateau``'s.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        factors: Sequence[Callable[[], float]],
        mode: Literal["min", "max"] = "min",
        factor: float = 0.5,
        patience: int = 1,
    ) -> None:
        self.factors = list(factors)
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]
        self.scale = 1.0
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience)
        self.refresh()

    def refresh(self) -> None:
        for group, peak, fn in zip(self.optimizer.param_groups, self.peaks, self.factors):
            group["lr"] = peak * self.scale * fn()

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        before = [g["lr"] for g in self.optimizer.param_groups]
        super().step(metrics)
        if any(g["lr"] < lr for g, lr in zip(self.optimizer.param_groups, before)):  # the plateau reduced them
            self.scale *= self.factor
        self.refresh()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "factors"}  # callables do not pickle

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        factors = self.factors
        super().load_state_dict(state_dict)
        self.factors = factors
        self.refresh()
