"""CoNLL-style files read as ``tokens`` and ``tags`` columns: what ``TokenDataModule`` takes besides ``datasets``.

Two layouts, told apart by the extension:

- **CoNLL** (``.conll``, ``.iob``, ``.bio``, ``.txt``): one word per line, its tag in the last column (CoNLL-2003's
  ``EU NNP B-NP B-ORG``; the plain two-column ``EU B-ORG``), columns split by whitespace, a blank line between
  sentences, ``-DOCSTART-`` lines skipped.
- **CoNLL-U** (``.conllu``, Universal Dependencies): ten tab-separated fields per word, ``#`` comment lines, the
  multi-word (``1-2``) and empty (``1.1``) token lines skipped; the tag is UPOS (the 4th field) unless another is
  asked for.

A file is the split its name says (``train.conll``; ``dev``/``valid``/``testa`` are ``validation``, ``testb`` is
``test``); a single file is the ``train`` split. Every problem stops with one line naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".bio", ".txt")
SPLIT_NAMES = {"dev": "validation", "valid": "validation", "testa": "validation", "testb": "test"}
UPOS = 3  # CoNLL-U's field of the universal part-of-speech tag


def conll_files(path: Path) -> dict[str, Path]:
    """The CoNLL files ``path`` names, by split: itself as ``train``, or a folder's files by their names (``train``,
    ``dev``, ``test`` ...); empty when ``path`` is neither."""
    if path.is_file():
        return {"train": path} if path.suffix.lower() in CONLL_SUFFIXES else {}
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in CONLL_SUFFIXES) if path.is_dir() else []
    return {SPLIT_NAMES.get(f.stem.lower(), f.stem.lower()): f for f in files}


def read_conll(path: Path, tag_column: int | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """The sentences of one file: their words and tags.

    Args:
        path: a CoNLL or CoNLL-U file (by extension, see the module docstring).
        tag_column: which column (0-based; negative counts from the end) holds the tag. Default: the last (CoNLL),
            UPOS (CoNLL-U).

    Raises:
        UsageError: the file holds no sentence, or a line has no tag column.
    """
    conllu = path.suffix.lower() == ".conllu"
    column = tag_column if tag_column is not None else (UPOS if conllu else -1)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sentence: tuple[list[str], list[str]] = ([], [])
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate([*file, ""], 1):  # a last blank line closes the last sentence
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if sentence[0]:
                    words.append(sentence[0])
                    tags.append(sentence[1])
                sentence = ([], [])
                continue
            if conllu and line.startswith("#"):
                continue
            fields = line.split("\t") if conllu else line.split()
            if conllu and not fields[0].isdigit():  # 1-2 (a multi-word token) or 1.1 (an empty node)
                continue
            if len(fields) < 2 or not -len(fields) <= column < len(fields):
                raise UsageError(
                    f"{path}:{number}: {line.strip()!r} has no tag column {column}: a CoNLL line is a word and its "
                    "tag (CoNLL-U: ten tab-separated fields); pass --data.conll_tag_column N"
                )
            sentence[0].append(fields[1] if conllu else fields[0])
            sentence[1].append(fields[column])
    if not words:
        raise UsageError(f"{path} holds no sentence: a CoNLL file has one word and its tag per line")
    return words, tags


def load_conll(path: Path, tag_column: int | None = None) -> datasets.DatasetDict:
    """The splits of a CoNLL file or folder (``conll_files``) as ``tokens`` and ``tags`` columns of strings."""
    import datasets

    splits = {}
    for split, file in conll_files(path).items():
        tokens, tags = read_conll(file, tag_column)
        splits[split] = datasets.Dataset.from_dict({"tokens": tokens, "tags": tags})
    return datasets.DatasetDict(splits)
