"""A shuffling sampler that is a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """Random order, re-drawn each epoch from ``seed + epoch``.

    ``torch``'s ``RandomSampler`` draws from a generator whose state is not in any checkpoint, so a run resumed at
    epoch 3 would see another order than an uninterrupted one. Lightning calls ``set_epoch`` before each epoch,
    as it does for ``DistributedSampler`` (which it substitutes for this one under DDP).
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length
