"""`tune`: Optuna studies whose trials are real `fit`s of a tiny random EfficientNet (about a second each)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import peft_lightning
from peft_lightning.output.plots import find_runs
from peft_lightning.registry import builtin_names
from peft_lightning.tuning import counted, load_space

from conftest import ROOT
from helpers import tiny_cli_args

# Two optimizer steps and one validation batch per trial: what is tested is the search, not the training.
BUDGET = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--quiet",
]
LR_ONLY = {
    "model.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    "model.weight_decay": None,
    "model.warmup": None,
}


def fit_flags(images: Path, root: Path, *extra: str) -> list[str]:
    """The tiny fit's flags, without the `fit` command."""
    return [*tiny_cli_args(images, root)[1:], *BUDGET, *extra]


def sqlite(root: Path, study: str) -> str:
    return f"sqlite:///{root / 'vit_cifar' / f'tune-{study}' / 'study.db'}"


def worker(*args: str) -> subprocess.Popen:
    """`python -m peft_lightning ARGS` in its own process, as a user (or a cluster job) starts it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "peft_lightning", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_study_runs_fits_scores_validation_and_writes_a_best_yaml_that_fit_reruns(image_folder, tmp_path, cli):
    space = tmp_path / "space.yaml"
    space.write_text(
        "model.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n"
        "finetuning.strategy: {type: categorical, choices: [full, head]}\n"
        "model.weight_decay: null\nmodel.warmup: null\n"
    )
    code, out, err = cli(
        "tune", *fit_flags(image_folder, tmp_path), "--n_trials", "3", "--space", str(space), "--study", "s"
    )
    assert code == 0, err
    folder = tmp_path / "vit_cifar" / "tune-s"
    study = optuna.load_study(study_name="s", storage=sqlite(tmp_path, "s"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        run = Path(trial.user_attrs["run_dir"])
        assert run == folder / f"trial-{trial.number:03d}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        # A real fit with the sampled values as flags, never tested: scored on its best validation accuracy.
        assert config["model"]["lr"] == pytest.approx(trial.params["model.lr"])
        assert config["finetuning"]["strategy"] == trial.params["finetuning.strategy"]
        assert config["test_after_fit"] is False
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert not any(k.startswith("test/") for k in rows[0])
        assert trial.value == pytest.approx(max(float(r["val/acc"]) for r in rows if r.get("val/acc")))
    assert (folder / "history.png").is_file() and (folder / "importance.png").is_file()
    assert "complete" in out and f"best trial {study.best_trial.number}" in out
    # best.yaml is the best trial's config for a plain fit: its values, tested after fit, in the user's root.
    code, printed, err = cli("fit", "-c", str(folder / "best.yaml"), "--print_config")
    assert code == 0, err
    best = yaml.safe_load(printed)
    assert best["model"]["lr"] == pytest.approx(study.best_params["model.lr"])
    assert best["finetuning"]["strategy"] == study.best_params["finetuning.strategy"]
    assert best["test_after_fit"] is True and best["trainer"]["default_root_dir"] == str(tmp_path)
    # `plot STUDY_FOLDER` finds every trial's run (and overlays them).
    assert find_runs([folder]) == [folder / f"trial-{n:03d}" for n in range(3)]


def test_failed_trials_keep_their_reason_and_the_study_goes_on_and_a_pruned_trial_stops(image_folder, tmp_path):
    flags = fit_flags(image_folder, tmp_path)
    # A learning rate of 1e30 makes the loss NaN at the second step: each trial fails with the reason, none stops
    # the study.
    study = peft_lightning.tune(
        "vit_cifar",
        2,
        study="nan",
        args=flags,
        plots=False,
        space={**LR_ONLY, "model.lr": {"type": "categorical", "choices": [1e30]}},
    )
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert all("training loss is nan" in t.user_attrs["reason"] for t in study.trials)
    # A pruner that rejects every value stops a 3-epoch trial at its first validation.
    study = peft_lightning.tune(
        "vit_cifar",
        1,
        study="pruned",
        space=LR_ONLY,
        plots=False,
        pruner=optuna.pruners.ThresholdPruner(lower=2.0),
        args=[*flags, "--trainer.max_epochs", "3"],
    )
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and trial.last_step == 0 and "epoch 0" in trial.user_attrs["reason"]
    rows = list(csv.DictReader((Path(trial.user_attrs["run_dir"]) / "metrics.csv").open()))
    assert {float(r["epoch"]) for r in rows if r["epoch"]} == {0.0}  # epochs 1 and 2 never ran


def wait_for_a_running_trial(proc: subprocess.Popen, load, after_complete: bool = False) -> None:
    """Poll the storage until ``proc`` runs a trial (and, with ``after_complete``, one trial has completed)."""
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the worker exited or hung: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            trials = load().trials
        except Exception:  # not created yet
            trials = []
        # A running trial of this worker with all its parameters drawn: killed in the milliseconds before, a trial
        # has nothing to run again (it stays failed and uncounted, and a new one is sampled: study.retry).
        if (not after_complete or any(t.state == TrialState.COMPLETE for t in trials)) and any(
            t.state == TrialState.RUNNING and t.user_attrs.get("pid") == proc.pid and t.user_attrs.get("params_drawn")
            for t in trials
        ):
            return
        time.sleep(0.1)


def test_a_killed_study_resumes_with_the_same_command(image_folder, tmp_path, cli):
    command = ["tune", *fit_flags(image_folder, tmp_path), "--n_trials", "3", "--study", "r"]  # the recipe's space
    db = tmp_path / "vit_cifar" / "tune-r" / "study.db"

    def load() -> optuna.Study:
        if not db.is_file():  # load_study would create it (and its tables) before the worker does
            raise FileNotFoundError(db)
        return optuna.load_study(study_name="r", storage=sqlite(tmp_path, "r"))

    proc = worker(*command)
    try:
        wait_for_a_running_trial(proc, load, after_complete=True)  # in its second trial, the first complete
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The trial it was running (none only if the kill landed in the milliseconds between two trials).
    killed = [t.number for t in load().trials if t.state == TrialState.RUNNING]
    assert len(killed) <= 1
    code, _, err = cli(*command)  # the same command again, in this process
    assert code == 0, err
    trials = load().trials
    assert [t.number for t in trials] == list(range(len(trials)))
    for number in killed:  # failed by the rerun (its process was gone, no reason of its own) and run again
        assert trials[number].state == TrialState.FAIL and "reason" not in trials[number].user_attrs
        retry = next(t for t in trials if t.user_attrs.get("retry_of") == number)
        assert retry.params == trials[number].params and retry.state == TrialState.COMPLETE
    assert [t.state for t in counted(load())] == [TrialState.COMPLETE] * 3  # n_trials is the study's total


def test_two_workers_on_one_storage_share_the_study_without_duplicating_a_trial(image_folder, tmp_path, cli):
    journal = tmp_path / "study.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    command = [
        "tune",
        *fit_flags(image_folder, tmp_path),
        "--n_trials",
        "4",
        "--study",
        "w",
        "--storage",
        f"journal://{journal}",
    ]
    # One worker in its own process; once it runs a trial, a second one in this process, on the same journal file.
    proc = worker(*command)
    try:
        wait_for_a_running_trial(proc, lambda: optuna.load_study(study_name="w", storage=storage))
        code, _, err = cli(*command)
        assert code == 0, err
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    finally:
        proc.kill()
    trials = optuna.load_study(study_name="w", storage=storage).trials
    # One study, each trial numbered once, with its own parameters and folder, by both workers; 4 in all (a 5th only
    # if both finished a trial at the same instant).
    assert [t.number for t in trials] == list(range(len(trials))) and 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == {proc.pid, os.getpid()}
    assert len({t.params["model.lr"] for t in trials}) == len(trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)


@pytest.mark.parametrize(
    "space, extra, needle",
    [
        ("model.lr: {type: gaussian, low: 1, high: 2}", [], "unknown type 'gaussian'"),
        ("model.lr: {type: float, low: 1e-2, high: 1e-4}", [], "low 0.01 > high 0.0001"),
        ("model.lr: {type: float, low: 0, high: 1, log: true}", [], "model.lr"),
        (
            "model.lrr: {type: float, low: 1.0e-4, high: 1.0e-2}",
            [],
            "'model.lrr' is not a fit flag of recipe vit_cifar",
        ),
        ("finetuning.strategy: {type: categorical, choices: [full, sometimes]}", [], "finetuning.strategy"),
        ("model.lr: {type: float, low: 1.0e-4, high: [1", [], "cannot parse space file"),
        ("- model.lr", [], "must map fit flags to distributions"),
        ("test_after_fit: {type: categorical, choices: [true]}", [], "set by tune itself"),
        ("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}", ["--trainer.devices", "2"], "one device"),
        ("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}", ["--storage", "study.db"], "--storage 'study.db'"),
    ],
)
def test_a_bad_space_file_or_launch_stops_with_one_line(space, extra, needle, image_folder, tmp_path, cli):
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    code, _, err = cli("tune", *fit_flags(image_folder, tmp_path), "--space", str(path), *extra)
    assert code == 2 and needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "vit_cifar").exists()  # nothing started


def test_space_files_extend_override_and_drop_the_recipes_space_and_carry_lists(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    path = tmp_path / "space.yaml"
    path.write_text(
        "model.warmup: null\npeft.target_modules: {type: categorical, choices: [[query, value], null]}\n"
        "model.lr: {type: float, low: 1e-4, high: 1e-3, log: true}\n"
    )  # YAML reads 1e-4 as text
    space = load_space(peft_lightning.get_recipe("minilm_austen").search_space, path)
    assert "model.warmup" not in space and "peft.method" in space
    assert space["model.lr"] == FloatDistribution(1e-4, 1e-3, log=True)
    assert space["peft.target_modules"] == CategoricalDistribution(['["query", "value"]', None])


@pytest.mark.parametrize("name", builtin_names())
def test_every_recipes_search_space_names_fit_flags_whose_ranges_and_choices_parse(name):
    from peft_lightning.tuning.trial import _check_flags, _cli_classes, _parse

    recipe = peft_lightning.get_recipe(name)
    parse_only, _ = _cli_classes()
    args = ["fit", "--recipe", name]
    _check_flags(_parse(parse_only, recipe, name, args), args, load_space(recipe.search_space), "space", name)


def test_a_sampled_strategy_option_reaches_the_strategy():
    """A space's ``finetuning.strategy.OPTION`` is an option of the strategy class given (or the recipe's): the trial's
    flag sets it; after a built-in name, which takes no options, the space stops with one line before any trial."""
    from peft_lightning.errors import UsageError
    from peft_lightning.tuning.space import flag
    from peft_lightning.tuning.trial import _check_flags, _cli_classes, _parse

    recipe = peft_lightning.get_recipe("vit_cifar")
    parse_only, _ = _cli_classes()
    space = load_space({}, {"finetuning.strategy.groups": {"type": "int", "low": 2, "high": 3}})
    args = ["fit", "--recipe", "vit_cifar", "--finetuning.strategy", "Head"]
    cli = _parse(parse_only, recipe, "vit_cifar", args)
    _check_flags(cli, args, space, "space", "vit_cifar")
    config = cli.parser.parse_args([*args, flag("finetuning.strategy.groups", 3)])["fit"]
    assert config["finetuning.strategy.class_path"].endswith(".Head")
    assert config["finetuning.strategy.init_args.groups"] == 3
    named = [*args[:-1], "head"]
    with pytest.raises(UsageError, match="options need its class"):
        _check_flags(_parse(parse_only, recipe, "vit_cifar", named), named, space, "space", "vit_cifar")


def test_help_lists_tune_and_neither_help_nor_list_imports_optuna(cli):
    code, out, _ = cli("tune", "--help")
    assert code == 0 and "--n_trials" in out and "--storage" in out and "--space" in out and "--pruner" in out
    code = (
        "import sys, runpy; sys.argv=['peft_lightning', sys.argv[1]];"
        "runpy.run_module('peft_lightning', run_name='__main__'); print('OPTUNA', 'optuna' in sys.modules)"
    )
    for command in ("--help", "list"):
        out = subprocess.run(
            [sys.executable, "-c", code, command], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        assert "OPTUNA False" in out
        assert command == "list" or "\n  tune " in out
