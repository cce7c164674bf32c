"""The offline recipes' end metrics and wall time, one row each, run as a user runs them: a fresh
``python -m peft_lightning fit --recipe NAME`` process per recipe, which tests the best checkpoint after fit and
prints one line of test metrics; this benchmark reads that line and times the process.

``twotower_movielens`` is its documented two-command workflow: pretrain before the time cut-off, then fine-tune
after it from the pretrain's ``last.ckpt`` (two rows). The full run uses the recipes' defaults (~15 minutes on 2
free cores); ``--quick`` caps every recipe to a few batches with ordinary overrides, which checks that each still
runs end to end and reports its metrics, but its figures say nothing about the recipes' quality.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (recipe, headline metric, overrides for --quick)
ROWS = {
    "effnet_fashion": (
        "effnet_fashion",
        "test/acc",
        [
            "--data.max_train_samples",
            "640",
            "--data.max_val_samples",
            "200",
            "--data.max_test_samples",
            "500",
            "--data.num_workers",
            "0",
        ],
    ),
    "minilm_austen": (
        "minilm_austen",
        "test/acc",
        ["--data.max_train_samples", "160", "--data.max_val_samples", "64", "--data.max_test_samples", "128"],
    ),
    "minilm_punctuation": (
        "minilm_punctuation",
        "test/f1",
        ["--data.max_train_samples", "160", "--data.max_val_samples", "64", "--data.max_test_samples", "128"],
    ),
    "fcos_fashion_scenes": (
        "fcos_fashion_scenes",
        "test/map_50",
        [
            "--data.max_train_samples",
            "64",
            "--data.max_val_samples",
            "32",
            "--data.max_test_samples",
            "32",
            "--trainer.max_epochs",
            "1",
        ],
    ),
    "bpr_movielens": (
        "bpr_movielens",
        "test/ndcg@10",
        ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "10"],
    ),
    "twotower_movielens (pretrain)": (
        "twotower_movielens",
        "test/ndcg@10",
        ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"],
    ),
    "twotower_movielens (finetune)": (
        "twotower_movielens",
        "test/ndcg@10",
        ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"],
    ),
}
LINE = re.compile(r"^(?P<recipe>\S+): (?P<metrics>.*?)\s+wall (?P<min>\d+)m(?P<sec>\d+)s")


def parse(stdout: str) -> dict[str, float]:
    """The metrics of the CLI's last line: ``NAME: test/acc 0.9012  test/f1 0.9001  wall 4m51s  (...)``."""
    for line in reversed(stdout.splitlines()):
        m = LINE.match(line.strip())
        if m:
            pairs = re.findall(r"(\S+) (-?\d+(?:\.\d+)?(?:e-?\d+)?)", m["metrics"])
            return {**{k: float(v) for k, v in pairs}, "cli_wall_s": 60 * int(m["min"]) + int(m["sec"])}
    raise ValueError("no test-metrics line in the output")


def fit(recipe: str, args: list[str], root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "peft_lightning",
        "fit",
        "--recipe",
        recipe,
        "--trainer.default_root_dir",
        str(root),
        *args,
    ]
    start = time.perf_counter()
    res = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    shown = " ".join(["python -m peft_lightning fit --recipe", recipe, *args]).replace(str(root), "RUN")
    if res.returncode != 0:
        raise RuntimeError(f"`{shown}` exited {res.returncode}: {(res.stderr or res.stdout)[-1500:]}")
    try:
        metrics = parse(res.stdout)
    except ValueError:
        raise ValueError(f"`{shown}` printed no test metrics: {res.stdout[-1500:]}") from None
    return {"command": shown, "wall_s": round(wall, 1), "metrics": metrics}


def run(quick: bool = False, smoke: bool = False) -> dict:
    from peft_lightning.registry import get_recipe

    rows: dict[str, dict] = {}
    # smoke (the test suite): one recipe's quick row, the plumbing of every row (a process, its line, its clock).
    chosen = {k: v for k, v in ROWS.items() if not smoke or k == "bpr_movielens"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, metric, quick_args) in chosen.items():
            ok, why = get_recipe(recipe).availability()
            if not ok:
                rows[name] = {"skipped": why}
                continue
            args = list(quick_args) if quick else []
            root = Path(tmp, recipe)
            if name.endswith("(finetune)"):
                ckpt = next(Path(tmp, recipe, "pretrain").rglob("last.ckpt"), None)
                if ckpt is None:
                    rows[name] = {"skipped": "the pretrain run left no last.ckpt"}
                    continue
                args += ["--data.phase", "finetune", "--model.init_from", str(ckpt)]
                root = root / "finetune"
            elif name.endswith("(pretrain)"):
                root = root / "pretrain"
            try:
                row = fit(recipe, args, root)
            except (RuntimeError, ValueError) as err:
                # A recipe that fails is a row saying so (a regression shows), not a lost table.
                rows[name] = {"error": str(err)[:2000]}
                continue
            rows[name] = {**row, "headline_metric": metric, "value": row["metrics"].get(metric)}
    headline = {name: [row.get("value"), row.get("wall_s")] for name, row in rows.items()}
    failed = [name for name, row in rows.items() if "error" in row]
    return {
        "setup": {
            "mode": "smoke: bpr_movielens only, a few batches"
            if smoke
            else "quick: a few batches per recipe (figures not comparable to the recipes')"
            if quick
            else "the recipes' defaults"
        },
        "rows": rows,
        "headline": {"metric_and_wall_s": headline, "failed": failed},
    }
