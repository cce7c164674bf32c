"""Reading MovieLens: the GroupLens and RecBole file formats, the GroupLens download, and the ``Interactions`` table
they all become.

Sources: ``ml-100k`` offline from the files the ``recbole`` wheel ships (GroupLens terms forbid redistribution, so
they are read where pip put them and never copied into this repository), ``ml-100k``/``ml-1m`` downloaded from
GroupLens when online, or a local folder in either format. Interactions are small integer tables consumed as
tensors, so they are read with numpy and kept in memory: ``datasets``/Arrow would add a copy and nothing else.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peft_lightning.assets import recbole_ml100k_dir
from peft_lightning.data.source import local_path
from peft_lightning.errors import UsageError

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
    item_titles: list[str] = field(default_factory=list)
    """One title per item id, ``"Title (year)"``: what a prediction row names."""

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
        known = [titles.get(int(r), (f"Movie {r}", "", [])) for r in raw_items]
        texts = [item_text(*t) for t in known]
        return cls(
            u.astype(np.int64),
            i.astype(np.int64),
            timestamp.astype(np.int64),
            rating.astype(np.float32),
            texts,
            raw_users,
            raw_items,
            source,
            [f"{title} ({year})" if year else title for title, year, _ in known],
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
