"""Top-k ranking evaluation for recommendation: the ``torchmetrics.retrieval`` metrics at ``k``, and the few
``(preds, target, indexes)`` they need from full score rows (every item scored for each user).

(The classification metrics are ``tasks/metrics.py``'s; ``per_stage`` there makes the val/test copies of these.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


def ranking_metrics(k: int) -> MetricCollection:
    """NDCG, precision, recall, hit rate and MAP at ``k``, named ``ndcg@{k}`` ... ``map@{k}``."""
    from torchmetrics import MetricCollection
    from torchmetrics.retrieval import (
        RetrievalHitRate,
        RetrievalMAP,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    return MetricCollection(
        {
            f"ndcg@{k}": RetrievalNormalizedDCG(top_k=k),
            f"precision@{k}": RetrievalPrecision(top_k=k),
            f"recall@{k}": RetrievalRecall(top_k=k),
            f"hitrate@{k}": RetrievalHitRate(top_k=k),
            f"map@{k}": RetrievalMAP(top_k=k),
        }
    )


def ranking_inputs(
    scores: torch.Tensor, history: torch.Tensor, target: torch.Tensor, users: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn full score rows into the few ``(preds, target, indexes)`` torchmetrics needs for exact @k metrics.

    Known items (``history``) are excluded; each user keeps only its top-k items and its held-out items (recall and
    NDCG need every relevant item, the rest cannot enter the top k). ``preds`` are rank-based and positive
    (torchmetrics' MAP ignores targets with ``preds <= 0``): top-k items get ``k .. 1`` in rank order, held-out
    items outside the top k get values in (0, 1) that keep them below it.
    """
    k = min(top_k, scores.shape[1])
    scores = scores.float().masked_fill(history, float("-inf"))
    top = scores.topk(k, dim=1).indices
    preds = torch.zeros_like(scores)
    preds.scatter_(1, top, torch.arange(k, 0, -1, device=scores.device, dtype=scores.dtype).expand_as(top))
    rest = target & (preds == 0)
    # Below the top k, keep the model's order among held-out items (it matters only for ties at the cut).
    preds = torch.where(rest, torch.sigmoid(scores.clamp(min=-60)) * 0.5 + 0.25, preds)
    row, col = (preds > 0).nonzero(as_tuple=True)
    return preds[row, col], target[row, col], users[row]
