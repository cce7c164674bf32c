"""Token classification data: sentences as words with one tag each, tokenized into sub-words for the model.

The rows come from ``datasets`` (a hub name, parquet/json files, a ``save_to_disk`` folder) with a column of word
lists (``tokens``) and one of tag lists (``tags``: strings, or ``ClassLabel`` ids as the hub's CoNLL-2003 has them),
or from CoNLL / CoNLL-U files (``data/conll.py``). Words are tokenized with ``is_split_into_words`` and their tags
aligned to the sub-words (``align_labels``): the first piece of a word carries its tag, the others -100 (the loss
and the metrics skip them), as in transformers' ``run_ner`` example; ``label_all_subwords`` tags every piece in
training. Validation and test always score one tag per word (its first piece), so the metrics count words, and a
word cut off by ``max_length`` is not scored. Tokenized splits are cached like ``TextDataModule``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peft_lightning.data.base import Collate, FineTuneDataModule
from peft_lightning.data.checks import DataSpec, at_least, check_options
from peft_lightning.data.conll import CONLL_SUFFIXES, conll_files, load_conll
from peft_lightning.data.source import find_column, load_predict_table, load_source, local_path
from peft_lightning.data.text import tokenizer_fingerprint, tokenizer_for
from peft_lightning.errors import UsageError
from peft_lightning.internals import dataset_fingerprint

if TYPE_CHECKING:
    import datasets

ENCODING_VERSION = 1  # part of the cache fingerprint: bump when the encoding below changes
IGNORE = -100  # the label of a piece no loss or metric reads (torch's cross_entropy ignore_index)
TOKENS_COLUMNS = ("tokens", "words")
TAGS_COLUMNS = ("tags", "ner_tags", "labels", "label")


def _inner(feature: Any) -> Any:
    return getattr(feature, "feature", None)  # List / Sequence / LargeList: what each row's list holds


def holds_words(feature: Any) -> bool:
    """Whether a column holds lists of strings."""
    return getattr(_inner(feature), "dtype", None) in ("string", "large_string")


def holds_ids(feature: Any) -> bool:
    """Whether a column holds lists of integers (tag ids without names: ``label_names`` names them)."""
    return "int" in str(getattr(_inner(feature), "dtype", ""))


def holds_tags(feature: Any) -> bool:
    """Whether a column holds lists of tag names, of ``ClassLabel`` ids or of plain ids."""
    import datasets

    return holds_words(feature) or isinstance(_inner(feature), datasets.ClassLabel) or holds_ids(feature)


def continuation_tags(names: Sequence[str]) -> list[int]:
    """For each tag, the tag of a word's later pieces when every piece is labelled: ``I-X`` for ``B-X`` where the set
    has it (transformers' ``b_to_i_label``), else the tag itself.

    Example:
        >>> continuation_tags(["O", "B-PER", "I-PER", "B-LOC"])
        [0, 2, 2, 3]
    """
    index = {n: i for i, n in enumerate(names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]


def align_labels(word_ids: list[int | None], tags: list[int], later: list[int] | None = None) -> list[int]:
    """One label per sub-word: the word's tag on its first piece; on its other pieces -100, or with ``later``
    (``continuation_tags``) ``later[tag]``; -100 on special tokens.

    Example:
        >>> align_labels([None, 0, 1, 1, None], [3, 1])
        [-100, 3, 1, -100, -100]
        >>> align_labels([None, 0, 1, 1, None], [3, 1], later=[0, 2, 2, 3])
        [-100, 3, 1, 2, -100]
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE)
        elif word != previous:
            labels.append(tags[word])
        else:
            labels.append(later[tags[word]] if later is not None else IGNORE)
        previous = word
    return labels


def encode(
    batch: dict[str, list],
    tokenizer: Any,
    tokens: str,
    tags: str | None,
    max_length: int,
    lookup: Any,
    later: list[int] | None = None,
) -> dict[str, list]:
    """The batched ``datasets.map`` function: sub-word ids (truncated, unpadded), aligned labels and lengths.
    ``lookup[tag]`` is a tag's id (a dict of names, or a list indexed by the data's ``ClassLabel`` ids); without
    ``tags`` every first piece is labelled 0 (words to predict)."""
    out = tokenizer(batch[tokens], is_split_into_words=True, truncation=True, max_length=max_length)
    rows = batch[tags] if tags else ([0] * len(words) for words in batch[tokens])
    ids = [[lookup[t] for t in row] if tags else row for row in rows]
    out["labels"] = [align_labels(out.word_ids(i), row, later) for i, row in enumerate(ids)]
    out["length"] = [len(row) for row in out["input_ids"]]
    return dict(out)


