"""Which layers to tune under a distribution shift: fixed choices against ``--finetuning.strategy auto``.

The setting of Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts" (ICLR 2023), on
what is here offline. Source model: EfficientNet-Lite0 (ImageNet weights) fine-tuned in full on clean
Fashion-MNIST, as the paper's source models are (effnet_fashion's data and schedule with ``--finetuning.strategy
full``; made once and cached in the results folder's ``.cache``). Targets, each a small
labelled training set (1,000 images drawn with a fixed seed from the Fashion-MNIST training split, which the
source was trained on in their clean form) and the full shifted 10,000-image test set, which no model saw:

- ``noise``: Gaussian pixel noise (std 0.25 of the range); ``inversion``: 255 - x; ``blur``: Gaussian blur
  (radius 1.2 px at 28 px) — input-level shifts;
- ``coarse``: the same images, labels remapped to 4 coarse classes (tops, trousers + dresses, shoes, bags) — an
  output-level shift (a new 4-way head).

Contenders, at the same epoch budget, each a ``python -m peft_lightning fit`` in this process from the source
weights: ``full``, ``head``, ``first`` (stem, blocks.0 and the head), ``top3`` (blocks.5-6 and the head),
``auto_select`` and ``auto_scale``. Each tests its best-validation checkpoint on the shifted test set.

Second part (``--recipes``, or ``python -m benchmarks.surgical recipes``): ``auto`` against the hand-tuned
defaults of effnet_fashion and minilm_austen, each run as a user runs it (a fresh process, the recipe's whole
budget, the test line it prints), interleaved default / auto.
"""

from __future__ import annotations

import gzip
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cli_fit
from benchmarks.run import RESULTS

IDX = "/usr/share/datasets/fashion-mnist"
COARSE = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot
SHIFTS = ("noise", "inversion", "blur", "coarse")
CONTENDERS = {
    "full": ["--finetuning.strategy", "full"],
    "head": ["--finetuning.strategy", "head"],
    "first": ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", "[stem, blocks.0, head]"],
    "top3": ["--finetuning.strategy", "Head", "--finetuning.strategy.groups", "3"],
    "auto_select": ["--finetuning.strategy", "Auto", "--finetuning.strategy.mode", "select"],
    "auto_scale": ["--finetuning.strategy", "Auto", "--finetuning.strategy.mode", "scale"],
    # the probe after 10 steps of the head alone (a new head sends noise into the body's gradients)
    "auto_select_warm": [
        "--finetuning.strategy",
        "Auto",
        "--finetuning.strategy.mode",
        "select",
        "--finetuning.strategy.probe_after",
        "10",
    ],
    "auto_scale_warm": [
        "--finetuning.strategy",
        "Auto",
        "--finetuning.strategy.mode",
        "scale",
        "--finetuning.strategy.probe_after",
        "10",
    ],
}
AUTO = [c for c in CONTENDERS if c.startswith("auto")]


def read_idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    x = np.frombuffer(gzip.open(f"{IDX}/{prefix}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(f"{IDX}/{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return x.reshape(-1, 28, 28), y.astype(np.int64)


def shift(images: np.ndarray, labels: np.ndarray, name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "noise":
        noisy = images.astype(np.float32) + rng.normal(0, 0.25 * 255, images.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8), labels
    if name == "inversion":
        return 255 - images, labels
    if name == "blur":
        from PIL import Image, ImageFilter

        blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.2))) for im in images]
        return np.stack(blurred), labels
    if name == "coarse":
        return images, np.asarray(COARSE)[labels]
    raise ValueError(name)


