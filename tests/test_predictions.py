"""``predict`` writes its predictions: one row per input, in input order, in the run folder, on the test split or on
new, unlabelled data given as a path; the rows of 2 DDP processes end up in one file."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from peft_lightning.callbacks.predictions import format_rows, write_rows
from peft_lightning.tasks.rows import class_rows, multi_label_rows

from conftest import make_image_folder, run_cli
from helpers import tiny_cli_args


def predict_args(folder: Path, root: Path, ckpt: Path, *extra: str) -> list[str]:
    args = tiny_cli_args(folder, root, "--ckpt_path", str(ckpt), *extra)
    k = args.index("--test_after_fit")
    return ["predict", *args[1:k], *args[k + 2 :]]


def written(out: str) -> tuple[Path, list[dict]]:
    """The predictions file a command printed, and its rows."""
    found = re.search(r"^predictions: (\S+) \((\d+) rows", out, re.M)
    assert found, out[-2000:]
    path = Path(found.group(1))
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == int(found.group(2))
    return path, rows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny classifier fitted for 3 epochs on a 3-class image folder, its best checkpoint and test accuracy."""
    root = tmp_path_factory.mktemp("predict")
    folder = make_image_folder(root / "images", per_class=16)
    args = tiny_cli_args(folder, root / "runs", "--trainer.max_epochs", "3", "--model.lr", "0.02", "--quiet")
    args[args.index("--test_after_fit") + 1] = "true"
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = float(re.search(r"vit_cifar: test/acc (\S+)", done.stdout).group(1))
    ckpt = re.search(r"best checkpoint (\S+?)\)", done.stdout).group(1)
    return root, folder, Path(ckpt), acc


def test_predictions_of_the_test_split_give_the_accuracy_of_test(fitted, cli):
    root, folder, ckpt, acc = fitted
    code, out, err = cli(*predict_args(folder, root / "p", ckpt))
    assert code == 0, err[-3000:]
    path, rows = written(out)
    assert path.parent.parent.parent == root / "p" and path.name == "predictions.parquet"
    assert {"id", "prediction", "probability", "top_k", "top_k_probs", "label"} <= set(rows[0])
    assert all(Path(r["id"]).is_file() and r["id"].startswith(str(folder)) for r in rows)  # ids are the files
    assert all(r["prediction"] in {"class_0", "class_1", "class_2"} for r in rows)  # names, not ids
    assert all(r["top_k"][0] == r["prediction"] and r["top_k_probs"][0] == r["probability"] for r in rows)
    assert all(abs(sum(r["top_k_probs"]) - 1) < 1e-4 for r in rows)  # all 3 classes listed
    assert sum(r["prediction"] == r["label"] for r in rows) / len(rows) == pytest.approx(acc, abs=1e-6)
    with open(path.with_suffix(".csv"), newline="") as f:  # the small file's spreadsheet twin
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert json.loads(table[0]["top_k"]) == rows[0]["top_k"]
    assert out.count("\n") >= 3 and rows[0]["id"][:30] in out  # the first rows are shown under the path


def test_predict_on_an_unlabelled_folder_and_a_single_image(fitted, cli, tmp_path):
    root, folder, ckpt, _ = fitted
    new = tmp_path / "new"
    new.mkdir()
    for i, png in enumerate(sorted(folder.glob("class_*/*.png"))[::7]):
        shutil.copy(png, new / f"{i:02d}.png")
    code, out, err = cli(*predict_args(folder, root / "p", ckpt, "--data.predict_data", str(new)))
    assert code == 0, err[-3000:]
    _, rows = written(out)
    assert [Path(r["id"]).name for r in rows] == sorted(p.name for p in new.iterdir())  # every file, in order
    assert "label" not in rows[0] and rows[0]["prediction"].startswith("class_")
    # The class names come from the checkpoint: the training folder need not be here.
    code, out, err = cli(*predict_args(tmp_path / "gone", root / "p", ckpt, "--data.predict_data", str(new / "03.png")))
    assert code == 0, err[-3000:]
    _, one = written(out)
    assert len(one) == 1 and one[0]["id"] == str(new / "03.png") and one[0]["top_k"] == rows[3]["top_k"]
    assert one[0]["top_k_probs"] == pytest.approx(rows[3]["top_k_probs"], abs=1e-5)  # a batch of 1, not of 6


@pytest.mark.slow
def test_two_ddp_processes_write_one_file_in_input_order(fitted, cli):
    root, folder, ckpt, _ = fitted
    code, out, err = cli(*predict_args(folder, root / "one", ckpt, "--data.eval_batch_size", "3"))
    assert code == 0, err[-3000:]
    _, single = written(out)
    args = predict_args(folder, root / "two", ckpt, "--data.eval_batch_size", "3")
    done = run_cli(*args, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("predictions: ") == 1  # rank 0 writes and says so
    _, both = written(done.stdout)
    assert [r["id"] for r in both] == [r["id"] for r in single]
    for a, b in zip(both, single):
        assert a["prediction"] == b["prediction"] and a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_rows_name_classes_and_keep_the_true_label():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    rows = class_rows(probs, ["a", "b", "c"], 2, {"id": ["x", "y"], "target": [1, "a"]})
    assert [r["prediction"] for r in rows] == ["b", "a"] and [r["label"] for r in rows] == ["b", "a"]
    assert rows[0]["top_k"] == ["b", "c"] and rows[1]["top_k_probs"] == pytest.approx([0.6, 0.3])
    multi = multi_label_rows(probs, ["a", "b", "c"], 0.25, 3, {"id": torch.tensor([4, 5])})
    assert multi[0]["prediction"] == ["b", "c"] and multi[1]["prediction"] == ["a", "c"] and multi[0]["id"] == 4
    assert "label" not in multi[0]


def test_write_rows_keeps_csv_for_small_files_only(tmp_path):
    rows = [{"id": str(i), "top_k": ["a", "b"], "probability": 0.5} for i in range(3)]
    write_rows(rows, tmp_path, csv_rows=3)
    assert (tmp_path / "predictions.csv").is_file() and pq.read_table(tmp_path / "predictions.parquet").num_rows == 3
    write_rows(rows, tmp_path, csv_rows=2)  # too many for a spreadsheet now: the old CSV must not disagree
    assert not (tmp_path / "predictions.csv").exists()
    shown = format_rows(rows[:2])
    assert shown.splitlines()[0].split() == ["id", "top_k", "probability"] and "a, b" in shown