def encode_for_predict(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: Any,
    tokens: str,
    tags: str | None,
    names: list[str] | None,
    max_length: int,
) -> dict[str, list]:
    """Rows for ``predict``: the pieces, ``labels`` marking each word's first piece (where a prediction row reads
    the word's tag), the row number (``id``), the words (``text``) and, with ``tags``, the true tag names
    (``target``; ``ClassLabel`` ids named by ``names``)."""
    out = encode(batch, tokenizer, tokens, None, max_length, None)
    del out["length"]
    out["id"] = [str(i) for i in indices]
    out["text"] = batch[tokens]
    if tags is not None:
        out["target"] = [[names[t] if names is not None else t for t in row] for row in batch[tags]]
    return out


class TokenDataModule(FineTuneDataModule):
    """Train/val/test sentences of tagged words, tokenized for the model being tuned (``TokenClassifier``).

    Args:
        dataset: a hub name (``eriktks/conll2003``), a CoNLL / CoNLL-U file or a folder of them named by split
            (``train.conll``, ``dev.conll``, ``test.conll``: see ``data/conll.py``), a parquet/json/jsonl/arrow file
            or folder with a column of word lists and one of tag lists, or a ``save_to_disk`` folder.
        tokens_column: column of word lists (default: ``tokens``, ``words``, else the first column of string lists).
        tags_column: column of tag lists, as strings or ``ClassLabel`` ids (default: ``tags``, ``ner_tags``,
            ``labels``, ``label``, else the first column of tag lists after the words).
        label_names: the tag set, in id order. Given, a tag outside it stops the run; default: the ``ClassLabel``'s
            names, else every tag found, ``O`` first and the others sorted.
        label_all_subwords: in training, label every piece of a word (the later pieces of a ``B-X`` word ``I-X``),
            not only the first. Validation and test score one tag per word either way.
        conll_tag_column: the column of a CoNLL file holding the tag (0-based, negative from the end); default: the
            last (CoNLL), UPOS (CoNLL-U).
        tokenizer: hub name or local directory of a (fast) tokenizer; default: the connected model's.
        max_length: sub-words kept per sentence (the rest is cut off, and its words are not scored).
        group_by_length: batch sentences of similar length together (less padding; see ``TextDataModule``).
        predict_data: what ``predict`` runs on: files or a hub name with the words column (and optionally tags);
            default: the test split. The tag names come from the checkpoint.
        **kwargs: the options every data module has (``FineTuneDataModule``).

    Example:
        >>> dm = TokenDataModule("conll2003/", max_length=128)  # doctest: +SKIP
        >>> dm.connect(tokenizer=model.load_tokenizer())  # doctest: +SKIP
    """

    source_kinds = "CoNLL/CoNLL-U files, parquet/json files with word and tag lists, or a save_to_disk folder"

    def __init__(
        self,
        dataset: str = "",
        tokens_column: str | None = None,
        tags_column: str | None = None,
        label_names: list[str] | None = None,
        label_all_subwords: bool = False,
        conll_tag_column: int | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        group_by_length: bool = False,
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_options(max_length=(max_length, at_least(4)))
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise UsageError(f"label_names repeats a tag ({label_names}): list each tag once")
        super().__init__(dataset, predict_data=predict_data, **kwargs)
        self.label_names: list[str] = []
        self.lengths: dict[str, list[int]] = {}
        self.tokenizer: Any = None
        self.model_tokenizer: Any = None
        self._predict_source: Any = None

    def connect(self, tokenizer: Any = None) -> None:
        """Take the tokenizer of the model this data feeds; the ``tokenizer`` option, when given, wins."""
        self.model_tokenizer = tokenizer

    @property
    def deterministic_train(self) -> bool:
        """A training sentence always encodes to the same pieces: the prefix cache may keep it."""
        return True

    def spec(self) -> DataSpec:
        """The tag count and names once set up, and the sub-word cap: what ``TokenClassifier`` checks and names."""
        names = self.label_names
        return DataSpec({"num_labels": len(names)} if names else {}, list(names), False, self.hparams.max_length)

    def resolve_tokenizer(self) -> Any:
        """``tokenizer`` if given, else the connected model's; it must map pieces back to words (a fast one)."""
        tokenizer = tokenizer_for(self.hparams.tokenizer, self.model_tokenizer)
        if not tokenizer.is_fast:
            raise UsageError(
                f"{type(tokenizer).__name__} cannot map sub-words back to words (word_ids): token classification "
                "needs a fast tokenizer; pass one with --data.tokenizer"
            )
        try:
            tokenizer([["a", "word"]], is_split_into_words=True)
        except ValueError as err:  # RoBERTa / GPT-2 style: pre-split words need add_prefix_space=True
            raise UsageError(f"the tokenizer cannot take words: {str(err).splitlines()[0][:200]}") from None
        return tokenizer

    def prepare_data(self) -> None:
        if not self._predicting_new_data():  # loads and tokenizes once per node; other ranks read the caches
            self.setup()

    # --- the splits (FineTuneDataModule.build) ---
    def read_source(self, source: str) -> datasets.DatasetDict:
        """CoNLL files (by extension) through ``data/conll.py``, anything else through ``load_source``."""
        hp = self.hparams
        path = local_path(source) if source else None
        if path is not None and conll_files(path):
            return load_conll(path, hp.conll_tag_column)
        if path is not None and path.is_file() and path.suffix.lower() in CONLL_SUFFIXES:
            raise UsageError(f"{source!r} holds no sentence: a CoNLL file has one word and its tag per line")
        return load_source(source, hp.config_name, hp.cache_dir, self.source_kinds)

    def load_splits(self) -> datasets.DatasetDict:
        return self.read_source(self.hparams.dataset)

    def find_columns(self, ds: datasets.DatasetDict) -> tuple[datasets.DatasetDict, str | None]:
        """The words and tags columns, the tag set, and every sentence checked (one tag per word, each in the set),
        in the splits as given: a message's sentence number is the row of the file or split."""
        hp = self.hparams
        features = ds[hp.train_split].features
        named = hp.tokens_column or next((c for c in TOKENS_COLUMNS if c in features), None)
        if named is None:  # the first list of strings that is not named as tags
            tags = (hp.tags_column, *TAGS_COLUMNS)
            named = next((c for c, f in features.items() if holds_words(f) and c not in tags), None)
        self._tokens = find_column(features, named, "tokens", holds_words if named else None, "lists of words")
        named = hp.tags_column or next((c for c in TAGS_COLUMNS if c in features and c != self._tokens), None)
        if named is None:  # the first list of tags after the words
            named = next((c for c in features if c != self._tokens and holds_tags(features[c])), None)
        self._tags = find_column(features, named, "tags", holds_tags if named else None, "lists of tag names or ids")
        self._classes = classes = getattr(_inner(features[self._tags]), "names", None)  # ClassLabel ids: their names
        if classes is None and holds_ids(features[self._tags]):
            if not hp.label_names:
                raise UsageError(
                    f"column {self._tags!r} holds tag ids: name them, in id order, with --data.label_names"
                )
            self._classes = classes = list(hp.label_names)
        self.label_names = list(hp.label_names or classes or _found_tags(ds.values(), self._tags))
        index = {n: i for i, n in enumerate(self.label_names)}
        unknown = [n for n in classes or () if n not in index]
        if unknown:
            raise UsageError(f"tags {unknown} are not in label_names ({', '.join(self.label_names)}): list them")
        self._lookup: Any = [index[n] for n in classes] if classes is not None else index
        for split, rows in ds.items():
            _check_rows(rows, split, self._tokens, self._tags, classes or self.label_names)
        return ds, None  # sentences carry many tags: a plain seeded carve

    def read_labels(self, ds: datasets.DatasetDict) -> None:
        hp = self.hparams
        self.tokenizer = self.resolve_tokenizer()
        self._fingerprint = [
            ENCODING_VERSION,
            tokenizer_fingerprint(self.tokenizer),
            self._tokens,
            self._tags,
            hp.max_length,
            self.label_names,
            self._lookup,
        ]
        self.lengths = {}

    def encode(self, split: str, rows: datasets.Dataset) -> Any:
        from datasets.fingerprint import Hasher

        hp = self.hparams
        if split == hp.test_split:
            self._predict_source = (rows, self._tokens, self._tags, self._classes)
        later = continuation_tags(self.label_names) if hp.label_all_subwords and split == hp.train_split else None
        kwargs = {"tokens": self._tokens, "tags": self._tags, "lookup": self._lookup, "later": later}
        pieces = rows.map(
            encode,
            batched=True,
            remove_columns=rows.column_names,
            desc="Tokenizing",
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": hp.max_length, **kwargs},
            new_fingerprint=Hasher.hash([dataset_fingerprint(rows), *self._fingerprint, later]),
        )
        self.lengths[split] = list(pieces["length"])
        return pieces.remove_columns("length")

    # --- what predict runs on ---
    def test_predict_set(self) -> Any:
        """The test split with each sentence's row (``id``), words (``text``) and true tags (``target``)."""
        return self._encode_predict(*self._predict_source)

    def new_predict_set(self, source: str) -> Any:
        """The sentences ``predict_data`` names, with their true tags when it has a tags column."""
        hp = self.hparams
        path = local_path(source)
        if path is not None and conll_files(path):
            table = next(iter(load_conll(path, hp.conll_tag_column).values()))
        else:
            table = load_predict_table(source, hp.test_split, hp.cache_dir, self.source_kinds)
        tokens = find_column(table.features, hp.tokens_column or "tokens", "tokens", holds_words, "lists of words")
        named = hp.tags_column or next((c for c in TAGS_COLUMNS if c in table.features), None)
        tags = named if named in table.features and holds_tags(table.features[named]) else None
        classes = getattr(_inner(table.features[tags]), "names", None) if tags else None
        if tags and classes is None and holds_ids(table.features[tags]):
            classes = hp.label_names  # ids: named as in training, or written as they are
        self.tokenizer = self.tokenizer or self.resolve_tokenizer()
        return self._encode_predict(table, tokens, tags, classes)

    def _encode_predict(self, table: Any, tokens: str, tags: str | None, names: list[str] | None) -> Any:
        return table.map(
            encode_for_predict,
            batched=True,
            with_indices=True,
            remove_columns=table.column_names,
            keep_in_memory=True,  # tokenized again at each predict: no cache file to go stale
            desc="Tokenizing",
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "tokens": tokens,
                "tags": tags,
                "names": names,
                "max_length": self.hparams.max_length,
            },
        )

    # --- batches ---
    def collate_fn(self) -> Collate:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE)

    def row_lengths(self, split: str) -> list[int] | None:
        return self.lengths[split] if self.hparams.group_by_length else None


def _found_tags(splits: Any, column: str) -> list[str]:
    """Every tag of the splits, ``O`` first and the others sorted."""
    found = {t for rows in splits for row in rows[column] for t in row}
    return sorted(found, key=lambda t: (t != "O", t))


def _check_rows(rows: datasets.Dataset, split: str, tokens: str, tags: str, names: list[str]) -> None:
    """Stop at the first sentence whose words and tags differ in number, or whose tag (a name, or an id into
    ``names``) is not one of ``names``."""
    known: Any = set(names)
    for i, (words, row) in enumerate(zip(rows[tokens], rows[tags])):
        if len(words) != len(row):
            raise UsageError(
                f"split {split!r}, sentence {i}: {len(words)} words but {len(row)} tags "
                f"({' '.join(words[:6])}{' ...' if len(words) > 6 else ''}): give each word one tag"
            )
        bad = next((t for t in row if not (0 <= t < len(names) if isinstance(t, int) else t in known)), None)
        if bad is not None:
            raise UsageError(
                f"split {split!r}, sentence {i}: tag {bad!r} is not in the tag set ({', '.join(names)}): "
                "add it to --data.label_names or fix the data"
            )
