"""The base of the data modules that read rows with ``datasets`` (images, texts ...): the options they share, the
split loading and the four loaders. A domain adds its columns and how a row becomes the model's inputs.

``setup`` runs the same steps for every domain:

1. ``load_splits()`` reads ``dataset`` (``data/source.py``); a recipe overrides it for sources ``datasets`` cannot
   read.
2. ``find_columns(ds)`` (the domain) finds its columns in the train split; the label column it names stratifies
   the carve.
3. A missing test, then val, split is carved from train (``data/splits.py``), seeded.
4. ``read_labels(ds)`` (the domain) reads the classes from the carved splits.
5. Each split is capped (``max_*_samples``: a seeded random subset) and ``encode``\\ d (the domain).

What the data needs from the model it feeds (timm's preprocessing, the tokenizer) it is handed by ``connect``,
called by whoever owns both before the data is set up, as LitGPT connects its data modules
(``litgpt/data/base.py``): the CLI does it for every run (``FineTuneTask.data_needs``); a notebook or a test that
builds its own ``Trainer`` calls ``data.connect(**model.data_needs())``.

``MovieLensDataModule`` is not one of these: its examples are interactions split by a protocol, not rows of tables.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from peft_lightning.data.checks import NON_NEGATIVE, POSITIVE, check_options, within
from peft_lightning.data.sampling import RowNumbers, cache_aware, train_loader
from peft_lightning.data.source import load_source
from peft_lightning.data.splits import carve
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

Collate = Callable[[list[dict[str, Any]]], Any]


def with_strings(collate: Collate, keys: tuple[str, ...] = ("id", "text", "target")) -> Collate:
    """``collate`` for rows that also carry strings (``keys``): those come out as lists beside the padded tensors."""

    def apply(features: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {k: [f.pop(k) for f in features] for k in keys if features and k in features[0]}
        return {**collate(features), **extra}

    return apply


class FineTuneDataModule(LightningDataModule):
    """Train/val/test rows read with ``datasets``, and the rows ``predict`` runs on, for one domain's model.

    A domain subclasses it, declares its own options (and ``dataset``/``predict_data`` with what they may name in
    that domain) and implements ``find_columns``, ``read_labels``, ``encode``, ``new_predict_set`` and
    ``test_predict_set``; ``connect``, ``collate_fn`` and ``row_lengths`` where it needs them.

    Args:
        dataset: what to load: a hub name, or a local file or folder (``data/source.py``).
        config_name: the hub dataset's configuration, if it has several (``sst2`` for GLUE SST-2).
        train_split: name of the training split.
        val_split: name of the validation split; when the dataset has none, ``val_fraction`` of train is carved
            out, stratified by label and seeded.
        test_split: name of the test split; carved from train like ``val_split`` when missing.
        val_fraction: fraction of train used for a missing val (and test) split.
        batch_size: per-device batch size.
        eval_batch_size: per-device batch size for val/test/predict (default: 2 × batch_size).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (speeds up copies to a GPU).
        persistent_workers: keep workers alive between epochs.
        max_train_samples: use a seeded random subset of this many training examples.
        max_val_samples: cap on validation examples (seeded random subset).
        max_test_samples: cap on test examples (seeded random subset).
        seed: seed of the carved splits and subsets, and of the training order (epoch e: seed + e).
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        predict_data: what ``predict`` runs on (default: the test split); the class names come from the
            checkpoint, so the training data need not be here.
    """

    source_kinds: ClassVar[str] = "parquet/csv/json files or a save_to_disk folder"
    """What a local copy of the dataset may be, for the messages of ``load_source``."""

    def __init__(
        self,
        dataset: str = "",
        config_name: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        val_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
        predict_data: str | None = None,
    ) -> None:
        super().__init__()
        # Checked here: a bad value would otherwise fail later, inside a DataLoader worker.
        check_options(
            val_fraction=(val_fraction, within(0, 0.5)),
            batch_size=(batch_size, POSITIVE),
            eval_batch_size=(eval_batch_size, POSITIVE),
            num_workers=(num_workers, NON_NEGATIVE),
            max_train_samples=(max_train_samples, POSITIVE),
            max_val_samples=(max_val_samples, POSITIVE),
            max_test_samples=(max_test_samples, POSITIVE),
            seed=(seed, NON_NEGATIVE),
        )
        self.save_hyperparameters()  # with the subclasses' arguments: Lightning reads every __init__ in the chain
        self.splits: dict[str, Any] = {}
        self.predict_set: Any = None
        self.label_column = "labels"  # the train split's label column, which the prefix cache reads (RowNumbers)
        self._index_rows: RowNumbers | None = None

    # --- what a domain implements ---
    def connect(self) -> None:
        """Take what this data needs from the model it feeds, before the data is set up (LitGPT's
        ``DataModule.connect``). A domain overrides it with keyword arguments (``ImageDataModule``: the model's
        ``data_config``, ``TextDataModule``: its ``tokenizer``), which its task's ``data_needs()`` gives. The CLI
        calls ``data.connect(**model.data_needs())`` for every run; so does whoever builds a ``Trainer`` by hand.
        The base needs nothing."""

    def find_columns(self, ds: datasets.DatasetDict) -> tuple[datasets.DatasetDict, str | None]:
        """Find this domain's columns in the train split, before the missing splits are carved; return the splits
        (with labels re-encoded, if the domain does that) and the label column to stratify the carve by (None: a
        plain seeded carve)."""
        raise NotImplementedError

    def read_labels(self, ds: datasets.DatasetDict) -> None:
        """Read the classes from the carved splits (all of them, uncapped) and check their labels."""

    def encode(self, split: str, rows: datasets.Dataset) -> Any:
        """One split's rows, capped, as the dataset its loader reads (a transform or a ``map`` making model inputs
        and ``labels``)."""
        raise NotImplementedError

    def new_predict_set(self, source: str) -> Any:
        """The rows ``predict_data`` names, encoded, with an ``id`` and (when they have labels) a ``target``."""
        raise NotImplementedError

    def test_predict_set(self) -> Any:
        """The test split as ``predict`` runs on it by default: its rows with an ``id`` and the true ``target``."""
        raise NotImplementedError

    def collate_fn(self) -> Collate | None:
        """How a batch of encoded rows is made (None: torch's ``default_collate``)."""
        return None

    def row_lengths(self, split: str) -> list[int] | None:
        """Each row's length when batches should group rows of similar length (training) and evaluation should run
        in length order; None: neither."""
        return None

    # --- loading ---
    def load_splits(self) -> datasets.DatasetDict:
        """Return the raw splits. Subclasses override this for sources ``datasets`` cannot read."""
        hp = self.hparams
        return load_source(hp.dataset, hp.config_name, hp.cache_dir, self.source_kinds)

    def own_cache(self, name: str) -> Path:
        """The folder of data this module derives itself (passages, scenes, splits read from raw files):
        ``cache_dir`` (default: ``datasets``' cache) / ``peft_lightning`` / ``name``."""
        import datasets

        return Path(self.hparams.cache_dir or datasets.config.HF_DATASETS_CACHE, "peft_lightning", name)

    def derived_splits(self, name: str, build: Callable[[], datasets.DatasetDict]) -> datasets.DatasetDict:
        """The splits ``build`` makes from files ``datasets`` cannot read, built once and saved as Arrow in
        ``own_cache(name)``: later runs read them back, so their tokenization is cached against files too."""
        import datasets

        folder = self.own_cache(name)
        if not (folder / "dataset_dict.json").is_file():
            build().save_to_disk(str(folder))
        return datasets.load_from_disk(str(folder))

    def _predicting_new_data(self) -> bool:
        return bool(self.hparams.predict_data) and self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        if not self._predicting_new_data():  # new data to predict on: the training data is not needed
            self.load_splits()  # downloads once, on one process; `setup` then reads the cache

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_data:  # new data: the training splits are not needed
            if self.predict_set is None:
                self.predict_set = self.new_predict_set(self.hparams.predict_data)
        elif not self.splits:
            self.build()

    def build(self) -> None:
        """Load, carve, cap and encode the three splits (the module docstring's steps)."""
        hp = self.hparams
        ds = self.load_splits()
        if hp.train_split not in ds:
            raise UsageError(
                f"the dataset has no split {hp.train_split!r} (splits: {', '.join(ds)}): pass --data.train_split NAME"
            )
        ds, label = self.find_columns(ds)
        for split in (hp.test_split, hp.val_split):  # test first, so val never overlaps it
            if split not in ds:
                carve(ds, hp.train_split, split, hp.val_fraction, hp.seed, label)
        caps = {
            hp.train_split: hp.max_train_samples,
            hp.val_split: hp.max_val_samples,
            hp.test_split: hp.max_test_samples,
        }
        for split in caps:
            if len(ds[split]) == 0:
                raise UsageError(f"split {split!r} is empty: check --data.dataset and the split names")
        self.read_labels(ds)
        splits = {}
        for split, cap in caps.items():
            rows = ds[split]
            if cap is not None and cap < len(rows):
                rows = rows.shuffle(seed=hp.seed).select(range(cap))
            splits[split] = self.encode(split, rows)
        self.splits = splits

    # --- loaders ---
    def index_dataset(self) -> RowNumbers:
        """The training split, each row numbered (``index``): the dataset the training loader reads, by whose numbers
        the prefix cache keys its rows and which it switches to serve cached epochs (``data.sampling.IndexedData``)."""
        if not self.splits:
            self.setup()
        split = self.splits[self.hparams.train_split]
        if self._index_rows is None or self._index_rows.data is not split:
            self._index_rows = RowNumbers(split, label_column=self.label_column)
        return self._index_rows

    def _loader_options(self) -> dict[str, Any]:
        hp = self.hparams
        return {"num_workers": hp.num_workers, "pin_memory": hp.pin_memory and torch.cuda.is_available()}

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or 2 * self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        collate = self.collate_fn()
        # An epoch-seeded order (grouped by length where the domain asks), resumed mid-epoch where it stopped
        # (data/sampling.py); the rows of a cached epoch are collated by torch's default.
        return train_loader(
            self,
            self.index_dataset(),
            hp.batch_size,
            hp.seed,
            lengths=self.row_lengths(hp.train_split),
            collate_fn=cache_aware(collate) if collate is not None else None,
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            **self._loader_options(),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        if not self.splits:
            self.setup()
        lengths = self.row_lengths(split)
        # Evaluation order does not change metrics; sorted by length, batches pad less.
        sampler = sorted(range(len(lengths)), key=lengths.__getitem__) if lengths is not None else None
        return DataLoader(
            self.splits[split],
            batch_size=self._eval_batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn(),
            persistent_workers=self.hparams.persistent_workers and self.hparams.num_workers > 0,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.val_split)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.test_split)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        if self.predict_set is None:  # no predict_data: the test split, with its ids and true labels
            self.predict_set = self.test_predict_set()
        collate = self.collate_fn()
        return DataLoader(  # in input order: the writer's rows line up with the data's
            self.predict_set,
            batch_size=self._eval_batch_size,
            collate_fn=with_strings(collate) if collate is not None else None,
            **self._loader_options(),
        )