def write_target(folder: Path, name: str, train: int, test: int | None) -> int:
    """A save_to_disk DatasetDict (train, test) of the shifted data; returns the number of classes."""
    import datasets
    from PIL import Image

    x, y = read_idx("train")
    # From the training split: the source saw these images clean (as the paper's CIFAR-10-C targets are shifted
    # copies of CIFAR-10, the source's data); the shifted test set is what no model saw.
    order = np.random.default_rng(0).permutation(len(x))
    pick = np.random.default_rng(1).choice(order[36_000:], train, replace=False)
    tx, ty = shift(x[pick], y[pick], name, seed=2)
    ex, ey = read_idx("test")
    if test:
        ex, ey = ex[:test], ey[:test]
    ex, ey = shift(ex, ey, name, seed=3)
    classes = 4 if name == "coarse" else 10

    def as_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
        def png(im: np.ndarray) -> dict[str, Any]:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            return {"bytes": buf.getvalue(), "path": None}

        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in range(classes)])}
        )
        return datasets.Dataset.from_dict(
            {"image": [png(im) for im in images], "label": labels.tolist()}, features=features
        )

    datasets.DatasetDict({"train": as_dataset(tx, ty), "test": as_dataset(ex, ey)}).save_to_disk(str(folder))
    return classes


def source_weights(cache: Path, train_samples: int | None) -> Path:
    """The source model: effnet_fashion fine-tuned on clean Fashion-MNIST, its timm state_dict as safetensors."""
    out = cache / f"source_full_{train_samples or 'all'}.safetensors"
    if out.is_file():
        return out
    import torch
    from safetensors.torch import save_file

    root = Path(tempfile.mkdtemp(prefix="surgical-source-"))
    extra = ["--data.max_train_samples", str(train_samples)] if train_samples else []
    cli_fit(
        [
            "--recipe",
            "effnet_fashion",
            "--trainer.default_root_dir",
            str(root),
            "--test_after_fit",
            "false",
            "--data.max_val_samples",
            "2000",
            "--finetuning.strategy",
            "full",
            *extra,
        ],
        root / "clock.json",
    )
    (ckpt,) = root.glob("*/*/checkpoints/best-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k.removeprefix("model."): v.contiguous() for k, v in state.items() if k.startswith("model.")}, str(out))
    return out


def one_cell(weights: Path, target: Path, classes: int, contender: str, epochs: int, root: Path) -> dict[str, Any]:
    args = [
        "--recipe",
        "effnet_fashion",
        "--model.checkpoint_path",
        str(weights),
        "--model.num_classes",
        str(classes),
        "--data.dataset",
        str(target),
        "--data.val_fraction",
        "0.1",
        "--data.num_workers",
        "0",
        "--data.augment",
        "false",
        "--trainer.max_epochs",
        str(epochs),
        "--model.warmup",
        "0.1",
        "--trainer.default_root_dir",
        str(root / contender),
        "--checkpoint.save_last",
        "false",
        *CONTENDERS[contender],
    ]
    start = time.perf_counter()
    out = cli_fit(args, root / f"{contender}.json")
    return {
        "test_acc": out["test"]["test/acc"],
        "wall_s": round(time.perf_counter() - start, 1),
        "trainable": len(out.get("trainable", [])),
    }


def budget(quick: bool, smoke: bool) -> tuple[int, int | None, int, int | None]:
    """(training images per target, test images (None: all 10,000), epochs, source training images)."""
    return (64, 200, 1, 640) if smoke else (1000, 2000, 3, 6000) if quick else (1000, None, 5, None)


def cells(contenders: list[str], quick: bool = False, smoke: bool = False) -> dict[str, dict[str, dict]]:
    """Every shift x every contender: test accuracy, wall time."""
    train, test, epochs, source_n = budget(quick, smoke)
    weights = source_weights(RESULTS / ".cache" / "surgical", source_n)
    table: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="surgical-") as tmp:
        for name in SHIFTS:
            target = Path(tmp) / name
            classes = write_target(target, name, train, test)
            table[name] = {
                c: one_cell(weights, target, classes, c, epochs, Path(tmp) / f"runs-{name}") for c in contenders
            }
    return table


