"""Text classification data on Hugging Face ``datasets``: a hub name or local csv/json/parquet files, tokenized once.

The tokenized splits are ``datasets.map`` outputs with a fingerprint derived from the source split, the tokenizer's
vocabulary and settings, ``max_length`` and the label spec, so a second run (or every other rank of a DDP job)
loads the Arrow cache files instead of tokenizing again. Padding happens per batch (``DataCollatorWithPadding``).
Which columns hold the text and the labels, and how the labels are encoded, is ``data/text_columns.py``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from peft_lightning.data.base import Collate, FineTuneDataModule
from peft_lightning.data.checks import DataSpec, at_least, check_options
from peft_lightning.data.source import hub_error, label_column_if_any, load_predict_table
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


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, flag: str = "--data.tokenizer"
) -> Any:
    """``AutoTokenizer.from_pretrained`` that stops with one line naming ``flag`` when the tokenizer cannot be had."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error("tokenizer", name, err, flag) from None


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


def tokenizer_for(option: str | None, connected: Any) -> Any:
    """The tokenizer a text data module uses: ``--data.tokenizer`` (``option``) if given, else the one the model's
    ``connect`` handed over; one line when there is neither."""
    if option:
        return load_tokenizer(option, flag="--data.tokenizer")
    if connected is not None:
        return connected
    raise UsageError(
        "no tokenizer: pass --data.tokenizer NAME_OR_DIR, or connect the model's: data.connect(**model.data_needs())"
    )


