"""The command line as a user meets it: help, list, unknown recipes, configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from peft_lightning.registry import builtin_names, get_recipe, recipe_cards

from conftest import ROOT, run_cli


def test_help_and_import_do_not_load_heavy_libraries():
    code = (
        "import sys, runpy; sys.argv=['peft_lightning','--help'];"
        "import peft_lightning; runpy.run_module('peft_lightning', run_name='__main__');"
        "heavy=[m for m in ('timm','transformers','datasets') if m in sys.modules]; print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "HEAVY []" in out


def test_list_shows_recipes_with_domain_and_availability_without_importing_torch():
    code = (
        "import sys, runpy; sys.argv=['peft_lightning','list'];"
        "runpy.run_module('peft_lightning', run_name='__main__');"
        "print('HEAVY', [m for m in ('torch', 'lightning', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out  # torch alone takes ~2 s to import (benchmarks: `startup`)
    for name in ("effnet_fashion", "vit_cifar"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "vision" in line and ("yes" in line or "no" in line)


@pytest.mark.parametrize("name", builtin_names())
def test_list_reads_each_recipe_card_as_the_class_has_it(name):
    # `list` reads the recipes' source; the imported classes are the truth it must match.
    card = next(c for c in recipe_cards() if c.name == name)
    recipe = get_recipe(name)
    assert (card.domain, card.description, card.assets) == (recipe.domain, recipe.description, recipe.assets)
    assert card.domain in ("vision", "text", "recsys") and card.description
    assert card.availability() == recipe.availability()


def test_availability_names_what_is_missing_and_how_to_get_it(monkeypatch):
    from peft_lightning import assets

    monkeypatch.setattr(assets, "FASHION_MNIST_DIR", "/nonexistent")
    ok, why = assets.check(("fashion_mnist", "hub-model:org/never-cached"))
    assert not ok and "apt-get install dataset-fashion-mnist" in why and "org/never-cached" in why
    assert assets.check(()) == (True, "no local assets needed")
    with pytest.raises(KeyError, match="unknown asset"):
        assets.check(("cifar11",))


def test_unknown_recipe_is_one_line_and_exit_2():
    res = run_cli("fit", "--recipe", "effnet_fashon")  # as a user runs it: a fresh process
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "did you mean effnet_fashion" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_recipe_without_close_match_lists_the_known_ones(cli):
    code, _, err = cli("fit", "--recipe", "nope")
    assert code == 2 and "known recipes" in err and "vit_cifar" in err


def test_missing_recipe_and_unknown_command(cli):
    assert cli("fit")[0] == 2
    code, _, err = cli("frobnicate")
    assert code == 2 and "unknown command" in err


@pytest.mark.parametrize("name", builtin_names())
def test_every_recipe_prints_a_complete_config_that_parses_back(name, tmp_path, cli):
    code, out, err = cli("fit", "--recipe", name, "--print_config")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["recipe"] == name
    for section in ("trainer", "model", "data", "finetuning", "checkpoint"):
        assert cfg[section], section
    assert cfg["model"]["model_name"] and cfg["data"]["batch_size"] >= 1
    # The printed config is a valid `-c` file: it round-trips, and `recipe` inside it picks the recipe.
    path = tmp_path / "run.yaml"
    path.write_text(out)
    code, again, err = cli("fit", "-c", str(path), "--print_config")
    assert code == 0, err
    assert yaml.safe_load(again) == cfg


def test_overrides_from_cli_and_yaml(tmp_path, cli):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: effnet_fashion\nmodel:\n  lr: 0.0005\ndata:\n  batch_size: 16\n")
    code, out, err = cli(
        "fit", "-c", str(path), "--trainer.max_epochs", "7", "--finetuning.strategy", "gradual", "--print_config"
    )
    cfg = yaml.safe_load(out)
    assert cfg["model"]["lr"] == 0.0005 and cfg["data"]["batch_size"] == 16
    assert cfg["trainer"]["max_epochs"] == 7 and cfg["finetuning"]["strategy"] == "gradual"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.lr", "fast"], "model.lr"),
        (["--model.nope", "3"], "unrecognized arguments: --model.nope"),
        (["--finetuning.strategy", "sometimes"], "finetuning.strategy"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(args, needle, cli):
    code, _, err = cli("fit", "--recipe", "effnet_fashion", *args)
    assert code == 2 and needle in err
    assert err.strip().count("\n") == 0 and "usage:" not in err


def test_the_command_line_reference_is_current():
    """docs/cli.md is generated from every command's --help: a changed flag or help text without a rerun of
    scripts/cli_reference.py fails here."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
