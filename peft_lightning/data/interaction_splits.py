"""Split protocols of interaction data: every interaction gets a *part* number.

Parts are ordered so that everything in a lower part is known when a higher part is predicted:

- ``stratified``: per user, a seeded random ``train_ratio`` of the ratings (rounded down) is train, the rest test
  (the protocol of the Microsoft ``recommenders`` MovieLens table); validation is carved from each user's train.
  Parts: train 0, val 1, test 2.
- ``chrono``: the same per-user ratios, by time (each user's latest ratings are test).
- ``temporal``: a global cut-off at the ``time_cut`` quantile of timestamps. Before it: pretraining data (A);
  after it: the target period (B), split per user by time into fine-tuning train and test. Parts: A-train 0,
  A-val 1, B-train 2, B-val 3, B-test 4. ``phase="pretrain"`` trains on 0 and validates on 1,
  ``phase="finetune"`` trains on 2 and validates on 3; both test on 4, so the two phases' test metrics compare
  the same users, items and held-out interactions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from peft_lightning.data.movielens_files import Interactions

PART_NAMES = {
    "stratified": ("train", "val", "test"),
    "chrono": ("train", "val", "test"),
    "temporal": ("A-train", "A-val", "B-train", "B-val", "B-test"),
}


def _rank_within_user(user: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each interaction: its 1-based rank among its user's interactions ordered by ``key``, and the
    user's interaction count."""
    order = np.lexsort((key, user))
    counts = np.bincount(user, minlength=int(user.max()) + 1 if len(user) else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(user), dtype=np.int64)
    rank[order] = np.arange(len(user)) - starts[user[order]] + 1
    return rank, counts[user]


def per_user_split(user: np.ndarray, key: np.ndarray, ratio: float) -> np.ndarray:
    """True for the first ``floor(ratio * n)`` interactions of each user (``n`` of them) in ``key`` order.

    With a random key this is the Microsoft ``recommenders`` stratified split (``rank / n <= ratio``); with
    timestamps it is their chronological split.
    """
    rank, count = _rank_within_user(user, key)
    return rank <= np.floor(ratio * count + 1e-9)


def carve_per_user(user: np.ndarray, key: np.ndarray, fraction: float, last: bool = True) -> np.ndarray:
    """True for ``round(fraction * n)`` interactions of each user: the last ones in ``key`` order (or first)."""
    rank, count = _rank_within_user(user, key)
    n = np.floor(fraction * count + 0.5)
    return rank > count - n if last else rank <= n


def assign_parts(
    data: Interactions, split: str, train_ratio: float, val_fraction: float, time_cut: float, seed: int
) -> np.ndarray:
    """The part number of every interaction under ``split`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    user, ts = data.user, data.timestamp
    part = np.zeros(len(user), dtype=np.int8)
    # Ties in time are broken by a seeded random key, so the chronological protocols are deterministic too.
    tiebreak = rng.random(len(user))
    time_key = ts + tiebreak * 0.5
    if split in ("stratified", "chrono"):
        key = rng.random(len(user)) if split == "stratified" else time_key
        train = per_user_split(user, key, train_ratio)
        part[~train] = 2
        idx = np.flatnonzero(train)
        val = carve_per_user(user[idx], key[idx], val_fraction)
        part[idx[val]] = 1
        return part
    cut = np.quantile(ts, time_cut)
    before = ts < cut
    a, b = np.flatnonzero(before), np.flatnonzero(~before)
    part[a[carve_per_user(user[a], time_key[a], val_fraction)]] = 1
    b_train = per_user_split(user[b], time_key[b], train_ratio)
    part[b[~b_train]] = 4
    bt = b[b_train]
    part[bt] = 2
    part[bt[carve_per_user(user[bt], time_key[bt], val_fraction)]] = 3
    return part
