"""MovieLens interactions for top-k recommendation: loading, split protocols, negative sampling, full ranking.

Sources: ``ml-100k`` offline from the files the ``recbole`` wheel ships (GroupLens terms forbid redistribution, so
they are read where pip put them and never copied into this repository), ``ml-100k``/``ml-1m`` downloaded from
GroupLens when online, or a local folder in either format. Interactions are small integer tables consumed as
tensors, so they are read with numpy and kept in memory: ``datasets``/Arrow would add a copy and nothing else.

Every interaction gets a *part* number; parts are ordered so that everything in a lower part is known when a
higher part is predicted:

- ``stratified``: per user, a seeded random ``train_ratio`` of the ratings (rounded down) is train, the rest test
  (the protocol of the Microsoft ``recommenders`` MovieLens table); validation is carved from each user's train.
  Parts: train 0, val 1, test 2.
- ``chrono``: the same per-user ratios, by time (each user's latest ratings are test).
- ``temporal``: a global cut-off at the ``time_cut`` quantile of timestamps. Before it: pretraining data (A);
  after it: the target period (B), split per user by time into fine-tuning train and test. Parts: A-train 0,
  A-val 1, B-train 2, B-val 3, B-test 4. ``phase="pretrain"`` trains on 0 and validates on 1,
  ``phase="finetune"`` trains on 2 and validates on 3; both test on 4, so the two phases' test metrics compare
  the same users, items and held-out interactions.

Evaluation ranks all items for each user, excluding that user's known interactions (all lower parts).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from peft_lightning.assets import recbole_ml100k_dir
from peft_lightning.data.checks import NON_NEGATIVE, POSITIVE, DataSpec, check_options, within
from peft_lightning.data.sampling import train_loader
from peft_lightning.data.source import local_path
from peft_lightning.errors import UsageError

log = logging.getLogger(__name__)

GROUPLENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
GENRES_100K = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
PART_NAMES = {
    "stratified": ("train", "val", "test"),
    "chrono": ("train", "val", "test"),
    "temporal": ("A-train", "A-val", "B-train", "B-val", "B-test"),
}


# --------------------------------------------------------------------------- loading
@dataclass
class Interactions:
    """Implicit-feedback interactions with contiguous ids (``0..num_users-1``, ``0..num_items-1``)."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray
    item_text: list[str]
    """One text per item id: ``"Title (year). Genres: a, b"``, for text item towers."""
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    source: str = ""

    @property
    def num_users(self) -> int:
        return len(self.raw_user_ids)

    @property
    def num_items(self) -> int:
        return len(self.raw_item_ids)

    @classmethod
    def from_raw(
        cls,
        user: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        rating: np.ndarray,
        titles: dict[int, tuple[str, str, list[str]]],
        source: str,
    ) -> Interactions:
        """Index raw ids (items: those with ratings, in id order) and build each item's text."""
        raw_users, u = np.unique(user, return_inverse=True)
        raw_items, i = np.unique(item, return_inverse=True)
        texts = [item_text(*titles.get(int(r), (f"Movie {r}", "", []))) for r in raw_items]
        return cls(
            u.astype(np.int64),
            i.astype(np.int64),
            timestamp.astype(np.int64),
            rating.astype(np.float32),
            texts,
            raw_users,
            raw_items,
            source,
        )


def item_text(title: str, year: str, genres: list[str]) -> str:
    """The text a text item tower reads: title, year and genres, e.g. ``Toy Story (1995). Genres: Comedy``."""
    text = f"{title} ({year})" if year else title
    genres = [g for g in genres if g != "unknown"]
    return f"{text}. Genres: {', '.join(genres)}" if genres else text


