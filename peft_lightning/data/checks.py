"""Range checks of the data modules' numeric options, run at construction: a bad value stops with one line naming
the option, before any data is read or a DataLoader worker trips over it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peft_lightning.errors import UsageError

Rule = tuple[str, Callable[[Any], bool]]
"""What a value must be (for the message) and the test of it."""


def at_least(low: float) -> Rule:
    return f">= {low:g}", lambda v: v >= low


def within(low: float, high: float, *, closed_high: bool = False) -> Rule:
    """The interval ``(low, high)``, or ``(low, high]``."""
    return (
        f"in ({low:g}, {high:g}{']' if closed_high else ')'}",
        lambda v: low < v <= high if closed_high else low < v < high,
    )


def increasing_pair(rule: Rule) -> Rule:
    """A ``(min, max)`` pair whose two ends both pass ``rule``."""
    text, ok = rule
    return f"a (min, max) pair {text}", lambda v: len(v) == 2 and v[0] <= v[1] and ok(v[0]) and ok(v[1])


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
PROBABILITY: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)


def check_options(prefix: str = "data", **options: tuple[Any, Rule]) -> None:
    """Stop at the first option whose value breaks its rule; None means unset and passes.

    Example:
        >>> check_options(image_size=(-1, POSITIVE))
        Traceback (most recent call last):
        peft_lightning.errors.UsageError: data.image_size must be >= 1, got -1

    Raises:
        UsageError: ``<prefix>.<option> must be <rule>, got <value>``.
    """
    for name, (value, (text, ok)) in options.items():
        if value is None:
            continue
        try:
            good = bool(ok(value))
        except TypeError:  # a wrong type from Python callers (the CLI has checked types already)
            good = False
        if not good:
            raise UsageError(f"{prefix}.{name} must be {text}, got {value!r}")
