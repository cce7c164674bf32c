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
    assert card.domain in ("vision", "text", "recsys", "token", "detection") and card.description
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


# --- the CLI's parts, one by one ---
@pytest.mark.parametrize("name", builtin_names())
def test_a_recipes_model_defaults_are_what_print_config_and_python_both_use(name, cli):
    """One road for a model default: ``model_defaults`` is what the CLI shows and what the class fills in when built
    in Python, where the saved hyperparameters hold it (a checkpoint reloads with the recipe's values)."""
    import inspect

    recipe = get_recipe(name)
    assert recipe.model_defaults and "__init__" in vars(recipe)  # the recipe's __init__ is the one that fills them in
    code, out, err = cli("fit", "--recipe", name, "--print_config")
    assert code == 0, err
    model = yaml.safe_load(out)["model"]
    assert {k: model[k] for k in recipe.model_defaults} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in recipe.model_defaults.items()
    }
    assert list(inspect.signature(recipe.__init__).parameters) == ["self", "kwargs"]


def test_a_recipe_built_in_python_records_its_model_defaults():
    from recipes.vit_cifar import VitCifar

    model = VitCifar(model_name="test_vit", pretrained=False)
    assert {k: model.hparams[k] for k in VitCifar.model_defaults} == {
        **VitCifar.model_defaults,
        "model_name": "test_vit",
    }
    assert (model.optimizer_name, model.lr, model.warmup) == ("sgd", 0.01, 0.05)


def test_a_subclass_with_its_own_init_keeps_its_defaults_and_its_arguments():
    from recipes.vit_cifar import VitCifar

    class MyFlowers(VitCifar):
        def __init__(self, num_classes: int = 4, extra: int = 7, **kwargs):
            super().__init__(num_classes=num_classes, **kwargs)

    class Smaller(MyFlowers):
        model_defaults = {**MyFlowers.model_defaults, "lr": 0.02}

    # The default it gives an inherited argument replaces the recipe's in model_defaults (what the CLI shows) ...
    assert MyFlowers.model_defaults == {**VitCifar.model_defaults, "num_classes": 4}
    model = Smaller(model_name="test_vit", pretrained=False)
    # ... and save_hyperparameters walks through the generated __init__ to the subclass's own arguments.
    assert (model.hparams["num_classes"], model.hparams["extra"], model.hparams["lr"]) == (4, 7, 0.02)
    assert model.hparams["optimizer"] == "sgd" and model.num_classes == 4


def test_a_class_cannot_set_model_defaults_and_write_init():
    from recipes.vit_cifar import VitCifar

    with pytest.raises(TypeError, match="both model_defaults and __init__"):

        class Both(VitCifar):  # noqa: F841
            model_defaults = {"lr": 0.1}

            def __init__(self, **kwargs):
                super().__init__(**kwargs)


def test_recipe_defaults_are_the_parser_defaults_by_flag():
    from peft_lightning.cli.lightning_cli import recipe_defaults
    from recipes.effnet_fashion import EffnetFashion

    defaults = recipe_defaults(EffnetFashion)
    assert defaults["model.scheduler"] == "onecycle" and defaults["data.image_size"] == 48
    strategy = {
        "class_path": "peft_lightning.callbacks.strategies.FreezeUnfreeze",
        "init_args": {"at_epoch": 0, "groups": 3},
    }
    assert defaults["finetuning.strategy"] == strategy and defaults["checkpoint.monitor"] == "val/acc"


def test_errors_become_one_line_and_an_exit_status_by_class():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from peft_lightning.cli import one_line
    from peft_lightning.errors import UsageError

    assert one_line(UsageError("no recipe given")) == ("no recipe given", 2)
    message, code = one_line(MisconfigurationException("`devices=4`\nbut only 1 found"))
    assert code == 2 and message.startswith("`devices=4` but only 1 found (see --trainer.*")
    assert one_line(ModuleNotFoundError("No module named 'transformer_engine'"))[1] == 2
    message, code = one_line(RuntimeError("boom\nsecond line"))
    assert code == 1 and message == "RuntimeError: boom (set PEFT_LIGHTNING_DEBUG=1 for the traceback)"
    # A class the user named (--trainer.logger MLFlowLogger) that raised in __init__: its own reason, not the Union's.
    union = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
        "  - The filesystem tracking backend is in maintenance mode\n  - Not a valid bool\nGiven value type: <class 'dict'>"
    )
    assert one_line(union) == (
        "a class given on the command line could not be built: The filesystem tracking backend is in maintenance mode",
        2,
    )


def test_recipe_arg_reads_the_flag_or_the_config_file(tmp_path):
    from peft_lightning.cli import recipe_arg
    from peft_lightning.errors import UsageError

    assert recipe_arg(["fit", "--recipe=vit_cifar"]) == "vit_cifar"
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  recipe: bert_sst2\n")
    assert recipe_arg(["fit", "-c", str(path)]) == "bert_sst2"
    assert recipe_arg(["fit"]) is None
    path.write_text("recipe: [unclosed\n")
    with pytest.raises(UsageError, match="cannot parse config"):
        recipe_arg(["fit", "--config", str(path)])


def test_the_export_and_plot_commands_stop_on_bad_flags_with_one_line():
    from peft_lightning.cli.commands import export_command, plot_command
    from peft_lightning.errors import UsageError

    with pytest.raises(UsageError, match="export: the following arguments are required: --recipe"):
        export_command(["--ckpt_path", "x.ckpt", "--out", "out"])
    with pytest.raises(UsageError, match=r"plot: .*--x"):
        plot_command(["runs/x", "--x", "time"])


def test_a_command_that_is_done_ends_main_with_status_0(monkeypatch):
    """``--finetuning.show_groups`` and a finished run raise ``Done`` (a SystemExit(0) for whoever else runs the CLI
    class); ``main`` returns quietly."""
    import peft_lightning.cli as cli_module
    from peft_lightning.cli.resume import Done

    def done(*args, **kwargs):
        raise Done

    monkeypatch.setattr(cli_module, "run", done)
    assert cli_module.main(["fit", "--recipe", "effnet_fashion"]) is None
    with pytest.raises(SystemExit) as stop:
        done()
    assert stop.value.code == 0
