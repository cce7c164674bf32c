"""How long the commands that do no training take to answer, as a user runs them: a fresh interpreter each time.

Contenders, interleaved (A B C A B C ...) after a warm-up that fills the OS file cache:
- ``list``: the recipes' cards, read from their source (``peft_lightning.registry.recipe_cards``);
- ``--help``: the top-level usage;
- ``import every recipe``: what ``list`` did before the cards (each recipe class imported, torch and Lightning
  with it), kept as the reference the ratio is taken against.
The figures are wall-clock medians of whole processes (interpreter start included).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks.run import RESULTS

ROOT = RESULTS.parents[1]
CONTENDERS = {
    "list": [sys.executable, "-m", "peft_lightning", "list"],
    "help": [sys.executable, "-m", "peft_lightning", "--help"],
    "import_every_recipe": [
        sys.executable,
        "-c",
        "from peft_lightning.registry import list_recipes; [cls.availability() for _, cls in list_recipes()]",
    ],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 9
    for cmd in CONTENDERS.values():  # warm-up
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(repeats):
        for name, cmd in CONTENDERS.items():
            times[name].append(round(wall(cmd), 3))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "setup": {"repeats": repeats, "target_list_s": 1.5},
        "times_s": times,
        "median_s": med,
        "headline": {
            "list_s": round(med["list"], 3),
            "help_s": round(med["help"], 3),
            "import_every_recipe_s": round(med["import_every_recipe"], 3),
            "list_speedup": round(med["import_every_recipe"] / med["list"], 1),
        },
    }