def summarise(table: dict[str, dict[str, dict]], quick: bool = False, smoke: bool = False) -> dict:
    train, test, epochs, source_n = budget(quick, smoke)
    contenders = [c for c in CONTENDERS if all(c in table[s] for s in SHIFTS)]
    auto = [c for c in AUTO if c in contenders]
    fixed = ("full", "head", "first", "top3")
    summary = {}
    for name, row in table.items():
        best_fixed = max(fixed, key=lambda c: row[c]["test_acc"])
        summary[name] = {
            "best_fixed": best_fixed,
            "best_fixed_acc": row[best_fixed]["test_acc"],
            **{
                f"{c}_minus_best_fixed_pts": round(100 * (row[c]["test_acc"] - row[best_fixed]["test_acc"]), 2)
                for c in auto
            },
        }
    mean = {c: statistics.mean(table[s][c]["test_acc"] for s in SHIFTS) for c in contenders}
    chart = {
        "title": f"surgical fine-tuning: test accuracy after {epochs} epochs on {train} shifted images",
        "groups": {s: {c: 100 * table[s][c]["test_acc"] for c in contenders} for s in SHIFTS},
        "ylabel": "test accuracy (%)",
    }
    return {
        "setup": {
            "train_images": train,
            "test_images": test or 10_000,
            "epochs": epochs,
            "source_train_samples": source_n or "recipe default (36,000)",
            "contenders": {c: CONTENDERS[c] for c in contenders},
        },
        "table": table,
        "per_shift": summary,
        "mean_test_acc": mean,
        "chart": chart,
        "headline": {
            **{f"mean_{c}": round(v, 4) for c, v in mean.items()},
            **{f"{c}_worst_gap_pts": min(s[f"{c}_minus_best_fixed_pts"] for s in summary.values()) for c in auto},
        },
    }


def run(quick: bool = False, smoke: bool = False) -> dict:
    return summarise(cells(list(CONTENDERS), quick, smoke), quick, smoke)


RECIPES = ("effnet_fashion", "minilm_austen")


def recipes_vs_auto(quick: bool = False, modes: tuple[str, ...] = ("select", "scale")) -> dict:
    """Each offline recipe's hand-tuned layer choice against ``--finetuning.strategy auto``, same budget."""
    from benchmarks.quality import ROWS
    from benchmarks.quality import fit as cli_process

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="surgical-recipes-") as tmp:
        for recipe in RECIPES:
            quick_args = list(ROWS[recipe][2]) if quick else []
            contenders = {
                "default": [],
                **{f"auto_{m}": ["--finetuning.strategy", "Auto", "--finetuning.strategy.mode", m] for m in modes},
            }
            rows[recipe] = {}
            for name, extra in contenders.items():  # default, auto ... one after another, from the same state
                out = cli_process(recipe, [*quick_args, *extra], Path(tmp) / recipe / name)
                rows[recipe][name] = {
                    "test_acc": out["metrics"].get("test/acc"),
                    "wall_s": out["wall_s"],
                    "command": out["command"],
                }
    return rows


def add(contenders: list[str], quick: bool = False) -> Path:
    """Run more contenders on the same targets and source, and merge them into the saved result."""
    import json

    from benchmarks.common import bar_chart
    from benchmarks.run import load

    out = RESULTS / f"surgical{'_quick' if quick else ''}.json"
    saved = json.loads(out.read_text())
    started = load()
    table = saved["table"]
    for shift, row in cells(contenders, quick).items():
        table[shift].update(row)
    merged = summarise(table, quick)
    chart = merged.pop("chart")
    saved.update(merged)
    saved["added"] = {"contenders": contenders, "load_avg_start": started, "load_avg_end": load()}
    mode = "quick" if quick else "full"
    bar_chart(out.with_suffix(".png"), f"{chart['title']} [{mode}]", chart["groups"], chart["ylabel"])
    out.write_text(json.dumps(saved, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import json
    import sys

    from benchmarks.run import load, machine

    quick = "--quick" in sys.argv
    if sys.argv[1:2] == ["add"]:  # python -m benchmarks.surgical add NAME ... [--quick]
        print(add([a for a in sys.argv[2:] if not a.startswith("--")], quick))
        sys.exit(0)
    started = load()
    result = {
        "benchmark": "surgical recipes",
        "quick": quick,
        "load_avg_start": started,
        "rows": recipes_vs_auto(quick, modes=("scale",)),
        "load_avg_end": load(),
        "machine": machine(),
    }
    out = RESULTS / f"surgical_recipes{'_quick' if quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"results": str(out), "rows": result["rows"]}))
