"""The evaluation metrics the tasks log, built from ``torchmetrics`` in one place.

Classification (vision and text) logs ``acc`` (micro: the share of correct predictions) and ``f1`` (macro: every
class counts alike, so a rare class a model ignores shows), plus what each domain adds: Matthews' correlation for
text (GLUE's metric for unbalanced sets), exact match for multi-label text, top-5 accuracy for images with more than
five classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


def classification_metrics(
    num_classes: int, *, multi_label: bool = False, threshold: float = 0.5, mcc: bool = True, top_k: int | None = None
) -> MetricCollection:
    """``acc`` and ``f1``, and ``mcc`` if asked; multi-label adds ``exact_match`` (every label right), ``top_k``
    adds ``acc_top{k}`` when there are more than ``k`` classes (single-label).

    Multi-label metrics take probabilities (``logits.sigmoid()``) and 0/1 targets; ``threshold`` makes them
    predictions. Single-label metrics take logits and class ids.

    Example:
        >>> sorted(classification_metrics(10, mcc=False, top_k=5))
        ['acc', 'acc_top5', 'f1']
    """
    from torchmetrics import MetricCollection
    from torchmetrics import classification as C

    n = num_classes
    metrics: dict[str, Any]
    if multi_label:
        metrics = {
            "acc": C.MultilabelAccuracy(n, threshold=threshold, average="micro"),
            "f1": C.MultilabelF1Score(n, threshold=threshold, average="macro"),
        }
        if mcc:
            metrics["mcc"] = C.MultilabelMatthewsCorrCoef(n, threshold=threshold)
        metrics["exact_match"] = C.MultilabelExactMatch(n, threshold=threshold)
        return MetricCollection(metrics)
    metrics = {"acc": C.MulticlassAccuracy(n, average="micro"), "f1": C.MulticlassF1Score(n, average="macro")}
    if mcc:
        metrics["mcc"] = C.MulticlassMatthewsCorrCoef(n)
    if top_k is not None and n > top_k:
        metrics[f"acc_top{top_k}"] = C.MulticlassAccuracy(n, top_k=top_k, average="micro")
    return MetricCollection(metrics)


def per_stage(metrics: MetricCollection) -> tuple[MetricCollection, MetricCollection]:
    """Separate copies for validation and test, logged as ``val/<name>`` and ``test/<name>``."""
    return metrics.clone(prefix="val/"), metrics.clone(prefix="test/")
