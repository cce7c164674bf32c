"""Does a search beat the hand-found defaults? ``tune`` on a small per-trial budget within a fixed wall budget, then
the best trial's config (``best.yaml``) rerun at the recipe's full budget beside the default at that same budget.

Two studies, each run as a user runs it (a fresh ``python -m peft_lightning tune`` process, then fresh ``fit``
processes that test the best checkpoint; ``benchmarks.quality.fit`` reads their test line and times them):

- ``effnet_fashion``: the recipe's ``search_space`` (learning rate, weight decay, warmup, label smoothing, how many
  layer groups train). Per trial: 6,000 training images, 1,000 validation images, 1 epoch (the recipe's), ~1 minute
  on 2 cores; 15 minutes of search. Then ``fit -c best.yaml`` at the recipe's budget (36,000 images, 2,000 for
  validation, the full test set) against ``fit --recipe effnet_fashion``.
- ``minilm_austen`` with LoRA on every layer and the head (``--peft.method lora --finetuning.strategy full``, the
  LoRA row of docs/text.md): rank, alpha, learning rate and target modules (``LORA_SPACE``). Per trial: 1,000
  passages, 300 for validation, 1 epoch; 15 minutes of search. Then the best at the recipe's budget (3,000
  passages) against the documented LoRA setting (r 8, alpha 16, lr 5e-4) and full fine-tuning at that budget.

One-epoch trials leave the pruner nothing to stop early (it judges at each epoch's validation): every trial runs
its whole budget. ``--quick`` runs 2-3 trials on a few hundred samples and reruns at the ``quality`` benchmark's
quick budget: it checks the plumbing, its figures say nothing about search.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.quality import fit

ROOT = Path(__file__).resolve().parents[1]
LORA = ["--peft.method", "lora", "--finetuning.strategy", "full"]
LORA_DEFAULT = [*LORA, "--peft.r", "8", "--peft.alpha", "16", "--model.lr", "5e-4"]  # docs/text.md's LoRA row
LORA_SPACE = {
    "peft.r": {"type": "categorical", "choices": [4, 8, 16, 32]},
    "peft.alpha": {"type": "float", "low": 8.0, "high": 64.0, "log": True},
    "model.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    # null: every linear in the blocks (query, key, value and the three dense layers)
    "peft.target_modules": {"type": "categorical", "choices": [None, ["query", "value"], ["query", "key", "value"]]},
    # the recipe's other keys: fixed here (plain-weight strategy and method, LoRA with the schedule's defaults)
    "peft.method": None,
    "finetuning.strategy.groups": None,
    "model.weight_decay": None,
    "model.warmup": None,
}
STUDIES = {
    # name: recipe, fixed flags, space (None: the recipe's), per-trial budget (full, quick), rerun budget (full,
    # quick), the default's flags, more reference rows
    "effnet_fashion": {
        "recipe": "effnet_fashion",
        "flags": [],
        "space": None,
        "trial": (
            ["--data.max_train_samples", "6000", "--data.max_val_samples", "1000"],
            ["--data.max_train_samples", "256", "--data.max_val_samples", "128", "--data.num_workers", "0"],
        ),
        "rerun": (
            [],
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
        "default": [],
        "references": {},
    },
    "minilm_austen_lora": {
        "recipe": "minilm_austen",
        "flags": LORA,
        "space": LORA_SPACE,
        "trial": (
            ["--data.max_train_samples", "1000", "--data.max_val_samples", "300"],
            ["--data.max_train_samples", "96", "--data.max_val_samples", "64"],
        ),
        "rerun": (
            [],
            ["--data.max_train_samples", "160", "--data.max_val_samples", "64", "--data.max_test_samples", "128"],
        ),
        "default": LORA_DEFAULT,
        "references": {"full fine-tuning": ["--finetuning.strategy", "full"]},
    },
}
SEARCH_S = 15 * 60  # wall budget of each search (full mode)


def search(recipe: str, flags: list[str], space: dict | None, root: Path, quick: bool) -> dict:
    """``python -m peft_lightning tune`` in a fresh process; the study's trials read back from its storage."""
    import optuna
    import yaml

    budget = ["--n_trials", "2" if quick else "200"] + ([] if quick else ["--timeout", str(SEARCH_S)])
    args = ["--recipe", recipe, "--trainer.default_root_dir", str(root), "--quiet", "--study", "bench", *budget, *flags]
    if space is not None:
        (root / "space.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "space.yaml").write_text(yaml.safe_dump(space))
        args += ["--space", str(root / "space.yaml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "peft_lightning", "tune", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    wall = time.perf_counter() - start
    shown = " ".join(["python -m peft_lightning tune", *args]).replace(str(root), "RUN")
    if res.returncode != 0:
        raise RuntimeError(f"`{shown}` exited {res.returncode}: {(res.stderr or res.stdout)[-1500:]}")
    folder = root / recipe / "tune-bench"
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'study.db'}")
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "seconds": t.duration.total_seconds() if t.duration else None,
            "reason": t.user_attrs.get("reason"),
        }
        for t in study.trials
    ]
    return {
        "command": shown,
        "wall_s": round(wall, 1),
        "trials": trials,
        "best_value": study.best_value,
        "best_params": study.best_params,
        "best_yaml": str(folder / "best.yaml"),
    }


