"""Recipes run through the CLI the way a user runs them, on real offline assets and on a local image folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipes.effnet_fashion import EffnetFashion

from conftest import ROOT, make_image_folder, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not EffnetFashion.availability()[0], reason="offline assets missing: run scripts/setup.sh")
def test_effnet_fashion_small_budget(tmp_path):
    res = run_cli(
        "fit",
        "--recipe",
        "effnet_fashion",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "6",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--data.max_train_samples",
        "600",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = [line for line in res.stdout.splitlines() if line.startswith("effnet_fashion: test/acc")]
    assert summary, res.stdout[-2000:]
    acc = float(summary[0].split("test/acc ")[1].split()[0])
    assert acc > 0.3  # real ImageNet features: well above chance (0.1) after 6 head steps + 6 top-block steps
    ckpts = {p.name for p in tmp_path.rglob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list(tmp_path.rglob("config.yaml"))


def vit_args(folder: Path, root: Path) -> list[str]:
    return [
        "--model.model_name",
        "test_vit",
        "--model.pretrained",
        "false",
        "--model.optimizer",
        "adamw",
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
        "1",
        "--trainer.default_root_dir",
        str(root),
    ]


def test_vit_cifar_recipe_on_a_tiny_vit_and_local_folder(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", splits=True, per_class=8)
    res = run_cli("fit", "--recipe", "vit_cifar", *vit_args(folder, tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vit_cifar: test/acc" in res.stdout
    last = next((tmp_path / "run").rglob("last.ckpt"))
    # The checkpoint feeds the other subcommands.
    res = run_cli("test", "--recipe", "vit_cifar", *vit_args(folder, tmp_path / "run2"), "--ckpt_path", str(last))
    assert res.returncode == 0, res.stderr[-3000:]


def test_subclassed_recipe_from_a_user_module(tmp_path):
    folder = make_image_folder(tmp_path / "flowers", classes=4, per_class=6)
    (tmp_path / "my_recipes.py").write_text(
        textwrap.dedent(f"""
        from recipes.vit_cifar import VitCifar

        class MyFlowers(VitCifar):
            description = "flowers from a local folder"
            data_defaults = {{**VitCifar.data_defaults, "dataset": {str(folder)!r}, "val_fraction": 0.2}}

            def __init__(self, num_classes: int = 4, **kwargs):
                super().__init__(num_classes=num_classes, **kwargs)
    """)
    )
    args = [a for a in vit_args(folder, tmp_path / "run") if a != str(folder)]
    args.remove("--data.dataset")
    i = args.index("--model.num_classes")
    del args[i : i + 2]
    res = run_cli("fit", "--recipe", "my_recipes:MyFlowers", *args, env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "my_recipes:MyFlowers: test/acc" in res.stdout


def test_vit_cifar_offline_says_what_it_tried(tmp_path):
    res = run_cli(
        "fit",
        "--recipe",
        "vit_cifar",
        "--trainer.default_root_dir",
        str(tmp_path),
        env={"HF_HOME": str(tmp_path / "empty_cache")},
    )
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]  # Lightning's own info lines ("Seed set to 42") come before it
    assert last.startswith("error: ") and "--model.checkpoint_path" in last and "Traceback" not in res.stderr


def test_non_editable_install_ships_recipes(tmp_path):
    """`pip install .` (not editable) puts peft_lightning and recipes in site-packages; run from elsewhere."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import peft_lightning, recipes; from peft_lightning.registry import builtin_names; "
        "print(peft_lightning.__file__, recipes.__file__, builtin_names())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.count(str(target)) == 2 and "effnet_fashion" in out and "vit_cifar" in out
    res = subprocess.run(
        [sys.executable, "-m", "peft_lightning", "list"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and "effnet_fashion" in res.stdout
