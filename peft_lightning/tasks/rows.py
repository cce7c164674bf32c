"""The rows ``predict`` writes for a classifier: one per input, with its id, the predicted class name, its
probability, the top-k classes and their probabilities, and the true class name when the data has one. Each task's
``prediction_rows`` calls these on what its ``predict_step`` returned (``callbacks/predictions.py`` writes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def class_names_or_ids(names: Sequence[str], num_classes: int) -> list[str]:
    """``names`` when there is one per class, else the class ids as strings (a model trained on integer labels)."""
    return [str(n) for n in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


def _column(batch: Mapping[str, Any], key: str, n: int) -> list[Any] | None:
    value = batch.get(key)
    if value is None:
        return None
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)[:n]


def class_rows(probs: torch.Tensor, names: Sequence[str], top_k: int, batch: Mapping[str, Any]) -> list[dict]:
    """Single-label rows: ``id``, ``prediction``, ``probability``, ``top_k``, ``top_k_probs`` (and ``label``).

    Example:
        >>> class_rows(torch.tensor([[0.1, 0.9]]), ["cat", "dog"], 5, {"id": ["a.png"], "target": ["dog"]})
        [{'id': 'a.png', 'prediction': 'dog', 'probability': 0.8999999761581543, 'top_k': ['dog', 'cat'], 'top_k_probs': [0.8999999761581543, 0.10000000149011612], 'label': 'dog'}]
    """
    n = len(probs)
    top = probs.float().topk(min(top_k, probs.shape[1]), dim=1)
    ids, targets = _column(batch, "id", n), _column(batch, "target", n)
    rows = []
    for j, (classes, p) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
        row = {"id": ids[j] if ids else "", "prediction": names[classes[0]], "probability": p[0]}
        row |= {"top_k": [names[c] for c in classes], "top_k_probs": p}
        if targets is not None:  # a class id is named like the predictions
            t = targets[j]
            row["label"] = names[t] if isinstance(t, int) and 0 <= t < len(names) else t
        rows.append(row)
    return rows


def multi_label_rows(
    probs: torch.Tensor, names: Sequence[str], threshold: float, top_k: int, batch: Mapping[str, Any]
) -> list[dict]:
    """Multi-label rows: ``id``, ``prediction`` (the names over ``threshold``) with their ``probabilities``, the
    ``top_k`` labels with ``top_k_probs``, and ``label`` (the true names) when the data has them."""
    n = len(probs)
    probs = probs.float()
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    ids, targets = _column(batch, "id", n), _column(batch, "target", n)
    rows = []
    for j in range(n):
        chosen = (probs[j] > threshold).nonzero().flatten().tolist()
        row = {"id": ids[j] if ids else "", "prediction": [names[c] for c in chosen]}
        row |= {"probabilities": probs[j, chosen].tolist(), "top_k": [names[c] for c in top.indices[j].tolist()]}
        row["top_k_probs"] = top.values[j].tolist()
        if targets is not None:
            row["label"] = targets[j]
        rows.append(row)
    return rows
