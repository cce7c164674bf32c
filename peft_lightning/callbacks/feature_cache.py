"""Outputs of the frozen part of a model, kept per training sample while only the head trains."""

from __future__ import annotations

import torch


class FeatureCache:
    """Row ``i`` holds the frozen backbone's output for training sample ``i``; grows as samples arrive.

    The FineTuning callback puts one on a task (``task.feature_cache``) while only the head trains and the
    training inputs are deterministic, and removes it the moment anything below the head unfreezes.
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        self.hits = 0
        self.misses = 0

    def get(self, index: torch.Tensor) -> torch.Tensor | None:
        """The cached rows for ``index``, or None unless every one of them is cached."""
        if self.filled is None or int(index.max()) >= len(self.filled) or not bool(self.filled[index].all()):
            self.misses += len(index)
            return None
        self.hits += len(index)
        return self.values[index]

    def put(self, index: torch.Tensor, values: torch.Tensor) -> None:
        values = values.detach()
        need = int(index.max()) + 1
        if self.values is None:
            self.values = values.new_zeros((need, *values.shape[1:]))
            self.filled = torch.zeros(need, dtype=torch.bool, device=values.device)
        elif need > len(self.values):  # grow by doubling: amortised O(1) per sample
            size = max(need, 2 * len(self.values))
            grown = values.new_zeros((size, *values.shape[1:]))
            grown[: len(self.values)] = self.values
            filled = torch.zeros(size, dtype=torch.bool, device=values.device)
            filled[: len(self.filled)] = self.filled
            self.values, self.filled = grown, filled
        self.values[index] = values.to(self.values.dtype)
        self.filled[index] = True
