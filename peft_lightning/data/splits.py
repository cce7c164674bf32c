"""Carving a split the dataset lacks (validation, test) out of its training split: one rule for every data module."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets


def carve(ds: datasets.DatasetDict, source: str, name: str, fraction: float, seed: int, label: str | None) -> None:
    """Move a seeded ``fraction`` of split ``source`` into a new split ``name``, in place.

    When ``label`` is a ``ClassLabel`` column the carve is stratified: every class keeps its share on both sides.
    When that cannot be had (a class with a single example, or fewer carved examples than classes, as in a small
    local copy of a dataset) the carve is a plain seeded split, and a warning says so and why: the run goes on,
    and whoever reads its validation metrics knows a class may be missing from them. ``label`` None (or a column
    of another type, such as multi-hot labels) carves a plain seeded split without a word.
    """
    import datasets

    train = ds[source]
    feature = train.features[label] if label is not None else None
    stratify = label if isinstance(feature, datasets.ClassLabel) else None
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError:
        if stratify is None:
            raise
        counts = Counter(train[stratify])
        rare, fewest = min(counts.items(), key=lambda kv: kv[1])
        if fewest < 2:
            why = f"class {feature.int2str(rare)!r} has a single example"
        elif math.ceil(fraction * len(train)) < len(counts):  # datasets' count of carved examples
            why = f"{fraction:g} x {len(train)} examples cannot hold all {len(counts)} classes"
        else:
            raise
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"carved the {name!r} split from {source!r} without stratifying by label ({why}): some classes may be "
            f"missing from it; give the dataset a {name} split or raise --data.val_fraction"
        )
        parts = train.train_test_split(test_size=fraction, seed=seed)
    ds[source], ds[name] = parts["train"], parts["test"]