def _split_title(title: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> (``"Toy Story"``, ``"1995"``)."""
    title = title.strip()
    if title.endswith(")") and title[-6:-5] == "(" and title[-5:-1].isdigit():
        return title[:-6].strip(), title[-5:-1]
    return title, ""


def read_recbole(folder: Path) -> Interactions:
    """RecBole atomic files: ``<name>.inter`` (user, item, rating, timestamp) and ``<name>.item``."""
    inter = next(folder.glob("*.inter"), None)
    if inter is None:
        raise UsageError(f"no RecBole .inter file in {str(folder)!r}")
    with open(inter, encoding="utf-8") as f:
        f.readline()  # header: user_id:token item_id:token rating:float timestamp:float
        table = np.array(f.read().split(), dtype=np.float64).reshape(-1, 4)
    titles: dict[int, tuple[str, str, list[str]]] = {}
    item_file = inter.with_suffix(".item")
    if item_file.is_file():
        with open(item_file, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\n").split("\t")
            cols = [name.split(":")[0] for name in header]
            for line in f:
                row = dict(zip(cols, line.rstrip("\n").split("\t")))
                titles[int(row["item_id"])] = (
                    row.get("movie_title", ""),
                    row.get("release_year", ""),
                    row.get("class", "").split(),
                )
    return Interactions.from_raw(
        table[:, 0].astype(np.int64),
        table[:, 1].astype(np.int64),
        table[:, 3],
        table[:, 2],
        titles,
        f"recbole:{folder}",
    )


def read_grouplens_100k(folder: Path) -> Interactions:
    """The original ml-100k files: ``u.data`` (tab-separated) and ``u.item`` (``|``-separated, latin-1)."""
    table = np.array((folder / "u.data").read_text().split(), dtype=np.int64).reshape(-1, 4)
    titles = {}
    with open(folder / "u.item", encoding="latin-1") as f:
        for line in f:
            row = line.rstrip("\n").split("|")
            if len(row) < 24:
                continue
            title, year = _split_title(row[1])
            year = year or row[2][-4:]
            titles[int(row[0])] = (title, year, [g for g, flag in zip(GENRES_100K, row[5:24]) if flag == "1"])
    return Interactions.from_raw(table[:, 0], table[:, 1], table[:, 3], table[:, 2], titles, f"grouplens:{folder}")


def read_grouplens_1m(folder: Path) -> Interactions:
    """The original ml-1m files: ``ratings.dat`` and ``movies.dat`` (``::``-separated, latin-1)."""
    text = (folder / "ratings.dat").read_text(encoding="latin-1")
    table = np.array(text.replace("::", " ").split(), dtype=np.int64).reshape(-1, 4)
    titles = {}
    with open(folder / "movies.dat", encoding="latin-1") as f:
        for line in f:
            row = line.rstrip("\n").split("::")
            if len(row) == 3:
                title, year = _split_title(row[1])
                titles[int(row[0])] = (title, year, row[2].split("|"))
    return Interactions.from_raw(table[:, 0], table[:, 1], table[:, 3], table[:, 2], titles, f"grouplens:{folder}")


def read_folder(folder: Path) -> Interactions:
    """Whichever MovieLens format the folder holds."""
    try:
        if (folder / "u.data").is_file():
            return read_grouplens_100k(folder)
        if (folder / "ratings.dat").is_file():
            return read_grouplens_1m(folder)
        if next(folder.glob("*.inter"), None) is not None:
            return read_recbole(folder)
    except (OSError, ValueError, IndexError) as err:
        raise UsageError(
            f"cannot read MovieLens files in {str(folder)!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else ''}): are they complete?"
        ) from None
    raise UsageError(
        f"{str(folder)!r} holds no MovieLens files: expected u.data + u.item (ml-100k), "
        "ratings.dat + movies.dat (ml-1m) or RecBole .inter/.item files"
    )


def download(name: str, cache_dir: Path, timeout: float = 30.0) -> Path:
    """Download and unpack a GroupLens zip into ``cache_dir`` once; returns the unpacked folder."""
    target = cache_dir / name
    if target.is_dir() and any(target.iterdir()):
        return target
    url = GROUPLENS_URLS[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as err:  # URLError and timeouts are OSErrors
            raise UsageError(
                f"cannot download {name} from {url} ({type(err).__name__}; offline?): download and "
                f"unzip it elsewhere, then pass --data.dataset /path/to/{name}"
            ) from None
        shutil.move(str(Path(tmp) / name), str(target))
    return target


def check_dataset(dataset: str) -> Path | None:
    """The local folder ``dataset`` names, or None for a known name (``ml-100k``, ``ml-1m``); one line otherwise.

    A path is told from a name by the rule every data module follows (``data/source.py``).
    """
    path = local_path(dataset)
    if path is None and dataset not in GROUPLENS_URLS:
        raise UsageError(
            f"--data.dataset {dataset!r}: unknown dataset name; pass ml-100k, ml-1m or a folder of MovieLens files"
        )
    if path is not None and not path.is_dir():
        raise UsageError(f"--data.dataset {dataset!r} is a file: pass the folder of MovieLens files it is in")
    return path


def load_movielens(dataset: str, cache_dir: str | Path | None = None) -> Interactions:
    """Load ``ml-100k`` (offline from the recbole wheel if installed, else downloaded), ``ml-1m`` (downloaded)
    or a local folder in GroupLens or RecBole format.

    Example:
        >>> data = load_movielens("ml-100k")  # doctest: +SKIP
        >>> data.num_users, data.num_items, len(data.user)
        (943, 1682, 100000)
    """
    path = check_dataset(dataset)
    if path is not None:
        return read_folder(path)
    cache = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "peft_lightning" / "movielens"
    if (cache / dataset).is_dir():
        return read_folder(cache / dataset)
    if dataset == "ml-100k" and (folder := recbole_ml100k_dir()) is not None:
        return read_recbole(folder)  # the same 100,000 ratings GroupLens ships, read where pip installed them
    return read_folder(download(dataset, cache))


# --------------------------------------------------------------------------- split protocols
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


# --------------------------------------------------------------------------- batches
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


def _as_batch(batch: Any) -> Any:
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


# --------------------------------------------------------------------------- the data module
class MovieLensDataModule(LightningDataModule):
    """MovieLens as implicit feedback (every rating is an interaction), split by a named protocol.

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
            {"num_users": self.data.num_users, "num_items": self.data.num_items}, item_text=self.data.item_text
        )

    # --- loaders ---
    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        workers = self.hparams.num_workers
        kwargs = {"collate_fn": _as_batch, "num_workers": workers, "persistent_workers": workers > 0}
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
