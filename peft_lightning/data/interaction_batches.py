"""Batches of interaction data: each user's known items, negative sampling for training pairs, and the users an
evaluation ranks every item for (their known items excluded, their held-out items the targets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from peft_lightning.errors import UsageError


class UserItemSets:
    """Each user's set of items as CSR arrays, densified for a batch of users on demand."""

    def __init__(self, user: np.ndarray, item: np.ndarray, num_users: int, num_items: int) -> None:
        order = np.lexsort((item, user))
        self.indices = item[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=num_users))])
        self.num_items = num_items

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def items(self, u: int) -> np.ndarray:
        return self.indices[self.indptr[u] : self.indptr[u + 1]]

    def dense(self, users: np.ndarray) -> torch.Tensor:
        """A ``[len(users), num_items]`` bool mask of the users' items."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        rows = np.repeat(np.arange(len(users)), ends - starts)
        cols = np.concatenate([self.indices[s:e] for s, e in zip(starts, ends)]) if len(users) else rows
        mask = torch.zeros(len(users), self.num_items, dtype=torch.bool)
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask


def sample_negatives(known: torch.Tensor, num: int, rejection_rounds: int = 8) -> torch.Tensor:
    """``num`` items per row drawn uniformly (with replacement) from the items that row does not know (``known``
    is a bool mask). Vectorised rejection first, redrawing only the hits; rows still holding a hit after a few
    rounds (users who know most items) are drawn exactly from their unknown items."""
    rows, num_items = known.shape
    neg = torch.randint(0, num_items, (rows, num))
    for _ in range(rejection_rounds):
        bad = known.gather(1, neg)
        if not bad.any():
            return neg
        neg[bad] = torch.randint(0, num_items, (int(bad.sum()),))
    left = known.gather(1, neg).any(1).nonzero().flatten()
    if len(left):
        free = (~known[left]).float()
        if (free.sum(1) == 0).any():
            raise UsageError("a user has interacted with every item: no negatives can be sampled for them")
        neg[left] = torch.multinomial(free, num, replacement=True)
    return neg


def as_batch(batch: Any) -> Any:
    """``collate_fn`` for datasets that build whole batches in ``__getitems__``."""
    return batch


class TrainPairs(Dataset):
    """(user, positive item) pairs; each batch adds ``num_negatives`` sampled negatives per pair and the users'
    known items (``history``: everything known when training, the positive included; a model that pools the
    history removes the positive itself)."""

    def __init__(self, user: np.ndarray, item: np.ndarray, known: UserItemSets, num_negatives: int) -> None:
        self.user, self.item, self.known, self.num_negatives = user, item, known, num_negatives

    def __len__(self) -> int:
        return len(self.user)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices)
        users = self.user[idx]
        history = self.known.dense(users)
        batch = {"users": torch.from_numpy(users), "items": torch.from_numpy(self.item[idx]), "history": history}
        if self.num_negatives:
            batch["negatives"] = sample_negatives(history, self.num_negatives)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])


class EvalUsers(Dataset):
    """Users with at least one held-out item; a batch is a chunk of users with their known items (``history``,
    excluded from the ranking) and held-out items (``target``)."""

    def __init__(self, known: UserItemSets, target: UserItemSets) -> None:
        self.users = np.flatnonzero(target.counts() > 0)
        self.known, self.target = known, target

    def __len__(self) -> int:
        return len(self.users)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        users = self.users[np.asarray(indices)]
        return {
            "users": torch.from_numpy(users),
            "history": self.known.dense(users),
            "target": self.target.dense(users),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])
