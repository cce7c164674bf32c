"""Bad input, answered clearly: every case ends with one ``error:`` line saying what was wrong and what to do, a
non-zero exit code (2 for a usage error), no traceback (``--debug`` or ``PEFT_LIGHTNING_DEBUG=1`` shows it), and
nothing already saved is overwritten or lost. Run in-process (fast); three through a real subprocess."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_image_folder, run_cli
from helpers import tiny_cli_args

TESTS = Path(__file__).resolve().parent


class Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do (run code on load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    import datasets
    from PIL import Image

    base = tmp_path_factory.mktemp("bad_input")
    paths: dict[str, Path] = {"base": base, "marker": base / "PWNED"}
    paths["images"] = make_image_folder(base / "images", classes=3, per_class=6, size=32)
    # Something already saved: a previous run's checkpoint, which no failing command may touch.
    old = base / "runs" / "vit_cifar" / "20260101-000000" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, old)
    paths["root"], paths["old"] = base / "runs", old

    for kind in ("corrupt", "truncated"):
        folder = make_image_folder(base / f"{kind}_images", classes=3, per_class=6, size=32)
        victim = folder / "class_1" / "3.png"
        data = victim.read_bytes()
        victim.write_bytes(b"this is not a png" * 10 if kind == "corrupt" else data[: len(data) // 2])
        paths[f"{kind}_images"] = folder
    rng = np.random.default_rng(0)
    pngs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    paths["no_label"] = base / "no_label"
    datasets.Dataset.from_dict({"image": pngs, "caption": ["x"] * 12}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(paths["no_label"]))
    paths["pixels"] = base / "pixels.parquet"  # Fashion-MNIST as flat pixel lists: no column holds images
    datasets.Dataset.from_dict({"pixels": [[0] * 784] * 12, "label": [0, 1, 2] * 4}).to_parquet(str(paths["pixels"]))
    paths["no_image"] = base / "no_image"
    datasets.Dataset.from_dict({"text": ["a"] * 12, "label": [0, 1, 2] * 4}).save_to_disk(str(paths["no_image"]))
    labelled = (
        datasets.Dataset.from_dict({"image": pngs, "label": [0, 1, 2] * 4})
        .cast_column("image", datasets.Image())
        .cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    )
    paths["empty_split"] = base / "empty_split"
    datasets.DatasetDict({"train": labelled, "validation": labelled, "test": labelled.select([])}).save_to_disk(
        str(paths["empty_split"])
    )

    (base / "garbage.ckpt").write_bytes(os.urandom(4096))
    real = base / "real.ckpt"
    torch.save({"state_dict": {"model.w": torch.randn(1000)}, "hyper_parameters": {"lr": 0.1}}, real)
    (base / "truncated.ckpt").write_bytes(real.read_bytes()[:2000])
    torch.save({"model.w": torch.randn(3)}, base / "plain_state_dict.pt")
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"model_name": "test_efficientnet", "pretrained": False, "num_classes": 3},
        },
        base / "vision.ckpt",
    )
    for name in ("payload.ckpt", "payload.pth"):
        with open(base / name, "wb") as f:
            pickle.dump({"state_dict": {}, "x": Payload(paths["marker"])}, f)
    import timm

    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), base / "vit_weights.pth")
    (base / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (base / "bad.yaml").write_text("recipe: vit_cifar\nmodel: [unclosed\n")
    return paths


# Read every image, wherever the bad one landed (tiny() reads 2 training batches and 1 validation batch).
EVERY_BATCH = ("--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0", "--test_after_fit", "true")


def tiny(env: dict[str, Path], *extra: str, dataset: Path | None = None, recipe: str = "vit_cifar") -> list[str]:
    # One epoch of two training batches and one validation batch.
    return tiny_cli_args(
        dataset or env["images"],
        env["root"],
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        *extra,
        recipe=recipe,
    )


# (case id, argv builder, what the error line must say). Exit code 2 throughout: all of these are the user's to fix.
CASES = [
    # --- command line and recipes ---
    ("unknown recipe", lambda e: ["fit", "--recipe", "vit_cifr"], "did you mean vit_cifar"),
    (
        "unimportable user recipe",
        lambda e: ["fit", "--recipe", "no_such_pkg.mod:Thing"],
        "cannot import recipe",
    ),
    ("unknown command", lambda e: ["fitt", "--recipe", "vit_cifar"], "unknown command 'fitt'"),
    ("no recipe", lambda e: ["fit"], "no recipe given"),
    ("unknown flag", lambda e: tiny(e, "--model.nope", "3"), "unrecognized arguments: --model.nope"),
    ("wrong type", lambda e: tiny(e, "--model.lr", "fast"), "model.lr"),
    ("negative learning rate", lambda e: tiny(e, "--model.lr", "-1"), "lr must be > 0"),
    (
        "unknown model",
        lambda e: tiny(e, "--model.model_name", "no_such_net"),
        "unknown timm model 'no_such_net'",
    ),
    ("bad strategy name", lambda e: tiny(e, "--finetuning.strategy", "sometimes"), "finetuning.strategy"),
    (
        "unfreeze nothing",
        lambda e: tiny(e, "--finetuning.strategy", "FreezeUnfreeze", "--finetuning.strategy.groups", "0"),
        "groups must be >= 1",
    ),
    (
        "negative save interval",
        lambda e: tiny(e, "--checkpoint.last_every_n_train_steps", "-1"),
        "last_every_n_train_steps",
    ),
    (
        "config file missing",
        lambda e: ["fit", "--recipe", "vit_cifar", "-c", str(e["base"] / "nope.yaml")],
        "nope.yaml",
    ),
    ("config file unparsable", lambda e: ["fit", "-c", str(e["base"] / "bad.yaml")], "cannot parse config"),
    # --- data ---
    ("batch size 0", lambda e: tiny(e, "--data.batch_size", "0"), "batch_size must be >= 1"),
    ("val fraction too big", lambda e: tiny(e, "--data.val_fraction", "0.7"), "val_fraction must be in"),
    ("negative workers", lambda e: tiny(e, "--data.num_workers", "-1"), "num_workers must be >= 0"),
    (
        "num_classes not the data's",
        lambda e: tiny(e, "--model.num_classes", "5"),
        "the data has 3 classes but the model was built for 5: pass --model.num_classes 3",
    ),
    ("missing dataset path", lambda e: tiny(e, dataset=e["base"] / "no_such_folder"), "does not exist"),
    ("label column named wrong", lambda e: tiny(e, "--data.label_column", "nope"), "no label column nope"),
    ("dataset without labels", lambda e: tiny(e, dataset=e["no_label"]), "no label column"),
    ("dataset without images", lambda e: tiny(e, dataset=e["no_image"]), "no image column"),
    (
        "images as pixel lists",
        lambda e: tiny(e, dataset=e["pixels"]),
        "no image column (columns: pixels (list of int64), label (int64); an image column holds images",
    ),
    ("empty split", lambda e: tiny(e, dataset=e["empty_split"]), "split 'test' is empty"),
    ("corrupt image", lambda e: tiny(e, *EVERY_BATCH, dataset=e["corrupt_images"]), "cannot read image"),
    ("truncated image", lambda e: tiny(e, *EVERY_BATCH, dataset=e["truncated_images"]), "cannot read image"),
    # --- adapters ---
    ("unknown adapter method", lambda e: tiny(e, "--peft.method", "lorra"), "peft.method"),
    ("adapter rank 0", lambda e: tiny(e, "--peft.method", "lora", "--peft.r", "0"), "--peft.r must be >= 1"),
    (
        "adapter targets match nothing",
        lambda e: tiny(e, "--peft.method", "lora", "--peft.target_modules", "[nomatch]"),
        "'nomatch' matches no module",
    ),
    # --- the machine ---
    # (16-mixed and bf16 run on a CPU; transformer-engine's FP8 needs a package that is not installed)
    ("precision impossible here", lambda e: tiny(e, "--trainer.precision", "transformer-engine"), "transformer_engine"),
    ("precision unknown", lambda e: tiny(e, "--trainer.precision", "7-bit"), "precision"),
    (
        "accelerator not here",
        lambda e: tiny(e, "--trainer.accelerator", "cuda", "--trainer.devices", "8"),
        "cuda",
    ),
    ("strategy impossible here", lambda e: tiny(e, "--trainer.strategy", "deepspeed"), "deepspeed"),
    (
        "accumulate 0 batches",
        lambda e: tiny(e, "--trainer.accumulate_grad_batches", "0"),
        "accumulate_grad_batches",
    ),
    # --- checkpoints ---
    ("checkpoint missing", lambda e: tiny(e, "--ckpt_path", str(e["base"] / "nope.ckpt")), "does not exist"),
    (
        "checkpoint corrupt",
        lambda e: tiny(e, "--ckpt_path", str(e["base"] / "garbage.ckpt")),
        "cannot read checkpoint",
    ),
    (
        "checkpoint truncated",
        lambda e: tiny(e, "--ckpt_path", str(e["base"] / "truncated.ckpt")),
        "cannot read checkpoint",
    ),
    (
        "plain weights as a checkpoint",
        lambda e: tiny(e, "--ckpt_path", str(e["base"] / "plain_state_dict.pt")),
        "not a Lightning checkpoint",
    ),
    (
        "hostile checkpoint",
        lambda e: tiny(e, "--ckpt_path", str(e["base"] / "payload.ckpt")),
        "safe loading (weights_only=True) refuses",
    ),
    (
        "checkpoint of another recipe",
        lambda e: ["fit", "--recipe", "bpr_movielens", "--ckpt_path", str(e["base"] / "vision.ckpt")],
        "was not written by recipe",
    ),
    (
        "weights missing",
        lambda e: tiny(e, "--model.checkpoint_path", str(e["base"] / "nope.pth")),
        "does not exist",
    ),
    (
        "weights corrupt",
        lambda e: tiny(e, "--model.checkpoint_path", str(e["base"] / "garbage.safetensors")),
        "cannot read weights",
    ),
    (
        "weights of another architecture",
        lambda e: tiny(e, "--model.checkpoint_path", str(e["base"] / "vit_weights.pth")),
        "is it a checkpoint of another architecture",
    ),
    (
        "hostile weights",
        lambda e: tiny(e, "--model.checkpoint_path", str(e["base"] / "payload.pth")),
        "cannot read weights",
    ),
    # --- training ---
    (
        "NaN loss",
        lambda e: tiny(e, "--model.nan_at_step", "1", recipe="reliability_callbacks:NanAt"),
        "the training loss is nan at epoch 0, step 1",
    ),
]


@pytest.fixture(autouse=True)
def lightning_logs_to_this_tests_stderr():
    """Lightning's log handlers keep the stderr of the test that first imported Lightning (a closed capture by
    now): logging to it prints a '--- Logging error --- Traceback' that is the harness's, not the CLI's."""
    import logging
    import sys

    named = (v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))
    for logger in (logging.getLogger(), *named):  # lightning, transformers, torchmetrics ... each has a handler
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not sys.stdout:
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream
    yield


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "lock" not in p.name
    }


def test_the_table_covers_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(name, argv, needle, env, cli):
    inputs = digest(env["base"])
    before = {p for p in env["root"].rglob("*.ckpt")}
    code, _, err = cli(*argv(env))
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, (code, err[-3000:])
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    assert needle in errors[0], errors[0]
    assert not env["marker"].exists()  # no code from a hostile file ran
    after = digest(env["base"])
    assert {k: v for k, v in after.items() if k in inputs} == inputs  # nothing saved or given was changed
    assert all(p in before or "runs/vit_cifar/2026010" not in str(p) for p in env["root"].rglob("*.ckpt"))


# (recipe, flag, value, the error line). Each module checks its numeric options when it is built: before this, a
# bad image size failed in a DataLoader worker ("Caught ValueError in DataLoader worker process 0", exit 1).
DATA_OPTIONS = [
    ("vision", "image_size", "-1", "data.image_size must be >= 1, got -1"),
    ("vision", "eval_batch_size", "0", "data.eval_batch_size must be >= 1, got 0"),
    ("vision", "val_fraction", "0", "data.val_fraction must be in (0, 0.5), got 0.0"),
    ("vision", "max_train_samples", "0", "data.max_train_samples must be >= 1, got 0"),
    ("vision", "max_val_samples", "-5", "data.max_val_samples must be >= 1, got -5"),
    ("vision", "crop_pct", "0", "data.crop_pct must be in (0, 1], got 0.0"),
    ("vision", "train_crop_scale", "[0.5, 0.1]", "data.train_crop_scale must be a (min, max) pair in (0, 1]"),
    ("vision", "train_crop_ratio", "[0, 1]", "data.train_crop_ratio must be a (min, max) pair in (0, inf)"),
    ("vision", "hflip", "1.5", "data.hflip must be in [0, 1], got 1.5"),
    ("vision", "seed", "-1", "data.seed must be >= 0, got -1"),
    ("text", "max_length", "2", "data.max_length must be >= 4, got 2"),
    ("text", "max_test_samples", "0", "data.max_test_samples must be >= 1, got 0"),
    ("recsys", "train_ratio", "1.5", "data.train_ratio must be in (0, 1), got 1.5"),
    ("recsys", "time_cut", "0", "data.time_cut must be in (0, 1), got 0.0"),
    ("recsys", "num_negatives", "-1", "data.num_negatives must be >= 0, got -1"),
    ("recsys", "eval_batch_size", "0", "data.eval_batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("domain, option, value, line", DATA_OPTIONS, ids=[f"{d}-{o}" for d, o, *_ in DATA_OPTIONS])
def test_bad_data_options_stop_at_construction_with_one_line(domain, option, value, line, env, cli):
    flag = (f"--data.{option}", value)
    argv = {
        "vision": lambda: tiny(env, *flag),
        "text": lambda: ["fit", "--recipe", "minilm_austen", *flag],
        "recsys": lambda: ["fit", "--recipe", "bpr_movielens", *flag],
    }[domain]()
    code, _, err = cli(*argv)
    errors = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2, (code, err[-3000:])
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith(f"error: {line}"), errors[0]


def test_debug_shows_the_traceback(env, cli):
    with pytest.raises(Exception, match="batch_size must be >= 1"):
        cli(*tiny(env, "--data.batch_size", "0", "--debug", "true"))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (lambda e: tiny(e, "--model.nope", "3"), "unrecognized arguments"),
        (lambda e: tiny(e, "--data.num_workers", "1", *EVERY_BATCH, dataset=e["corrupt_images"]), "cannot read image"),
        (lambda e: tiny(e, "--ckpt_path", str(e["base"] / "payload.ckpt")), "refuses"),
    ],
    ids=["flag", "corrupt image in a worker", "hostile checkpoint"],
)
def test_bad_input_in_a_real_process(argv, needle, env):
    res = run_cli(*argv(env), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and needle in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and not env["marker"].exists()
    debug = run_cli(*argv(env), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "PEFT_LIGHTNING_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_mixed_image_modes_are_converted_not_refused(tmp_path, env, cli):
    from PIL import Image

    folder = make_image_folder(tmp_path / "modes", classes=3, per_class=6, size=32)
    rgb = [p for p in sorted(folder.rglob("*.png")) if Image.open(p).mode == "RGB"]
    # grey, grey+alpha, palette, RGBA, 1-bit, 16-bit grey (PNG) and CMYK (JPEG): one training batch holds several
    for path, mode in zip(rgb, ("LA", "P", "RGBA", "1", "I;16", "CMYK", "L")):
        image = Image.open(path).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 256)
        path.unlink()
        image.save(path.with_suffix(".jpg" if mode == "CMYK" else ".png"))
    code, _, err = cli(*tiny(env, "--trainer.default_root_dir", str(tmp_path / "run"), dataset=folder))
    assert code == 0, err[-3000:]


def test_hostile_files_run_no_code_anywhere(env):
    """Every loader of files a user passes in: refused, and the payload never ran."""
    from peft_lightning.errors import UsageError
    from peft_lightning.model_files.checkpoints import read_checkpoint
    from peft_lightning.model_files.export import load_task
    from peft_lightning.tasks.vision import load_state_dict
    from recipes.vit_cifar import VitCifar

    for load in (read_checkpoint, load_state_dict, lambda p: load_task(VitCifar, p)):
        with pytest.raises(UsageError):
            load(env["base"] / "payload.ckpt")
    assert not env["marker"].exists()
    with pytest.raises(pickle.UnpicklingError):  # the default of this torch: weights_only=True
        torch.load(env["base"] / "payload.ckpt")
    assert not env["marker"].exists()
