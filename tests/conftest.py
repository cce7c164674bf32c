from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never reach a hub: real loading code runs on local copies.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 12, size: int = 40, splits: bool = False, grey_every: int = 4
) -> Path:
    """Class subfolders of PNGs whose class is visible (a bright square in a class-specific corner); every
    ``grey_every``-th image is greyscale, to exercise mode conversion."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test") if splits else ("",):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                q = size // 2
                y0, x0 = (c // 2) * q, (c % 2) * q
                img[y0 : y0 + q, x0 : x0 + q] = 230
                im = Image.fromarray(img)
                if i % grey_every == 0:
                    im = im.convert("L")
                im.save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny matrices (faster), the process's setting restored afterwards: later
    tests in the same process compare runs with subprocesses that use every core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """Run `python -m peft_lightning ARGS` in this process (fast: no interpreter start, imports done once);
    returns (exit code, stdout, stderr)."""
    from peft_lightning.cli import main

    def run(*args: str):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m peft_lightning ARGS` as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peft_lightning", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs (``slow``) first, the rest in file order: pytest-xdist hands tests out in this order, so
    the longest ones start while every worker is free instead of forming a tail one worker runs alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
