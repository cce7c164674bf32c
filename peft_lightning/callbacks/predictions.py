"""What ``predict`` writes: one row per input, in input order, to ``predictions.parquet`` in the run folder (and
``predictions.csv`` beside it when the file is small enough to open in a spreadsheet).

The rows are the task's (``FineTuneTask.prediction_rows``: a classifier writes the input's id, the predicted class
name, its probability, the top-k classes and the true label when the data has one; a recommender each user's
top-k items). This callback only collects them: each process keeps the rows of the inputs it was given with their
index in the data (Lightning hands predict's sampler indices to ``write_on_batch_end``; under DDP its sampler
splits the inputs without repeating any), and at the end of the epoch rank 0 gathers every process's rows, puts
them back in input order and writes one file.

Example:
    >>> trainer = Trainer(callbacks=[PredictionWriter(top_k=3)], default_root_dir="out")  # doctest: +SKIP
    >>> trainer.predict(task, datamodule=dm)  # doctest: +SKIP
    predictions: out/predictions.parquet (200 rows; also predictions.csv)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from peft_lightning.errors import UsageError

SHOWN_ROWS = 5
"""Rows printed under the file's path: enough to see that the predictions are what was asked for."""


class PredictionWriter(BasePredictionWriter):
    """Write ``predict``'s rows to ``predictions.parquet`` (and ``predictions.csv`` when small) in the run folder.

    Args:
        top_k: classes (or items) listed per input with their probabilities (scores).
        out: the output folder; default: the run folder (``runs/RECIPE/TIMESTAMP``).
        csv_rows: also write ``predictions.csv`` when there are at most this many rows (0: never). Its list
            cells (the top-k) are JSON arrays.
    """

    def __init__(self, top_k: int = 5, out: str | None = None, csv_rows: int = 100_000) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1 or csv_rows < 0:
            raise UsageError(f"--predictions.top_k must be >= 1 and csv_rows >= 0, got {top_k} and {csv_rows}")
        self.top_k = top_k
        self.out = out
        self.csv_rows = csv_rows
        self.rows: list[tuple[int, int, dict[str, Any]]] = []
        self.written: Path | None = None

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        rows = pl_module.prediction_rows(prediction, batch, top_k=self.top_k)
        if batch_indices is None or len(batch_indices) != len(rows):  # a sampler Lightning could not track
            start = len(self.rows)
            batch_indices = range(start, start + len(rows))
        for i, row in zip(batch_indices, rows):
            if "id" in row and row["id"] in ("", None):  # an input with no name of its own (an embedded image)
                row["id"] = str(i)
            self.rows.append((dataloader_idx, int(i), row))

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size if trainer.is_global_zero else []
            torch.distributed.gather_object(rows, gathered if trainer.is_global_zero else None, dst=0)
            rows = [r for part in gathered for r in part] if trainer.is_global_zero else []
        self.rows = []
        if not trainer.is_global_zero:
            return
        ordered = {(dl, i): row for dl, i, row in sorted(rows, key=lambda r: (r[0], r[1]))}  # one row per input
        table = list(ordered.values())
        folder = Path(self.out or trainer.default_root_dir)
        self.written = write_rows(table, folder, csv_rows=self.csv_rows)
        also = "; also predictions.csv" if 0 < len(table) <= self.csv_rows else ""
        print(f"predictions: {self.written} ({len(table)} rows{also})")
        if table:
            print(format_rows(table[:SHOWN_ROWS]))


def write_rows(rows: list[dict[str, Any]], folder: Path, *, csv_rows: int) -> Path:
    """``rows`` as ``folder/predictions.parquet``, and ``predictions.csv`` when at most ``csv_rows``; the parquet
    path. An earlier CSV that this call would not replace is removed, so the two files never disagree."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    csv_path = folder / "predictions.csv"
    if rows and len(rows) <= csv_rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(csv_path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
    elif csv_path.is_file():
        csv_path.unlink()
    return path


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def format_rows(rows: list[dict[str, Any]], width: int = 40) -> str:
    """A few rows as an aligned text table (long cells cut to ``width``), for the screen."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def text(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value)
        value = str(value)
        return value if len(value) <= width else value[: width - 1] + "…"

    cells = [[text(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
