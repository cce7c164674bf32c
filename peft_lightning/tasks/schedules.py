"""The learning-rate shapes of every task's schedule: linear warmup, then cosine, linear or constant, or the shape of
torch's ``OneCycleLR``, as a multiplier for ``LambdaLR`` (``FineTuneTask.configure_optimizers`` applies it per
layer group, times the fine-tuning callback's ``lr_scales``)."""

from __future__ import annotations

import math

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