class TextDataModule(FineTuneDataModule):
    """Train/val/test text-classification data, tokenized for the model being tuned.

    The tokenizer is the model's (``TextClassifier.load_tokenizer()``, the same checkpoint as the weights), handed
    over by ``connect(tokenizer=...)`` (the CLI does), the way ``ImageDataModule`` takes its preprocessing from the
    model; pass ``tokenizer`` to use another, or to use this module without a model.

    Args:
        dataset: a hub name (``nyu-mll/glue``), a csv/tsv/json/jsonl/parquet/arrow file (read as the train
            split), a folder of such files named by split (``train.csv``, ``validation.csv``, ``test.csv``), or a
            ``save_to_disk`` folder; relative paths are local (``data/source.py``).
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
        tokenizer: hub name or local directory of the tokenizer; default: the connected model's.
        max_length: tokens kept per example (longer ones are truncated).
        group_by_length: batch examples of similar length together (fewer pad tokens, faster on CPUs): training
            batches come from length-sorted chunks of 50 batches, shuffled; val/test run in length order.
        predict_data: what ``predict`` runs on: a csv/tsv/json/jsonl/parquet/arrow file or folder, or a hub name,
            with the text column(s) and optionally labels; default: the test split. The label names come from the
            checkpoint, so the training data need not be here.
        **kwargs: the options every data module has (splits, caps, batch sizes, workers, seed ...:
            ``FineTuneDataModule``); padding is cheap, so ``num_workers`` 0 is fine on small machines.

    Example:
        >>> dm = TextDataModule("reviews.csv", max_length=64)  # doctest: +SKIP
        >>> dm.connect(tokenizer=model.load_tokenizer())  # doctest: +SKIP
    """

    source_kinds = "csv/json/parquet files with a header, or a save_to_disk folder"

    def __init__(
        self,
        dataset: str = "",
        text_column: str | None = None,
        text_pair_column: str | None = None,
        label_column: str | list[str] | None = None,
        label_names: list[str] | None = None,
        multi_label: bool = False,
        label_separator: str = ",",
        tokenizer: str | None = None,
        max_length: int = 128,
        group_by_length: bool = False,
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        # max_length >= 4: room for the special tokens of a pair and some text.
        check_options(max_length=(max_length, at_least(4)))
        if isinstance(label_column, list) and not multi_label:
            raise UsageError("several label columns make a multi-label task: pass --data.multi_label true")
        super().__init__(dataset, predict_data=predict_data, **kwargs)
        self.multi_label = multi_label
        self.lengths: dict[str, list[int]] = {}
        self.label_names: list[str] = []
        self.tokenizer: Any = None  # the one in use, once the data is set up
        self.model_tokenizer: Any = None  # what `connect` was given
        self._predict_source: tuple[Any, str, str | None, Any] | None = None  # the test split as read, its columns

    def connect(self, tokenizer: Any = None) -> None:
        """Take the tokenizer of the model this data feeds (``TextClassifier.load_tokenizer()``); the ``tokenizer``
        option, when given, is used instead. Call it before the data is set up; the CLI does."""
        self.model_tokenizer = tokenizer

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

    def resolve_tokenizer(self) -> Any:
        """``tokenizer`` if given, else the connected model's."""
        return tokenizer_for(self.hparams.tokenizer, self.model_tokenizer)

    def prepare_data(self) -> None:
        # Loads, carves and tokenizes on one process per node; `setup` on the other ranks then reads the caches.
        if not self._predicting_new_data():
            self.setup()

    # --- the splits (FineTuneDataModule.build) ---
    def find_columns(self, ds: datasets.DatasetDict) -> tuple[datasets.DatasetDict, str | None]:
        hp = self.hparams
        features = ds[hp.train_split].features
        self._text, self._pair = text_columns(features, hp.text_column, hp.text_pair_column)
        self._labels = labels = label_columns(features, hp.label_column)
        if hp.multi_label:
            return ds, None  # multi-hot labels: a plain seeded carve
        ds, self.label_names = to_class_labels(ds, hp.train_split, labels[0], hp.label_names)
        # Before carving, which stratifies by these ids.
        check_label_range(ds[hp.train_split], hp.train_split, labels[0], len(self.label_names))
        return ds, labels[0]

    def read_labels(self, ds: datasets.DatasetDict) -> None:
        hp, labels = self.hparams, self._labels
        if hp.multi_label:
            self._label_fn, self.label_names = multi_hot_encoder(
                ds[hp.train_split], labels, hp.label_names, hp.label_separator
            )
            names = self.label_names  # a prediction row's true labels, by name
            self._target: Any = lambda b: [[names[i] for i, on in enumerate(r) if on] for r in self._label_fn(b)]
        else:
            for split in (hp.train_split, hp.val_split, hp.test_split):
                check_label_range(ds[split], split, labels[0], len(self.label_names))
            self._label_fn = self._target = class_ids(labels[0])
        # Looked for once the splits are carved: a missing tokenizer is reported after what the carve warns of.
        self.tokenizer = self.resolve_tokenizer()
        self._fingerprint = [
            ENCODING_VERSION,
            tokenizer_fingerprint(self.tokenizer),
            self._text,
            self._pair,
            hp.max_length,
            labels,
            hp.multi_label,
            self.label_names,
            hp.label_separator,
        ]
        self.lengths = {}

    def encode(self, split: str, rows: datasets.Dataset) -> Any:
        from datasets.fingerprint import Hasher

        if split == self.hparams.test_split:  # what predict runs on by default, with its texts and label names
            self._predict_source = (rows, self._text, self._pair, self._target)
        # An explicit fingerprint: hashing the tokenizer object itself is unreliable (its state changes when
        # used), and the cache must hit across processes and runs. Datasets held only in memory have no cache
        # folder, so they are tokenized on every run.
        tokens = rows.map(
            encode,
            batched=True,
            remove_columns=rows.column_names,
            desc="Tokenizing",
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "text": self._text,
                "pair": self._pair,
                "max_length": self.hparams.max_length,
                "labels": self._label_fn,
            },
            new_fingerprint=Hasher.hash([dataset_fingerprint(rows), *self._fingerprint]),
        )
        self.lengths[split] = list(tokens["length"])
        return tokens.remove_columns("length")

    # --- what predict runs on ---
    def test_predict_set(self) -> Any:
        """The test split, encoded with its rows, texts and label names."""
        return self._encode_predict(*self._predict_source)

    def new_predict_set(self, source: str) -> Any:
        """The texts ``predict_data`` names, with their rows and, for single-label data, their true labels."""
        hp = self.hparams
        table = load_predict_table(source, hp.test_split, hp.cache_dir, self.source_kinds)
        text, pair = text_columns(table.features, hp.text_column, hp.text_pair_column)
        label, names = label_column_if_any(table.features, hp.label_column)
        target = None
        if label is not None and not hp.multi_label:  # names as written, class ids as ids (the task names them)
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

    # --- batches ---
    def collate_fn(self) -> Collate:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def row_lengths(self, split: str) -> list[int] | None:
        return self.lengths[split] if self.hparams.group_by_length else None
