"""The notebooks run top to bottom, offline, on a small budget (PEFT_LIGHTNING_NOTEBOOK_SMOKE=1), in a real kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recipes.effnet_fashion import EffnetFashion
from recipes.minilm_austen import MinilmAusten

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow


def execute(name: str, cwd: Path) -> list[dict]:
    """Run notebooks/NAME.ipynb with cwd as its working folder; returns every output of every code cell."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    env = {
        "PEFT_LIGHTNING_NOTEBOOK_SMOKE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            nb,
            timeout=600,
            startup_timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def text_of(outputs: list[dict]) -> str:
    parts = []
    for out in outputs:
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def images_in(outputs: list[dict]) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs)


@pytest.mark.skipif(not EffnetFashion.availability()[0], reason="offline assets missing: run scripts/setup.sh")
def test_quickstart_notebook_trains_compares_and_shows_curves(tmp_path):
    outputs = execute("quickstart", tmp_path)
    text = text_of(outputs)
    assert "effnet_fashion: test/acc" in text and "run summary" in text
    assert images_in(outputs) == 2  # the run's curves and the comparison
    runs = sorted((tmp_path / "runs" / "effnet_fashion").iterdir())
    assert len(runs) == 2 and all((r / "curves.png").is_file() and (r / "config.yaml").is_file() for r in runs)
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@pytest.mark.skipif(
    not (EffnetFashion.availability()[0] and MinilmAusten.availability()[0]),
    reason="offline assets missing: run scripts/setup.sh",
)
def test_new_task_notebook_fine_tunes_an_image_folder_and_a_csv(tmp_path):
    outputs = execute("new_task", tmp_path)
    text = text_of(outputs)
    assert "sandal" in text and "Emma" in text
    assert text.count("run summary") == 2 and images_in(outputs) == 2
    for name in ("my_shoes", "my_books"):
        (run,) = (tmp_path / "runs" / name).iterdir()
        assert (run / "metrics.csv").is_file() and (run / "curves.png").is_file()
