"""What a ``--data.dataset`` argument names, read with ``datasets``: the one rule every data module follows.

- an existing local file (parquet, csv/tsv, json/jsonl, arrow) is the ``train`` split;
- an existing local folder is a ``save_to_disk`` folder, or files ``datasets`` infers a builder for (split by file
  name: ``train.csv``, ``test.parquet`` ...; for images, class subfolders);
- anything written as a path (``/``, ``./``, ``~``, a data file's extension, or more than one ``/``) that does not
  exist stops with one line;
- anything else is a Hugging Face hub name (``owner/name``).

Relative paths are local: ``./m.parquet``, and ``m.parquet`` when it exists. The column helpers give the same
one-line error in every module when the column a task needs is not there or holds something else, and
``hub_error`` the one line for a model or tokenizer that a local directory or the hub could not give.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

# Extension -> (``datasets`` packaged builder, its options) for a file read as one split. Written out rather than
# taken from ``datasets.packaged_modules._EXTENSION_TO_MODULE``: that map is private and also maps audio, video,
# meshes ... that are not tables.
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".arrow": ("arrow", {}),
}


def local_path(dataset: str) -> Path | None:
    """The existing local file or folder ``dataset`` names (absolute), or None when it is a name (a hub dataset).

    Raises:
        UsageError: ``dataset`` is written as a path but nothing is there.
    """
    path = Path(dataset).expanduser()
    if path.exists():
        return path.resolve()
    # Hub names are `owner/name`: more slashes, a leading `.`, `/` or `~`, or a data file's extension mean a path.
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1 or path.suffix.lower() in FILE_BUILDERS:
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise UsageError(f"--data.dataset {dataset!r} does not exist{where}: pass an existing file or folder")
    return None


def hub_error(what: str, name: str, err: Exception, flag: str) -> UsageError:
    """One line for a model or tokenizer (``what``) that could not be had from ``name``, a local directory or a hub
    name: what was tried, why, and which flag fixes it."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    path = Path(name).expanduser()
    if path.is_dir():
        return UsageError(
            f"cannot load the {what} from local directory {name!r} ({type(err).__name__}: {reason}): "
            f"it needs the files `save_pretrained` writes; pass another directory with {flag}"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return UsageError(f"{what} directory {name!r} does not exist: pass an existing directory with {flag}")
    from huggingface_hub import constants

    return UsageError(
        f"could not load the {what} {name!r} from the Hugging Face hub ({type(err).__name__}; offline "
        f"and not in the cache {constants.HF_HUB_CACHE}?): download it once with network, or point "
        f"{flag} at a local copy (a directory written by `save_pretrained`)"
    )


def load_source(
    dataset: str,
    config_name: str | None = None,
    cache_dir: str | None = None,
    what: str = "parquet/csv/json files or a save_to_disk folder",
) -> datasets.DatasetDict:
    """Load what ``dataset`` names (see the module docstring) as a ``DatasetDict``.

    Args:
        dataset: a local file or folder, or a hub name.
        config_name: the hub dataset's configuration. A local folder of files has only the default one, so a
            recipe's hub configuration (GLUE's ``sst2``) does not stop a local copy of it from loading.
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        what: what a local copy should hold, for the error messages.

    Returns:
        The splits; a single table is the ``train`` split.

    Raises:
        UsageError: one line when the dataset cannot be had: a missing path, an unreadable file, a hub dataset
            offline and not cached.
    """
    import datasets

    if not dataset:
        raise UsageError("no dataset given: pass --data.dataset NAME_OR_PATH")
    path = local_path(dataset)
    if path is None:
        try:
            ds = datasets.load_dataset(dataset, config_name, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - hub and offline failures come as many types; all end here
            raise UsageError(
                f"could not load dataset {dataset!r}{f' ({config_name})' if config_name else ''} from the Hugging "
                f"Face hub ({type(err).__name__}; offline and not cached in "
                f"{cache_dir or datasets.config.HF_DATASETS_CACHE}?): download it once with network, or point "
                f"--data.dataset at a local copy ({what})"
            ) from None
    else:
        try:
            ds = _load_local(path, config_name, cache_dir)
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 - malformed files fail in each reader's own way
            _check_empty_splits(path)
            raise UsageError(
                f"cannot read a dataset from {str(path)!r} ({type(err).__name__}: "
                f"{(str(err).splitlines() or [''])[0][:160]}): expected {what}"
            ) from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def load_predict_table(dataset: str, split: str, cache_dir: str | None, what: str) -> datasets.Dataset:
    """The one table ``--data.predict_data`` names, read by the rule above: a file, a folder, a hub name. Several
    splits: ``split`` (the test split's name), else a one-line error naming them."""
    ds = load_source(dataset, None, cache_dir, what)
    if len(ds) == 1:
        return next(iter(ds.values()))
    if split in ds:
        return ds[split]
    raise UsageError(
        f"--data.predict_data {dataset!r} has several splits ({', '.join(ds)}) and none is {split!r}: "
        "point it at one file or folder"
    )


def _load_local(path: Path, config_name: str | None, cache_dir: str | None) -> Any:
    import datasets

    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise UsageError(f"cannot read {str(path)!r}: expected a {'/'.join(FILE_BUILDERS)} file, or a folder")
        builder, options = FILE_BUILDERS[path.suffix.lower()]
        return datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir, **options)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    try:  # `load_dataset` infers the builder of a folder: parquet, csv, arrow, imagefolder ...
        return datasets.load_dataset(str(path), config_name, cache_dir=cache_dir)
    except ValueError as err:
        if not config_name or "Available: ['default']" not in str(err):
            raise
        return datasets.load_dataset(str(path), cache_dir=cache_dir)


def _check_empty_splits(path: Path) -> None:
    """``save_to_disk`` of a 0-row split writes a folder ``load_from_disk`` cannot read: say which split."""
    for state in sorted(path.glob("*/state.json")) if path.is_dir() else ():
        if not json.loads(state.read_text()).get("_data_files", [None]):
            raise UsageError(
                f"split {state.parent.name!r} is empty in {str(path)!r}: drop it or give it data (a "
                "missing val/test split is carved from train)"
            )


def label_column_if_any(features: Any, named: Any) -> tuple[str | None, list[str] | None]:
    """The label column of data to predict on, which may have none: ``named`` when the table has it, else the first
    ``ClassLabel``, else ``label``/``labels``; and its class names when it holds class ids (None: it holds the
    names themselves, or there is no column)."""
    import datasets

    column = named if isinstance(named, str) and named in features else None
    column = column or next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    column = column or next((k for k in ("label", "labels") if k in features), None)
    names = getattr(features[column], "names", None) if column is not None else None
    return column, list(names) if names is not None else None


def describe(feature: Any) -> str:
    """A short name of a ``datasets`` feature for messages: ``image``, ``int64``, ``list of int64`` ..."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.ClassLabel):
        return "class label"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, dict):
        return "{" + ", ".join(feature) + "}"
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return f"list of {describe(inner)}" if inner is not None else type(feature).__name__


def find_column(
    features: Any, column: str | None, kind: str, holds: Callable[[Any], bool] | None = None, what: str = ""
) -> str:
    """The column of ``kind`` (``image``, ``text``, ``label`` ...): ``column`` if given, else the first that
    ``holds`` accepts.

    Args:
        features: the split's ``datasets.Features``.
        column: the column the user named (``--data.<kind>_column``), or None to detect it.
        kind: what the column is for; names the flag in the message.
        holds: whether a feature can serve as this kind (None: any).
        what: what such a column holds, for the message (``images``, ``strings``).

    Raises:
        UsageError: one line naming the columns found, when there is no such column or it holds something else.
    """
    if column is None and holds is not None:
        column = next((k for k, v in features.items() if holds(v)), None)
    found = ", ".join(f"{k} ({describe(v)})" for k, v in features.items())
    need = f"; {'an' if kind[0] in 'aeiou' else 'a'} {kind} column holds {what}" if what else ""
    if column is None or column not in features:
        problem = f"the dataset has no {kind} column{f' {column}' if column else ''}"
    elif holds is not None and not holds(features[column]):
        problem = f"column {column!r} holds {describe(features[column])}"
    else:
        return column
    raise UsageError(f"{problem} (columns: {found}{need}): pass --data.{kind}_column NAME")
