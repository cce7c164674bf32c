"""What a run leaves and shows: one folder with config, metrics, TensorBoard, checkpoints and curves; the summary;
the phase in the progress bar; --quiet; the `plot` command over several runs."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peft_lightning.cli import main
from peft_lightning.output.run_folder import run_dir
from peft_lightning.output.summary import final_line, format_wall

from conftest import ROOT, make_image_folder

PNG = b"\x89PNG\r\n\x1a\n"


def fit(root: Path, folder: Path, *extra: str) -> str:
    """`fit --recipe vit_cifar` on a tiny random ViT in this process; returns what it printed."""
    args = [
        "fit",
        "--recipe",
        "vit_cifar",
        "--model.model_name",
        "test_vit",
        "--model.pretrained",
        "false",
        "--model.num_classes",
        "3",
        "--model.lr",
        "1e-3",
        "--data.dataset",
        str(folder),
        "--data.image_size",
        "160",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "8",
        "--data.val_fraction",
        "0.25",
        "--trainer.precision",
        "32-true",
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of the same recipe: gradual unfreezing with the progress bar, and a quiet full fine-tune
    without the final test."""
    tmp = tmp_path_factory.mktemp("runs")
    folder = make_image_folder(tmp / "imgs", splits=True, per_class=8)
    root = tmp / "out"
    gradual = fit(
        root,
        folder,
        "--finetuning.strategy",
        "gradual",  # its default options: the head alone in epoch 0, one more group each epoch from epoch 1
        "--finetuning.lr_decay",
        "0.5",
    )
    quiet = fit(root, folder, "--finetuning.strategy", "full", "--quiet", "--test_after_fit", "false")
    folders = sorted((root / "vit_cifar").iterdir())
    return {"root": root, "folders": folders, "gradual": gradual, "quiet": quiet}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_leaves_one_folder_with_config_metrics_checkpoints_and_curves(runs):
    assert len(runs["folders"]) == 2  # two runs, two folders, both under <root>/<recipe>/
    run = runs["folders"][0]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["recipe"] == "vit_cifar" and cfg["finetuning"]["strategy"] == "gradual"
    rows = read_csv(run / "metrics.csv")
    columns = set(rows[0])
    assert {"train/loss", "val/acc", "val/loss", "test/acc", "finetune/groups"} <= columns
    # The learning rates are logged per named layer group, and the unfreeze shows in finetune/groups.
    # lr-SGD/head ...: vit_cifar trains with SGD
    lrs = {c.split("/", 1)[1] for c in columns if c.startswith("lr-")}
    assert {"head", "blocks.5", "stem"} <= lrs
    groups = [float(r["finetune/groups"]) for r in rows if r["finetune/groups"]]
    assert groups == [1.0, 2.0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    curves = run / "curves.png"
    assert curves.read_bytes()[:8] == PNG and curves.stat().st_size > 10_000
    if importlib.util.find_spec("tensorboard"):
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Nothing else is scattered around: the root holds only the recipe's folder.
    assert [p.name for p in runs["root"].iterdir()] == ["vit_cifar"]


def test_best_and_last_checkpoints_land_in_the_run_folder(runs):
    names = {p.name for p in (runs["folders"][0] / "checkpoints").iterdir()}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names), names
    assert f"best checkpoint {runs['folders'][0] / 'checkpoints' / 'best-'}" in runs["gradual"]


def test_the_summary_prints_every_field_and_the_run_folder(runs):
    out, run = runs["gradual"], runs["folders"][0]
    headline = next(line for line in out.splitlines() if line.startswith("vit_cifar: test/acc"))
    assert "wall " in headline
    # The printed line is summary.final_line's, field for field (the CLI builds no copy of it).
    shown, _, rest = headline.removeprefix("vit_cifar: ").partition("  wall ")
    wall, _, checkpoint = rest.partition("  (best checkpoint ")
    minutes, seconds = wall.removesuffix("s").split("m")
    metrics = {k: float(v) for k, v in (pair.split(" ") for pair in shown.split("  "))}
    assert headline == final_line("vit_cifar", metrics, None, 60 * int(minutes) + int(seconds), checkpoint[:-1])
    for field in (
        "recipe",
        "model",
        "parameters",
        "effective batch",
        "precision",
        "strategy",
        "phase 0 (gradual)",
        "phase 1 (gradual)",
        "best validation",
        "test",
        "throughput",
        "wall time",
        "run folder",
    ):
        assert f"│ {field} " in out, field
    assert "test_vit" in out and "8 = 8 per device x 1 device x 1 node x 1 accumulated" in out
    assert "1/8 groups (head)" in out and "2/8 groups (blocks.5, head)" in out
    assert "samples/s training" in out and "32-true" in out
    assert str(run) in out
    assert "phase: 2/8 groups" in out  # the progress bar shows the fine-tuning phase


