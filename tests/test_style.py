"""One formatting style, checked like any other behaviour: ``ruff format`` and ``ruff check`` (pyproject.toml's
``[tool.ruff]``: one line length, 120) over the package, recipes, tests, benchmarks and scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ["peft_lightning", "recipes", "tests", "benchmarks", "scripts"]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", *command, *CODE], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"`ruff {' '.join(command)}` found code out of style; run `.venv/bin/ruff format {' '.join(CODE)}` "
        f"(and `ruff check --fix`):\n{done.stdout[-3000:]}{done.stderr[-1000:]}"
    )
