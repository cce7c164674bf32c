"""Pieces the benchmarks share: a step clock that rides along a Lightning run, the CLI run in-process, the
interleaving of contenders, and summary figures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from typing_extensions import override


def now(sync: bool = True) -> float:
    """``perf_counter``, after the GPU (if any) has finished its queued work, so a clock read is not early."""
    import torch

    if sync and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(Callback):
    """Times every training step of a Lightning run and writes what it saw to ``out`` (JSON).

    The clock is read at each ``on_train_batch_start``, when the batch is on the device and nothing of the step has
    run: the time between two reads is one whole step, with everything Lightning does around it (logging, progress
    bar, callbacks, LR schedulers, fetching the next batch). A plain loop reads its clock at the same point.
    It also records the padded size of each batch (``input_ids`` for text), which parameters trained, and the test
    metrics when a test runs after fit.

    Args:
        out: the JSON file written at the end of training (and updated after a test).
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.result: dict[str, Any] = {}

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.append(now())
        if isinstance(batch, Mapping) and "input_ids" in batch:  # a dict, or transformers' BatchEncoding
            self.tokens.append(int(batch["input_ids"].numel()))
        if not self.result.get("trainable"):
            self.result["trainable"] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self.result.update(times=self.times, tokens=self.tokens, global_step=trainer.global_step)
        self._write()

    @override
    def on_test_end(self, trainer, pl_module) -> None:
        self.result["test"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self._write()

    def _write(self) -> None:
        Path(self.out).write_text(json.dumps(self.result))


def quiet_unless_debug() -> None:
    """Hide the libraries' notices in the benchmark's own fits (Lightning's cloud tips, transformers' loading bar
    and report ...) as ``python -m peft_lightning fit`` does, unless ``PEFT_LIGHTNING_DEBUG=1``: a benchmark is an
    entry point like the CLI, so it reads that switch itself."""
    if not os.environ.get("PEFT_LIGHTNING_DEBUG"):
        from peft_lightning.output.summary import hide_third_party_noise

        hide_third_party_noise()


def cli_fit(args: list[str], clock_out: Path) -> dict[str, Any]:
    """``python -m peft_lightning fit ARGS`` in this process with a ``StepClock``; returns what the clock saw,
    the wall time of the whole command and its last printed line. The progress bar and logs still render (into
    a buffer): their cost is part of what a user pays."""
    from peft_lightning.cli import main

    clock = ["--trainer.callbacks+=benchmarks.common.StepClock", f"--trainer.callbacks.out={clock_out}"]
    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            main(["fit", *args, *clock])
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"fit {' '.join(args)} exited {exit_.code}: {buffer.getvalue()[-1500:]}") from None
    wall = time.perf_counter() - start
    result = json.loads(Path(clock_out).read_text())
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    return {**result, "wall_s": wall, "last_line": lines[-1] if lines else "", "output": "\n".join(lines[-60:])}


def throughput(starts: list[float], batch_sizes: list[int] | int, warmup: int) -> dict[str, float]:
    """Samples/s over the steps after ``warmup``, from the clock read at the start of each step: step i is
    ``starts[i+1] - starts[i]``, so the last step (whose end is the end of the run: checkpoint, teardown) is not
    counted."""
    n = len(starts) - 1  # whole steps timed
    if n <= warmup:
        raise ValueError(f"{n} whole steps timed, need more than the {warmup} warm-up steps")
    sizes = [batch_sizes] * n if isinstance(batch_sizes, int) else batch_sizes
    steps = [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1 :])]
    return {
        "samples_per_s": sum(sizes[warmup:n]) / (starts[-1] - starts[warmup]),
        "steps": len(steps),
        "median_step_s": statistics.median(steps),
    }


def interleave(contenders: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict[str, list[dict]]:
    """A B A B ...: each contender once to warm up (discarded) when ``warmup``, then ``repeats`` rounds. Garbage
    is collected before each run, so a finished run's loader workers and buffers do not linger into the next."""
    import gc

    if warmup:
        for fn in contenders.values():
            gc.collect()
            fn()
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            gc.collect()
            runs[name].append(fn())
    return runs


def ratio_summary(runs: dict[str, list[dict]], ours: str, theirs: str, key: str = "samples_per_s") -> dict:
    """Medians of each contender, the ratio of the medians, and the median of the pairwise ratios (round i of
    ``ours`` over round i of ``theirs``: the one that drifting background load disturbs least)."""
    a = [r[key] for r in runs[ours]]
    b = [r[key] for r in runs[theirs]]
    return {
        f"{ours}_median": statistics.median(a),
        f"{theirs}_median": statistics.median(b),
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "median_pairwise_ratio": statistics.median(x / y for x, y in zip(a, b)),
        "pairwise_ratios": [x / y for x, y in zip(a, b)],
    }


def bar_chart(
    path: Path,
    title: str,
    groups: dict[str, dict[str, float]],
    ylabel: str,
    notes: dict[str, str] | None = None,
) -> None:
    """Grouped bars: one group per key of ``groups`` (e.g. a model), one bar per contender, a note under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    contenders = list(dict.fromkeys(c for g in groups.values() for c in g))
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(names), 3.6))
    for i, c in enumerate(contenders):
        xs = [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(names))]
        ys = [groups[n].get(c, float("nan")) for n in names]  # a cell that was not run draws no bar
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, labels=["" if y != y else f"{y:.1f}" for y in ys], fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{(notes or {}).get(n, '')}" for n in names])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