def test_quiet_run_has_no_progress_bar_but_still_a_summary(runs):
    out = runs["quiet"]
    assert "phase:" not in out and "Epoch 1" not in out and "Total params" not in out
    headline = next(line for line in out.splitlines() if line.startswith("vit_cifar: "))
    assert "best val/acc" in headline and "test/acc" not in out  # --test_after_fit false: no test
    assert "│ best validation " in out and "│ throughput " in out


def test_plot_overlays_two_runs_without_importing_torch(runs, tmp_path):
    out = tmp_path / "compare.png"
    a, b = (str(p) for p in runs["folders"])
    code = (
        "import sys, runpy; sys.argv = ['peft_lightning', 'plot', *sys.argv[1:]];"
        "runpy.run_module('peft_lightning', run_name='__main__');"
        "print('HEAVY', [m for m in ('torch', 'lightning', 'timm') if m in sys.modules])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, a, b, "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout and "HEAVY []" in res.stdout
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


def test_plot_one_run_rewrites_its_curves_and_a_parent_folder_means_all_its_runs(runs, tmp_path, cli):
    run = runs["folders"][0]
    (run / "curves.png").unlink()
    code, out, err = cli("plot", str(run))
    assert code == 0, err
    assert (run / "curves.png").read_bytes()[:8] == PNG
    code, out, err = cli("plot", str(runs["root"]), "--out", str(tmp_path / "all.png"), "--x", "epoch")
    assert code == 0, err
    assert (tmp_path / "all.png").is_file()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda tmp: tmp / "nope", "does not exist"),
        (lambda tmp: tmp, "holds no metrics.csv"),
    ],
)
def test_a_bad_run_dir_stops_with_one_line(make, needle, tmp_path, cli):
    code, out, err = cli("plot", str(make(tmp_path)))
    assert code == 2 and needle in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_plot_bad_output_name_and_missing_args_are_one_line(runs, tmp_path, cli):
    code, _, err = cli("plot", str(runs["folders"][0]), "--out", str(tmp_path / "curves.txt"))
    assert code == 2 and ".png" in err and err.strip().count("\n") == 0
    code, _, err = cli("plot")
    assert code == 2 and "RUN_DIR" in err and err.strip().count("\n") == 0


def test_wall_time_rounds_once_and_run_folders_never_collide(tmp_path):
    assert format_wall(119.7) == "2m00s"  # not "1m60s"
    assert format_wall(89.4) == "1m29s"  # not "2m29s" (rounding the minutes)
    assert format_wall(3600) == "60m00s"
    first = run_dir(tmp_path, "my_recipes:MyFlowers", now=0)
    assert first.parent.name == "my_recipes_MyFlowers"
    first.mkdir(parents=True)
    second = run_dir(tmp_path, "my_recipes:MyFlowers", now=0)
    assert second != first and second.name == f"{first.name}-2"


NOISE = (
    "Tip:",
    "litlogger",
    "Saving the dataset",
    "Flattening the indices",
    "LeafSpec",
    "not supported by the model summary",
    "smaller than the logging interval",
    "Loading `train_dataloader` to estimate",
)


