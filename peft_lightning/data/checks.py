"""Checks of what the data modules are given and what they declare.

Range checks of the data modules' numeric options run at construction: a bad value stops with one line naming
the option, before any data is read or a DataLoader worker trips over it. ``DataSpec`` is what a set-up data module
declares to the model it feeds (class count, users and items ...), checked by the task before the first step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class DataSpec:
    """What a data module declares about the model it feeds: the task's ``setup`` reads it (``data_spec``) to stop
    a model built for other data before the first step, and to name its classes.

    Each data module of this package defines ``spec() -> DataSpec``; a data module without it (a user's own
    ``LightningDataModule``, or plain dataloaders) declares nothing and nothing is checked.

    Example:
        >>> check_sizes(DataSpec({"num_items": 9}), num_items=3)
        Traceback (most recent call last):
        peft_lightning.errors.UsageError: the data has 9 items but the model was built for 3: pass --model.num_items 9
    """

    sizes: dict[str, int] = field(default_factory=dict)
    """Sizes the model must be built with, by the name of the model's argument: ``{"num_classes": 10}``,
    ``{"num_users": 943, "num_items": 1682}``. Empty until the data is set up."""
    class_names: list[str] = field(default_factory=list)
    """The classes (labels) in head order, for the model's config and whoever reads its predictions."""
    multi_label: bool | None = None
    """Whether each example has a set of labels (text); None where the question does not arise."""
    max_length: int | None = None
    """Most tokens an example has (text, after truncation): the padded width of the prefix cache's rows."""
    item_text: list[str] | None = None
    """One text per item id, for a recommender's text item tower (recsys)."""
    ids: dict[str, list[Any]] = field(default_factory=dict)
    """The data's own ids by the model's index, for whoever reads its predictions: ``{"user": [...], "item":
    [...]}`` (recsys)."""
    item_titles: list[str] | None = None
    """One title per item id, for whoever reads a recommender's predictions."""


def data_spec(datamodule: object) -> DataSpec:
    """``datamodule.spec()``, or an empty ``DataSpec`` for a data module that declares nothing (or None)."""
    spec = getattr(datamodule, "spec", None)  # the one probe: any LightningDataModule may be attached
    return spec() if callable(spec) else DataSpec()


def check_sizes(spec: DataSpec, **model_sizes: int) -> None:
    """Stop when a size the data declares differs from the model's argument of the same name.

    Raises:
        UsageError: ``the data has N <what> but the model was built for M: pass --model.<name> N``.
    """
    for name, built in model_sizes.items():
        n = spec.sizes.get(name)
        if n is not None and n != built:
            what = name.removeprefix("num_")
            raise UsageError(f"the data has {n} {what} but the model was built for {built}: pass --model.{name} {n}")
