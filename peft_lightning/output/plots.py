"""Training curves as PNG from runs' ``metrics.csv`` (Lightning's CSVLogger): one run, or several overlaid.

Only the standard library, PyYAML and matplotlib (Agg backend, no display needed) are imported, never torch:
``python -m peft_lightning plot`` starts in about a second.

    python -m peft_lightning plot runs/effnet_fashion/20260101-120000            # -> that folder's curves.png
    python -m peft_lightning plot runs/effnet_fashion/* --out compare.png         # several runs overlaid

What is drawn: the training loss (and validation loss) and the monitored metric (``checkpoint.monitor`` from the
run's ``config.yaml``, else the first ``val/`` metric that is not a loss) against the optimizer step, the learning
rate of each named parameter group (``lr-<Optimizer>/<group>``, from LearningRateMonitor), and a dashed line where
the fine-tuning phase changed (``finetune/groups``: an unfreeze; ``finetune/round``: a new re-tuning round).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from peft_lightning.errors import UsageError

Series = list[tuple[float, float]]  # (x, value)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding ``metrics.csv``) from folders, ``metrics.csv`` files, or parents of runs."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == "metrics.csv":
            found = [path.parent]
        elif (path / "metrics.csv").is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("metrics.csv"))
        else:
            found = []
        if not found:
            what = "does not exist" if not path.exists() else "holds no metrics.csv (here or below)"
            raise UsageError(
                f"{str(raw)!r} {what}: pass a run folder such as runs/RECIPE/TIMESTAMP "
                "(a run with a CSV logger writes metrics.csv there)"
            )
        runs.extend(p for p in found if p not in runs)
    return runs


def read_metrics(run: Path, x: str = "step") -> dict[str, Series]:
    """Every logged column of ``run/metrics.csv`` as (x, value) points, x being ``step`` or ``epoch``."""
    path = run / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read {str(path)!r} ({type(err).__name__}: {err})") from None
    if not rows or x not in rows[0]:
        raise UsageError(f"{str(path)!r} has no rows with a {x!r} column: is it a Lightning CSVLogger file?")
    series: dict[str, Series] = {}
    for row in rows:
        try:
            at = float(row[x])
        except (TypeError, ValueError):
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or value in ("", None):
                continue
            try:
                series.setdefault(key, []).append((at, float(value)))
            except ValueError:
                continue
    return series


def run_info(run: Path, series: dict[str, Series]) -> dict[str, Any]:
    """The recipe, monitored metric and its mode from ``run/config.yaml`` when there, else from the columns."""
    info: dict[str, Any] = {"recipe": None, "monitor": None, "mode": None}
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        if isinstance(cfg, dict):
            ckpt = cfg.get("checkpoint") or {}
            info.update(recipe=cfg.get("recipe"), monitor=ckpt.get("monitor"), mode=ckpt.get("mode"))
    if info["monitor"] not in series:
        vals = [k for k in series if k.startswith("val/") and not k.endswith("loss")]
        info["monitor"] = vals[0] if vals else ("val/loss" if "val/loss" in series else None)
        info["mode"] = None
    return info


def phase_marks(series: dict[str, Series]) -> list[tuple[float, str]]:
    """(x, label) where the trainable layer groups or the re-tuning round changed (the first value is no change)."""
    marks: dict[float, list[str]] = {}
    for key, word in (("finetune/round", "round"), ("finetune/groups", "groups")):
        points = sorted(series.get(key, []))
        for (_, before), (at, now) in zip(points, points[1:]):
            if now == before:
                continue
            if word == "round":
                label = f"round {now:.0f}"
            else:
                label = f"unfreeze: {now:.0f} groups" if now > before else f"{now:.0f} groups"
            marks.setdefault(at, []).append(label)
    return sorted((at, ", ".join(labels)) for at, labels in marks.items())


def lr_series(series: dict[str, Series]) -> dict[str, Series]:
    """Learning rates by group name; a group's ``.no_wd`` twin (same LR, no weight decay) is left out when equal."""
    lrs = {k: v for k, v in series.items() if k.startswith("lr-")}
    kept = {}
    for key, points in lrs.items():
        twin = key.removesuffix(".no_wd")
        if key.endswith(".no_wd") and twin in lrs and lrs[twin] == points:
            continue
        kept[key.split("/", 1)[1] if "/" in key else key.removeprefix("lr-")] = points
    # Highest first (the head, then down the layer-wise decay): the legend reads top to bottom like the lines.
    return dict(sorted(kept.items(), key=lambda item: -item[1][0][1]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display, also inside notebooks' kernels and on headless machines
    import matplotlib.pyplot as plt

    return plt


def _mark_phases(
    axes: list[Any],
    marks: list[tuple[float, str]],
    color: str = "grey",
    style: str = "--",
    label_prefix: str = "",
) -> None:
    for at, label in marks:
        for ax in axes:
            ax.axvline(at, color=color, linestyle=style, linewidth=0.9, alpha=0.8)
        axes[0].annotate(
            f"{label_prefix}{label}",
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            fontsize=7,
            color=color,
            va="top",
            rotation=90,
        )


def _best(points: Series, mode: str | None) -> tuple[float, float] | None:
    if not points:
        return None
    pick = max if mode != "min" else min
    return pick(points, key=lambda p: p[1])


def plot_run(run: str | Path, out: str | Path | None = None, x: str = "step") -> Path:
    """Draw one run's curves into ``out`` (default ``run/curves.png``); returns the file written."""
    run = Path(run)
    series = read_metrics(run, x)
    info = run_info(run, series)
    train = series.get("train/loss") or series.get("train/loss_step") or []
    if not train and not info["monitor"]:
        raise UsageError(f"{str(run)!r} has no training loss and no validation metric to plot")
    lrs = lr_series(series)
    plt = _pyplot()
    rows = 3 if lrs else 2
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    axes = [a[0] for a in axes]
    ax = axes[0]
    if train:
        ax.plot(*zip(*train), label="train/loss", linewidth=1.2)
    if series.get("val/loss"):
        ax.plot(*zip(*series["val/loss"]), "o-", label="val/loss", markersize=4)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    monitor = info["monitor"]
    if monitor and series.get(monitor):
        points = series[monitor]
        ax.plot(*zip(*points), "o-", color="C2", label=monitor, markersize=4)
        best = _best(points, info["mode"])
        if best:
            ax.plot(*best, "*", color="C3", markersize=12, label=f"best {best[1]:.4f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel(monitor or "metric")
    if lrs:
        ax = axes[2]
        for name, points in lrs.items():
            ax.plot(*zip(*points), label=name, linewidth=1)
        values = [v for points in lrs.values() for _, v in points if v > 0]
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("learning rate")
        ax.legend(loc="upper right", fontsize=7, ncol=max(1, math.ceil(len(lrs) / 6)))
    axes[-1].set_xlabel(x)
    _mark_phases(axes, phase_marks(series))
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"{info['recipe'] or run.parent.name}: {run.name}", fontsize=10)
    fig.tight_layout()
    target = Path(out) if out else run / "curves.png"
    return _save(fig, plt, target)


def plot_compare(runs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Overlay several runs: training loss and each run's monitored metric, phases dotted in the run's colour."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    monitors = []
    names = _short_names([Path(r) for r in runs])
    for i, (run, name) in enumerate(zip(runs, names)):
        run = Path(run)
        series = read_metrics(run, x)
        info = run_info(run, series)
        color = f"C{i % 10}"
        train = series.get("train/loss") or series.get("train/loss_step") or []
        monitor = info["monitor"]
        if not train and not (monitor and series.get(monitor)):
            raise UsageError(f"{str(run)!r} has no training loss and no validation metric to plot")
        if train:
            loss_ax.plot(*zip(*train), color=color, linewidth=1.1, label=name)
        if monitor and series.get(monitor):
            metric_ax.plot(*zip(*series[monitor]), "o-", color=color, markersize=4, label=f"{name}: {monitor}")
            if monitor not in monitors:
                monitors.append(monitor)
        _mark_phases([loss_ax, metric_ax], phase_marks(series), color=color, style=":")
    loss_ax.set_ylabel("train/loss")
    metric_ax.set_ylabel(" / ".join(monitors) or "metric")
    metric_ax.set_xlabel(x)
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} runs", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, Path(out))


def _short_names(runs: list[Path]) -> list[str]:
    """``recipe/timestamp`` for each run (the last two folder names), or more parts when those collide."""
    for depth in (2, 3, 4):
        names = ["/".join(r.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in runs]


def _save(fig: Any, plt: Any, target: Path) -> Path:
    if target.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg"):
        plt.close(fig)
        raise UsageError(f"--out {str(target)!r}: name a .png (or .svg/.pdf/.jpg) file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
    except OSError as err:
        raise UsageError(f"cannot write {str(target)!r}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return target