def test_a_default_run_shows_no_third_party_noise_and_debug_shows_it(tmp_path, image_folder):
    from helpers import tiny_cli_args

    # As a user runs it (a fresh process: warning filters and log handlers start clean). 6 training batches,
    # fewer than the default logging interval (50): the interval follows the data instead of a warning.
    args = tiny_cli_args(
        image_folder,
        tmp_path,
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "bf16-mixed",
    )  # the model summary warns of bf16
    quiet = subprocess.run(
        [sys.executable, "-m", "peft_lightning", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    shown = quiet.stdout + quiet.stderr
    assert not [n for n in NOISE if n in shown], shown[-3000:]
    assert "global batch 4" in shown  # what the project means to show is still there
    (metrics,) = tmp_path.glob("vit_cifar/*/metrics.csv")
    assert any(row["train/loss"] for row in csv.DictReader(metrics.open()))
    debug = subprocess.run(
        [sys.executable, "-m", "peft_lightning", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PEFT_LIGHTNING_DEBUG": "1"},
    )
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert "Tip:" in debug.stderr and "not supported by the model summary" in debug.stderr


# --- quiet in every domain: transformers' loading bar and LOAD REPORT, Lightning's tips in the benchmarks ---
LOADING_NOISE = ("Loading weights", "LOAD REPORT", "MISSING")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT body without a head (as all-MiniLM-L6-v2 ships) and a letters-only WordPiece
    tokenizer, saved as ``save_pretrained`` does: a classifier built on it starts with a new head."""
    import string

    from helpers import save_tiny_bert

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_encoder"), vocab, max_position_embeddings=128)


def shown_noise(res: subprocess.CompletedProcess) -> list[str]:
    shown = res.stdout + res.stderr
    return [n for n in (*NOISE, *LOADING_NOISE) if n in shown]


def fresh_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (res.stdout + res.stderr).splitlines() if "new (randomly initialised): " in line]


def test_a_default_text_run_is_quiet_says_once_what_starts_fresh_and_debug_shows_the_load_report(
    tiny_encoder, tmp_path
):
    from helpers import forked_cli  # a fresh process, as a user's (warning filters and log handlers start clean)

    data = tmp_path / "sst2"
    data.mkdir()
    for split, n in (("train", 24), ("validation", 8)):
        rows = "".join(f"{i},{'abc' if i % 2 else 'xyz'} {'q' * (i % 5 + 1)},{i % 2}\n" for i in range(n))
        (data / f"{split}.csv").write_text("idx,sentence,label\n" + rows)
    args = [
        "fit",
        "--recipe",
        "bert_sst2",
        "--model.model_name",
        str(tiny_encoder),
        "--data.dataset",
        str(data),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "8",
        "--data.val_fraction",
        "0.25",
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--test_after_fit",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
    ]
    quiet = forked_cli(args)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not shown_noise(quiet), (quiet.stdout + quiet.stderr)[-3000:]
    # The checkpoint holds no classifier: the project says so, once, in its own words.
    assert [line.split("new (randomly initialised): ")[1] for line in fresh_lines(quiet)] == ["model.classifier"]
    debug = forked_cli([*args, "--debug", "true"])
    assert debug.returncode == 0, debug.stderr[-3000:]
    assert "LOAD REPORT" in debug.stderr and "classifier.weight" in debug.stderr and "MISSING" in debug.stderr


def test_a_default_recommendation_run_is_quiet_and_says_once_what_starts_fresh(tiny_encoder, tmp_path):
    from test_recsys import write_ml100k_format

    from helpers import forked_cli

    data = write_ml100k_format(tmp_path / "ml")  # 30 users, 40 items
    res = forked_cli(
        [
            "fit",
            "--recipe",
            "twotower_movielens",
            "--model.text_encoder",
            str(tiny_encoder),
            "--model.num_users",
            "30",
            "--model.num_items",
            "40",
            "--model.dim",
            "8",
            "--data.dataset",
            str(data),
            "--data.split",
            "stratified",
            "--data.val_fraction",
            "0.2",
            "--data.batch_size",
            "32",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not shown_noise(res), (res.stdout + res.stderr)[-3000:]
    (line,) = fresh_lines(res)
    fresh = set(line.split("new (randomly initialised): ")[1].split(", "))
    # The text encoder is pretrained; the ID embeddings, biases and the projection of its features are not.
    assert fresh == {"user_embedding", "item_bias", "item_embedding", "item_text.projection", "history_projection"}


@pytest.mark.slow
def test_a_benchmarks_in_process_fits_are_quiet(tmp_path):
    from peft_lightning.registry import get_recipe

    ok, why = get_recipe("effnet_fashion").availability()
    if not ok:
        pytest.skip(why)
    # `adapters --smoke`: three Lightning fits built in the runner's process (tests/test_benchmarks.py runs it too).
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "adapters", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not shown_noise(res), (res.stdout + res.stderr)[-3000:]
    assert (tmp_path / "adapters_smoke.json").is_file()


def test_each_domain_names_the_modules_that_start_fresh_and_the_line_stays_short(tmp_path):
    import torch

    from peft_lightning.output.summary import fresh_line
    from peft_lightning.tasks.recsys import Recommender
    from peft_lightning.tasks.text import new_modules
    from peft_lightning.tasks.vision import ImageClassifier

    scratch = ImageClassifier("test_vit", num_classes=5, pretrained=False)
    assert fresh_line(scratch) == "new (randomly initialised): model"  # no pretrained weights: all of it
    torch.save(scratch.model.state_dict(), tmp_path / "w.pth")
    weights = {"pretrained": False, "checkpoint_path": str(tmp_path / "w.pth")}
    assert ImageClassifier("test_vit", num_classes=3, **weights).fresh_modules() == ["model.head"]  # re-created
    assert ImageClassifier("test_vit", num_classes=5, **weights).fresh_modules() == []  # the file's head fits
    mf = Recommender("mf", num_users=5, num_items=7, dim=4)
    assert fresh_line(mf) == "new (randomly initialised): user_embedding, item_bias, item_embedding"
    torch.save(mf.state_dict(), tmp_path / "mf.pt")
    assert Recommender("mf", num_users=5, num_items=7, dim=4, init_from=str(tmp_path / "mf.pt")).fresh_modules() == []
    # What transformers reports as missing, as modules: the outermost ones wholly missing, one name for a model
    # of which nothing loaded.
    body = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    assert new_modules(body, {"1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"}) == ["1"]
    assert new_modules(body, {"1.0.weight", "1.0.bias", "1.1.weight"}) == ["1.0"]
    assert new_modules(body, {n for n, _ in body.named_parameters()}) == [""]

    class Many(torch.nn.Module):
        def fresh_modules(self) -> list[str]:
            return list("abcdefgh")

    assert fresh_line(Many()) == "new (randomly initialised): a, b, c, d, e, f and 2 more"
    assert fresh_line(torch.nn.Linear(1, 1)) == ""  # a model that cannot say says nothing
