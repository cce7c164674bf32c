"""MovieLens for top-k recommendation: the LightningDataModule that loads the interactions, splits them by a named
protocol and serves training pairs with sampled negatives and evaluation users who rank every item.

Its parts live in their own rooms: reading the files (``data/movielens_files.py``), the split protocols and their
part numbers (``data/interaction_splits.py``), and the batches: known items, negative sampling, evaluation users
(``data/interaction_batches.py``). Evaluation ranks all items for each user, excluding that user's known
interactions (all lower parts).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from peft_lightning.data.checks import NON_NEGATIVE, POSITIVE, DataSpec, check_options, within
from peft_lightning.data.interaction_batches import EvalUsers, TrainPairs, UserItemSets, as_batch
from peft_lightning.data.interaction_splits import PART_NAMES, assign_parts
from peft_lightning.data.movielens_files import Interactions, check_dataset, load_movielens
from peft_lightning.data.sampling import train_loader
from peft_lightning.errors import UsageError

log = logging.getLogger(__name__)


class MovieLensDataModule(LightningDataModule):
    """MovieLens as implicit feedback (every rating is an interaction), split by a named protocol.

    Not a ``FineTuneDataModule`` (``data/base.py``, the base of the image and text data): that one reads tables of
    rows with ``datasets``, carves missing splits from train and caps each split, and its options say so (split
    names, ``max_*_samples``, ``predict_data``). Here the examples are interactions split per user by a protocol,
    a training batch holds (user, item) pairs with sampled negatives and an evaluation batch holds users; the
    options the two share in name (``batch_size``, ``eval_batch_size``, ``val_fraction``, ``num_workers``, ``seed``,
    ``cache_dir``) mean other things here and have other defaults. The loaders share ``train_loader``
    (``data/sampling.py``); the recommender needs nothing from its model, so there is nothing to ``connect``.

    Args:
        dataset: ``ml-100k`` (offline from the recbole wheel, else GroupLens), ``ml-1m`` (GroupLens), or a
            folder with GroupLens (``u.data``/``ratings.dat``) or RecBole (``.inter``) files (a relative path is
            local, as for every data module: ``data/source.py``).
        split: ``stratified`` (per-user random, the Microsoft ``recommenders`` protocol), ``chrono`` (per-user by
            time) or ``temporal`` (a global time cut-off: pretrain before it, fine-tune after it).
        train_ratio: per-user fraction of interactions (rounded down) used for training (for ``temporal``: of
            each user's interactions after the cut-off); the rest is test.
        val_fraction: per-user fraction of the training interactions held out for validation (rounded).
        time_cut: for ``temporal``: the quantile of timestamps where the target period starts.
        phase: for ``temporal``: ``pretrain`` trains on the period before the cut-off, ``finetune`` on the
            training part of the period after it; both test on the held-out part of the period after it.
        min_rating: keep only ratings >= this as interactions (None keeps all, as the reference table does).
        num_negatives: negatives sampled per positive for training (never one of the user's known items).
        batch_size: training (user, item) pairs per batch.
        eval_batch_size: users per evaluation batch (each scores every item).
        num_workers: DataLoader worker processes.
        seed: seed of the random split.
        cache_dir: where GroupLens downloads are unpacked (default ``~/.cache/peft_lightning/movielens``).

    Example:
        >>> dm = MovieLensDataModule("ml-100k", split="stratified")  # doctest: +SKIP
        >>> dm.setup(); dm.num_users, dm.num_items
        (943, 1682)
    """

    def __init__(
        self,
        dataset: str = "ml-100k",
        split: Literal["stratified", "chrono", "temporal"] = "stratified",
        train_ratio: float = 0.75,
        val_fraction: float = 0.05,
        time_cut: float = 0.5,
        phase: Literal["pretrain", "finetune"] = "pretrain",
        min_rating: float | None = None,
        num_negatives: int = 1,
        batch_size: int = 1024,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_dataset(dataset)  # fail before any training machinery starts
        if split not in PART_NAMES:
            raise UsageError(f"unknown split {split!r}: use stratified, chrono or temporal")
        if phase not in ("pretrain", "finetune"):
            raise UsageError(f"unknown phase {phase!r}: use pretrain or finetune")
        check_options(
            train_ratio=(train_ratio, within(0, 1)),
            val_fraction=(val_fraction, within(0, 0.5)),
            time_cut=(time_cut, within(0, 1)),
            num_negatives=(num_negatives, NON_NEGATIVE),
            batch_size=(batch_size, POSITIVE),
            eval_batch_size=(eval_batch_size, POSITIVE),
            num_workers=(num_workers, NON_NEGATIVE),
            seed=(seed, NON_NEGATIVE),
        )
        self.save_hyperparameters()
        self.data: Interactions | None = None
        self.part: np.ndarray | None = None
        self.datasets: dict[str, Dataset] = {}

    # --- which parts play which role ---
    @property
    def stage_parts(self) -> dict[str, int]:
        if self.hparams.split != "temporal":
            return {"train": 0, "val": 1, "test": 2}
        return {
            "train": 0 if self.hparams.phase == "pretrain" else 2,
            "val": 1 if self.hparams.phase == "pretrain" else 3,
            "test": 4,
        }

    def load(self) -> Interactions:
        """The interactions (ratings below ``min_rating`` dropped). Subclasses override for other sources."""
        data = load_movielens(self.hparams.dataset, self.hparams.cache_dir)
        if self.hparams.min_rating is not None:
            keep = data.rating >= self.hparams.min_rating
            data = Interactions(
                data.user[keep],
                data.item[keep],
                data.timestamp[keep],
                data.rating[keep],
                data.item_text,
                data.raw_user_ids,
                data.raw_item_ids,
                data.source,
            )
        return data

    def prepare_data(self) -> None:
        self.load()  # downloads once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        data = self.data = self.load()
        if len(data.user) == 0:
            raise UsageError(f"no interactions in {hp.dataset!r} (min_rating {hp.min_rating}?)")
        self.part = part = assign_parts(data, hp.split, hp.train_ratio, hp.val_fraction, hp.time_cut, hp.seed)
        roles = self.stage_parts

        def sets(mask: np.ndarray) -> UserItemSets:
            return UserItemSets(data.user[mask], data.item[mask], data.num_users, data.num_items)

        train = part == roles["train"]
        if not train.any():
            raise UsageError(f"the {hp.split} split leaves no training interactions: check --data.time_cut")
        history = sets(part <= roles["train"])
        if (history.counts() >= data.num_items).any():
            raise UsageError("a user has interacted with every item: no negatives can be sampled for them")
        self.datasets["train"] = TrainPairs(data.user[train], data.item[train], history, hp.num_negatives)
        for stage_name in ("val", "test"):
            p = roles[stage_name]
            self.datasets[stage_name] = EvalUsers(sets(part < p), sets(part == p))
            if len(self.datasets[stage_name]) == 0:
                raise UsageError(f"the {stage_name} split is empty: check --data.val_fraction/--data.train_ratio")
        counts = {PART_NAMES[hp.split][k]: int((part == k).sum()) for k in range(len(PART_NAMES[hp.split]))}
        log.info(
            "%s from %s: %d users, %d items, parts %s", hp.dataset, data.source, data.num_users, data.num_items, counts
        )

    # --- what the model needs to know about the data ---
    @property
    def num_users(self) -> int | None:
        return self.data.num_users if self.data is not None else None

    @property
    def num_items(self) -> int | None:
        return self.data.num_items if self.data is not None else None

    @property
    def item_text(self) -> list[str]:
        if self.data is None:
            self.setup()
        return self.data.item_text

    def spec(self) -> DataSpec:
        """Users, items and the item texts once set up: what ``Recommender`` checks itself against and encodes."""
        if self.data is None:
            return DataSpec()
        return DataSpec(
            {"num_users": self.data.num_users, "num_items": self.data.num_items},
            item_text=self.data.item_text,
            ids={"user": self.data.raw_user_ids.tolist(), "item": self.data.raw_item_ids.tolist()},
            item_titles=self.data.item_titles or None,
        )

    # --- loaders ---
    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        workers = self.hparams.num_workers
        kwargs = {"collate_fn": as_batch, "num_workers": workers, "persistent_workers": workers > 0}
        if shuffle:  # an epoch-seeded order, resumed mid-epoch where it stopped (data/sampling.py)
            return train_loader(self, self.datasets[name], batch_size, self.hparams.seed, **kwargs)
        return DataLoader(self.datasets[name], batch_size=batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
