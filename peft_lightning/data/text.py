"""Text classification data on Hugging Face ``datasets``: a hub name or local csv/json/parquet files, tokenized once.

The tokenized splits are ``datasets.map`` outputs with a fingerprint derived from the source split, the tokenizer's
vocabulary and settings, ``max_length`` and the label spec, so a second run (or every other rank of a DDP job)
loads the Arrow cache files instead of tokenizing again. Padding happens per batch (``DataCollatorWithPadding``).
Which columns hold the text and the labels, and how the labels are encoded, is ``data/text_columns.py``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from peft_lightning.data.checks import NON_NEGATIVE, POSITIVE, DataSpec, at_least, check_options, within
from peft_lightning.data.sampling import RowNumbers, cache_aware, train_loader
from peft_lightning.data.source import load_source
from peft_lightning.data.splits import carve
from peft_lightning.data.text_columns import (
    check_label_range,
    class_ids,
    label_columns,
    multi_hot_encoder,
    text_columns,
    to_class_labels,
)
from peft_lightning.errors import UsageError
from peft_lightning.internals import dataset_fingerprint

if TYPE_CHECKING:
    import datasets

# Bump when the encoding below changes: it is part of the cache fingerprint.
ENCODING_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer does to text. Truncation/padding state is left out: calling a fast tokenizer
    changes it, and ``max_length`` is hashed separately."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        content: Any = json.dumps(spec, sort_keys=True)
    else:
        content = sorted(tokenizer.get_vocab().items())
    return Hasher.hash([type(tokenizer).__name__, content, tokenizer.model_input_names, tokenizer.all_special_tokens])


def encode(
    batch: dict[str, list], tokenizer: Any, text: str, pair: str | None, max_length: int, labels: Any
) -> dict[str, list]:
    """The batched ``datasets.map`` function: token ids (truncated, unpadded), labels and lengths."""
    # Empty csv cells arrive as None: they are empty texts, not errors.
    texts = [t or "" for t in batch[text]]
    pairs = [t or "" for t in batch[pair]] if pair else None
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    out["labels"] = labels(batch)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    return dict(out)


def encode_for_predict(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: Any,
    text: str,
    pair: str | None,
    max_length: int,
    target: Any,
) -> dict[str, list]:
    """Tokens plus what a prediction row shows: the row (``id``), the text and, when ``target`` reads one, the true
    label (a class id, a name, or a list of names for multi-label)."""
    texts = [t or "" for t in batch[text]]
    out = dict(
        tokenizer(texts, [t or "" for t in batch[pair]] if pair else None, truncation=True, max_length=max_length)
    )
    out["id"] = [str(i) for i in indices]
    out["text"] = texts if pair is None else [f"{a} [SEP] {b or ''}" for a, b in zip(texts, batch[pair])]
    if target is not None:
        out["target"] = target(batch)
    return out


def with_strings(collate: Any, keys: tuple[str, ...] = ("id", "text", "target")) -> Any:
    """``collate`` for rows that also carry strings (``keys``): those come out as lists beside the padded tensors."""

    def apply(features: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {k: [f.pop(k) for f in features] for k in keys if features and k in features[0]}
        return {**collate(features), **extra}

    return apply


class TextDataModule(LightningDataModule):
    """Train/val/test text-classification data, tokenized for the model being tuned.

    The tokenizer is the attached model's (``TextClassifier.load_tokenizer()``, the same checkpoint as the
    weights), the way ``ImageDataModule`` takes its preprocessing from the model; pass ``tokenizer`` to use
    another or to use this module on its own.

    Args:
        dataset: a hub name (``nyu-mll/glue``), a csv/tsv/json/jsonl/parquet/arrow file (read as the train
            split), a folder of such files named by split (``train.csv``, ``validation.csv``, ``test.csv``), or a
            ``save_to_disk`` folder; relative paths are local (``data/source.py``).
        config_name: the hub dataset's configuration (``sst2`` for GLUE SST-2).
        train_split: name of the training split.
        val_split: name of the validation split; when the dataset has none, ``val_fraction`` of train is carved
            out, stratified by label and seeded.
        test_split: name of the test split; carved from train like ``val_split`` when missing.
        val_fraction: fraction of train used for a missing val (and test) split.
        text_column: column with the text (default: ``text``, ``sentence``, ... or the first string column).
        text_pair_column: second text of a pair (NLI, paraphrase); default: detected for the usual pairs
            (``sentence1``/``sentence2``, ``question``/``sentence``, ``premise``/``hypothesis``) when
            ``text_column`` is not given.
        label_column: column with the labels (default: the first ``ClassLabel``, else ``label``/``labels``);
            for multi-label, a list of 0/1 columns (one per label) also works.
        label_names: names of the classes, in id order: fixes the order of string labels, or names integer ids
            (integer labels are class ids ``0..K-1``).
        multi_label: each row has a set of labels: a list of ids or names, a string of names joined by
            ``label_separator``, or one 0/1 column per label. Batches then carry multi-hot float labels.
        label_separator: separator of names in a multi-label string column (csv files).
        tokenizer: hub name or local directory of the tokenizer; default: the attached model's.
        max_length: tokens kept per example (longer ones are truncated).
        group_by_length: batch examples of similar length together (fewer pad tokens, faster on CPUs): training
            batches come from length-sorted chunks of 50 batches, shuffled; val/test run in length order.
        batch_size: per-device batch size.
        eval_batch_size: per-device batch size for val/test/predict (default: 2 × batch_size).
        num_workers: DataLoader worker processes (padding is cheap: 0 is fine on small machines).
        pin_memory: pin host memory (speeds up copies to a GPU).
        persistent_workers: keep workers alive between epochs.
        max_train_samples: use a seeded random subset of this many training examples.
        max_val_samples: cap on validation examples (seeded random subset).
        max_test_samples: cap on test examples (seeded random subset).
        seed: seed of the carved splits and subsets, and of the training order (epoch e: seed + e).
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        predict_data: what ``predict`` runs on: a csv/tsv/json/jsonl/parquet/arrow file or folder, or a hub name,
            with the text column(s) and optionally labels; default: the test split. The label names come from the
            checkpoint, so the training data need not be here.
    """

    def __init__(
        self,
        dataset: str = "",
        config_name: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        val_fraction: float = 0.1,
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | list[str] | None = None,
        label_names: list[str] | None = None,
        multi_label: bool = False,
        label_separator: str = ",",
        tokenizer: str | None = None,
        max_length: int = 128,
        group_by_length: bool = False,
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
        # max_length >= 4: room for the special tokens of a pair and some text.
        check_options(
            val_fraction=(val_fraction, within(0, 0.5)),
            max_length=(max_length, at_least(4)),
            batch_size=(batch_size, POSITIVE),
            eval_batch_size=(eval_batch_size, POSITIVE),
            num_workers=(num_workers, NON_NEGATIVE),
            max_train_samples=(max_train_samples, POSITIVE),
            max_val_samples=(max_val_samples, POSITIVE),
            max_test_samples=(max_test_samples, POSITIVE),
            seed=(seed, NON_NEGATIVE),
        )
        if isinstance(label_column, list) and not multi_label:
            raise UsageError("several label columns make a multi-label task: pass --data.multi_label true")
        self.save_hyperparameters()
        self.multi_label = multi_label
        self.splits: dict[str, datasets.Dataset] = {}
        self.lengths: dict[str, list[int]] = {}
        self.label_names: list[str] = []
        self.tokenizer: Any = None
        self.predict_set: Any = None
        self._predict_source: tuple[Any, str, str | None, Any] | None = None  # the test split as read, its columns

    @property
    def deterministic_train(self) -> bool:
        """A training example always encodes to the same tokens (nothing random): the prefix cache may keep it."""
        return True

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) or None

    def spec(self) -> DataSpec:
        """The label count and names once set up, single- or multi-label, and the token cap: what
        ``TextClassifier`` checks itself against and pads cached rows to."""
        return DataSpec(
            {"num_labels": len(self.label_names)} if self.label_names else {},
            list(self.label_names),
            multi_label=self.multi_label,
            max_length=self.hparams.max_length,
        )

    # --- loading ---
    def load_splits(self) -> datasets.DatasetDict:
        """Return the raw splits. Subclasses override this for sources ``datasets`` cannot read."""
        return load_source(
            self.hparams.dataset,
            self.hparams.config_name,
            self.hparams.cache_dir,
            "csv/json/parquet files with a header, or a save_to_disk folder",
        )

    def resolve_tokenizer(self) -> Any:
        """``tokenizer`` if given, else the attached model's ``load_tokenizer()``."""
        from peft_lightning.tasks.text import TextClassifier, load_tokenizer

        if self.hparams.tokenizer:
            return load_tokenizer(self.hparams.tokenizer, flag="--data.tokenizer")
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(module, TextClassifier):
            return module.load_tokenizer()
        raise UsageError("no tokenizer: pass --data.tokenizer NAME_OR_DIR, or train with a TextClassifier")

    def prepare_data(self) -> None:
        # Loads, carves and tokenizes on one process per node; `setup` on the other ranks then reads the caches.
        if self.hparams.predict_data and self.trainer is not None and self.trainer.predicting:
            return  # predict on new data: the training data is not needed
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_data:  # new data: the training splits are not needed
            self.predict_set = self.predict_set or self._new_predict_set(self.hparams.predict_data)
        elif not self.splits:
            self._build()

    def _build(self) -> None:
        if self.splits:
            return
        hp = self.hparams
        ds = self.load_splits()
        if hp.train_split not in ds:
            raise UsageError(
                f"the dataset has no split {hp.train_split!r} (splits: {', '.join(ds)}): pass --data.train_split NAME"
            )
        text, pair = text_columns(ds[hp.train_split].features, hp.text_column, hp.text_pair_column)
        labels = label_columns(ds[hp.train_split].features, hp.label_column)
        if not hp.multi_label:
            ds, self.label_names = to_class_labels(ds, hp.train_split, labels[0], hp.label_names)
            # Before carving, which stratifies by these ids.
            check_label_range(ds[hp.train_split], hp.train_split, labels[0], len(self.label_names))
        for split in (hp.test_split, hp.val_split):  # test first, so val never overlaps it
            if split not in ds:
                carve(ds, hp.train_split, split, hp.val_fraction, hp.seed, None if hp.multi_label else labels[0])
        if hp.multi_label:
            label_fn, self.label_names = multi_hot_encoder(
                ds[hp.train_split], labels, hp.label_names, hp.label_separator
            )
        else:
            label_fn = class_ids(labels[0])
        tokenizer = self.resolve_tokenizer()
        spec = [
            ENCODING_VERSION,
            tokenizer_fingerprint(tokenizer),
            text,
            pair,
            hp.max_length,
            labels,
            hp.multi_label,
            self.label_names,
            hp.label_separator,
        ]
        caps = {
            hp.train_split: hp.max_train_samples,
            hp.val_split: hp.max_val_samples,
            hp.test_split: hp.max_test_samples,
        }
        splits, lengths = {}, {}
        if hp.multi_label:  # a prediction row's true labels, by name
            names = self.label_names
            predict_target: Any = lambda b: [[names[i] for i, on in enumerate(r) if on] for r in label_fn(b)]  # noqa: E731
        else:
            predict_target = class_ids(labels[0])
        for split, cap in caps.items():
            d = ds[split]
            if len(d) == 0:
                raise UsageError(f"split {split!r} is empty: check --data.dataset and the split names")
            if not hp.multi_label:
                check_label_range(d, split, labels[0], len(self.label_names))
            if cap is not None and cap < len(d):
                d = d.shuffle(seed=hp.seed).select(range(cap))
            if split == hp.test_split:  # what predict runs on by default, with its texts and label names
                self._predict_source = (d, text, pair, predict_target)
            d = self._tokenize(d, tokenizer, text, pair, label_fn, spec)
            lengths[split] = list(d["length"])
            splits[split] = d.remove_columns("length")
        self.tokenizer, self.lengths, self.splits = tokenizer, lengths, splits

    def _new_predict_set(self, source: str) -> Any:
        """The texts ``predict_data`` names, with their rows and, for single-label data, their true labels."""
        import datasets

        from peft_lightning.data.source import load_predict_table

        hp = self.hparams
        what = "csv/json/parquet files with a header, or a save_to_disk folder"
        table = load_predict_table(source, hp.test_split, hp.cache_dir, what)
        text, pair = text_columns(table.features, hp.text_column, hp.text_pair_column)
        named = hp.label_column if isinstance(hp.label_column, str) and hp.label_column in table.features else None
        label = named or next((k for k, v in table.features.items() if isinstance(v, datasets.ClassLabel)), None)
        label = label or next((k for k in ("label", "labels") if k in table.features), None)
        target = None
        if label is not None and not hp.multi_label:  # names as written, class ids as ids (the task names them)
            feature = table.features[label]
            names = list(feature.names) if hasattr(feature, "names") else None
            target = lambda b: [names[v] if names is not None and v is not None else v for v in b[label]]  # noqa: E731
        self.tokenizer = self.tokenizer or self.resolve_tokenizer()
        return self._encode_predict(table, text, pair, target)

    def _encode_predict(self, table: Any, text: str, pair: str | None, target: Any) -> Any:
        return table.map(
            encode_for_predict,
            batched=True,
            with_indices=True,
            remove_columns=table.column_names,
            keep_in_memory=True,  # tokenized again at each predict: no cache file to go stale
            desc="Tokenizing",
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "text": text,
                "pair": pair,
                "max_length": self.hparams.max_length,
                "target": target,
            },
        )

    # --- tokenization ---
    def _tokenize(
        self, d: datasets.Dataset, tokenizer: Any, text: str, pair: str | None, labels: Any, spec: list
    ) -> datasets.Dataset:
        from datasets.fingerprint import Hasher

        # An explicit fingerprint: hashing the tokenizer object itself is unreliable (its state changes when
        # used), and the cache must hit across processes and runs. Datasets held only in memory have no cache
        # folder, so they are tokenized on every run.
        return d.map(
            encode,
            batched=True,
            remove_columns=d.column_names,
            desc="Tokenizing",
            fn_kwargs={
                "tokenizer": tokenizer,
                "text": text,
                "pair": pair,
                "max_length": self.hparams.max_length,
                "labels": labels,
            },
            new_fingerprint=Hasher.hash([dataset_fingerprint(d), *spec]),
        )

    # --- loaders ---
    def collate_fn(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def _loader(self, split: str, train: bool = False, ordered: bool = False) -> DataLoader:
        hp = self.hparams
        if not self.splits:
            self.setup()
        lengths = self.lengths[split] if hp.group_by_length else None
        kwargs = {
            "collate_fn": self.collate_fn(),
            "num_workers": hp.num_workers,
            "pin_memory": hp.pin_memory and torch.cuda.is_available(),
            "persistent_workers": hp.persistent_workers and hp.num_workers > 0,
        }
        if train:  # an epoch-seeded order grouped by length, resumed mid-epoch where it stopped (data/sampling.py)
            kwargs["collate_fn"] = cache_aware(kwargs["collate_fn"])
            return train_loader(self, RowNumbers(self.splits[split]), hp.batch_size, hp.seed, lengths=lengths, **kwargs)
        # Evaluation order does not change metrics; sorted by length, batches pad less.
        sampler = sorted(range(len(lengths)), key=lengths.__getitem__) if lengths is not None and ordered else None
        return DataLoader(
            self.splits[split], batch_size=hp.eval_batch_size or 2 * hp.batch_size, sampler=sampler, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split, ordered=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split, ordered=True)

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.predict_set is None:
            self.setup("predict")
        if self.predict_set is None:  # the test split, encoded with its texts and label names
            self.predict_set = self._encode_predict(*self._predict_source)
        return DataLoader(  # in input order: the writer's rows line up with the data's
            self.predict_set,
            batch_size=hp.eval_batch_size or 2 * hp.batch_size,
            collate_fn=with_strings(self.collate_fn()),
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
        )