def run(quick: bool = False) -> dict:
    from peft_lightning.registry import get_recipe

    rows: dict[str, dict] = {}
    mode = 1 if quick else 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in STUDIES.items():
            ok, why = get_recipe(s["recipe"]).availability()
            if not ok:
                rows[name] = {"skipped": why}
                continue
            root = Path(tmp, name)
            try:
                found = search(s["recipe"], [*s["flags"], *s["trial"][mode]], s["space"], root, quick)
                # The rerun's budget flags come after best.yaml (which holds the trials' budget): they win, and
                # leave the recipe's full budget where the list is empty: the trial-budget keys are reset to the
                # recipe's own defaults.
                reset = _reset_budget(get_recipe(s["recipe"]), s["trial"][mode])
                # --quiet in both: best.yaml carries the search's --quiet, and the progress bar costs time.
                rerun = [*reset, *s["rerun"][mode], "--quiet"]
                row = {
                    "search": found,
                    "best": fit(s["recipe"], ["-c", found["best_yaml"], *rerun], root / "best"),
                    "default": fit(s["recipe"], [*s["default"], *rerun], root / "default"),
                }
                for label, flags in ({} if quick else s["references"]).items():
                    row[label] = fit(s["recipe"], [*flags, *rerun], root / label.replace(" ", "_"))
            except (RuntimeError, ValueError) as err:  # a failed study is a row saying so, not a lost table
                rows[name] = {"error": str(err)[:2000]}
                continue
            acc = {k: v["metrics"].get("test/acc") for k, v in row.items() if k != "search"}
            row["summary"] = {
                "test_acc": acc,
                "wall_s": {k: v["wall_s"] for k, v in row.items() if "wall_s" in v},
                "best_minus_default": round(acc["best"] - acc["default"], 4)
                if None not in (acc["best"], acc["default"])
                else None,
            }
            rows[name] = row
    headline = {name: row.get("summary", row) for name, row in rows.items()}
    return {
        "setup": {
            "mode": "quick: 2 trials on a few hundred samples, reruns at the quality benchmark's quick budget "
            "(figures say nothing about search)"
            if quick
            else f"full: {SEARCH_S // 60} min of search per study at the per-trial budget, then reruns at the "
            "recipe's budget",
            "studies": {
                k: {kk: vv for kk, vv in v.items() if kk != "space"} | {"space": v["space"] or "recipe's"}
                for k, v in STUDIES.items()
            },
        },
        "rows": rows,
        "headline": headline,
    }


def _reset_budget(recipe: type, trial_flags: list[str]) -> list[str]:
    """For each ``--data.X`` of the trials' budget, the recipe's own default (``null`` when it has none)."""
    out = []
    for flag in trial_flags[::2]:
        key = flag.removeprefix("--data.")
        if flag.startswith("--data."):
            value = recipe.data_defaults.get(key)
            out += [flag, "null" if value is None else str(value)]
    return out
