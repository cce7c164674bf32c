"""Which columns of a text-classification dataset hold the text and the labels, and how the labels become class ids
(single-label) or multi-hot vectors (multi-label): what ``TextDataModule`` reads before it tokenizes.

Every function stops with one line naming the ``--data.*`` flag to fix when the data does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peft_lightning.data.source import find_column
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

LabelFn = Callable[[dict[str, list]], list]
"""From a batch of rows (``datasets.map``, batched) to their labels."""

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
)


def is_text(feature: Any) -> bool:
    """Whether a column holds strings."""
    return getattr(feature, "dtype", None) in ("string", "large_string")


def text_columns(features: Any, text: str | None, pair: str | None) -> tuple[str, str | None]:
    """The text column and the pair's second text column (None for single texts): the named ones, else a usual
    pair (when no text column is named), else a usual text name, else the first column of strings."""
    if text is None:
        found = next(((a, b) for a, b in PAIR_COLUMNS if a in features and b in features), None)
        if found and pair is None:
            text, pair = found
        else:  # the usual names first, else the first column of strings (find_column)
            text = next((c for c in TEXT_COLUMNS if c in features and is_text(features[c])), None)
    text = find_column(features, text, "text", is_text, "strings")
    return text, None if pair is None else find_column(features, pair, "text_pair", is_text, "strings")


def label_columns(features: Any, column: str | list[str] | None) -> list[str]:
    """The label column(s): the named one(s), else the first ``ClassLabel`` (or list of them), else ``label`` or
    ``labels``."""
    import datasets

    col = column
    if col is None:
        col = next(
            (
                k
                for k, v in features.items()
                if isinstance(v, datasets.ClassLabel) or isinstance(getattr(v, "feature", None), datasets.ClassLabel)
            ),
            None,
        )
        col = col or next((k for k in ("label", "labels") if k in features), None)
    cols = (col or [None]) if isinstance(col, list) else [col]
    return [find_column(features, c, "label") for c in cols]


def to_class_labels(
    ds: datasets.DatasetDict, train_split: str, label: str, label_names: list[str] | None
) -> tuple[datasets.DatasetDict, list[str]]:
    """Single-label: make the label column a ``ClassLabel`` in every split (string names → ids), so carving
    can stratify and every split shares one id order. Returns the splits and the class names."""
    import datasets

    feature = ds[train_split].features[label]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if label_names is not None and len(label_names) != len(names):
            raise UsageError(
                f"label_names has {len(label_names)} names but the data has {len(names)} classes ({', '.join(names)})"
            )
        return ds, list(label_names or names)
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        names = label_names or sorted(str(v) for v in ds[train_split].unique(label) if v is not None)
    elif dtype is not None and "int" in dtype:
        top = max(ds[train_split].unique(label))
        names = label_names or [str(i) for i in range(top + 1)]
    else:
        raise UsageError(
            f"label column {label!r} holds {feature}, not class ids or names: pass "
            "--data.label_column NAME (or --data.multi_label true for lists of labels)"
        )
    target = datasets.ClassLabel(names=list(names))
    try:
        ds = datasets.DatasetDict({k: v.cast_column(label, target) for k, v in ds.items()})
    except ValueError as err:
        raise UsageError(f"label column {label!r}: {err}: list every class with --data.label_names") from None
    return ds, list(names)


def check_label_range(d: datasets.Dataset, split: str, label: str, num_labels: int) -> None:
    """Stop with one line when a split holds unlabelled rows (id -1) or class ids beyond the named classes."""
    values = [v for v in d.unique(label) if v is not None]
    if values and min(values) < 0:
        raise UsageError(
            f"split {split!r} has unlabelled rows (label -1, as GLUE's hidden test labels): "
            "evaluate on another split, e.g. --data.test_split validation"
        )
    if values and max(values) >= num_labels:
        raise UsageError(
            f"split {split!r} has label id {max(values)} but only {num_labels} classes are named: fix --data.label_names"
        )


def class_ids(column: str) -> LabelFn:
    """Single-label: the labels are the column's class ids (a ``ClassLabel`` after ``to_class_labels``)."""
    return lambda batch: batch[column]


def multi_hot_encoder(
    train: datasets.Dataset, cols: list[str], label_names: list[str] | None, separator: str
) -> tuple[LabelFn, list[str]]:
    """Multi-label: the function from a batch to multi-hot float vectors, and the label names.

    Several columns are one 0/1 column per label; one column holds lists of label ids or names, or names joined
    by ``separator``.
    """
    if len(cols) > 1:  # one 0/1 column per label

        def from_columns(batch: dict[str, list]) -> list[list[float]]:
            return [[float(v) for v in row] for row in zip(*(batch[c] for c in cols))]

        return from_columns, list(label_names or cols)
    col = cols[0]
    names, by_name = _names_in_column(train, col, label_names, separator)
    return _multi_hot(col, names, by_name, separator), names


def _names_in_column(
    train: datasets.Dataset, col: str, label_names: list[str] | None, separator: str
) -> tuple[list[str], dict[str, int] | None]:
    """The label names of a multi-label column, and the id of each name when rows hold names (None: ids)."""
    import datasets

    feature = train.features[col]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(label_names or inner.names), None
    if inner is not None and "int" in str(getattr(inner, "dtype", "")):
        top = max((i for row in train[col] for i in row), default=-1)
        return list(label_names or [str(i) for i in range(top + 1)]), None
    if getattr(inner, "dtype", None) in ("string", "large_string") or getattr(feature, "dtype", None) in (
        "string",
        "large_string",
    ):
        if label_names:
            names = list(label_names)
        else:
            rows = train[col]
            found = {n.strip() for row in rows if row for n in (row.split(separator) if isinstance(row, str) else row)}
            names = sorted(n for n in found if n)
        return names, {n: i for i, n in enumerate(names)}
    raise UsageError(
        f"multi-label column {col!r} holds {feature}: expected lists of label ids or names, or "
        f"names joined by {separator!r}; or pass one 0/1 column per label with --data.label_column"
    )


def _multi_hot(col: str, names: list[str], by_name: dict[str, int] | None, separator: str) -> LabelFn:
    """Rows of ``col`` (lists of ids or names, or joined names) as multi-hot vectors over ``names``."""
    k = len(names)

    def multi_hot(batch: dict[str, list]) -> list[list[float]]:
        out = []
        for row in batch[col]:
            items = [n.strip() for n in row.split(separator)] if isinstance(row, str) else (row or [])
            vec = [0.0] * k
            for item in items:
                if item == "":
                    continue
                idx = by_name.get(item) if by_name is not None else int(item)
                if idx is None or not 0 <= idx < k:
                    raise UsageError(
                        f"unknown label {item!r} in column {col!r} (known: "
                        f"{', '.join(names[:10])}): list every label with "
                        "--data.label_names"
                    )
                vec[idx] = 1.0
            out.append(vec)
        return out

    return multi_hot
