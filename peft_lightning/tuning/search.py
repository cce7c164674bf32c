"""The search: the study opened or resumed in its storage, its trials run (``trial.Objective``, each a ``fit``), its
results reported; and the ``tune`` command."""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError
from peft_lightning.tuning.study import (
    PRUNERS,
    _short,
    _wall,
    claim,
    counted,
    fail_dead,
    make_pruner,
    make_storage,
    print_trials,
    write_best,
    write_plots,
)
from peft_lightning.tuning.trial import FitCommand, Objective, fit_command

if TYPE_CHECKING:
    import argparse

    import optuna


# --- the search ---
def tune(
    recipe: str | None,
    n_trials: int = 20,
    *,
    timeout: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    space: str | Path | Mapping[str, Any] | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    sampler: optuna.samplers.BaseSampler | None = None,
    args: Sequence[str] = (),
    plots: bool = True,
) -> optuna.Study:
    """Search the recipe's hyperparameters with Optuna, each trial a ``fit`` with ``args`` and the sampled flags.

    Args:
        recipe: built-in recipe name or ``package.module:Class`` (None: the ``recipe:`` of a ``-c`` file in ``args``).
        n_trials: the study's total number of trials, whichever process ran them: a rerun of the same call runs
            only the missing ones. Trials running in other workers count; trials lost to a killed process do not
            (they run again).
        timeout: stop starting new trials after this many seconds (a running trial finishes).
        study: the study's name in the storage (default: the recipe's name); its folder is
            ``<root>/<recipe>/tune-<study>`` (``root``: ``--trainer.default_root_dir``, ``runs`` by default).
        storage: an Optuna storage URL (``sqlite:///f.db``, ``postgresql://...``) or ``journal://PATH``; default:
            ``study.db`` in the study folder.
        space: a YAML file or mapping of distributions that overrides or extends the recipe's ``search_space``.
        pruner: ``median``, ``hyperband``, ``none`` or any Optuna pruner.
        sampler: an Optuna sampler; default Optuna's (TPE).
        args: ``fit`` flags for every trial (``--trainer.max_epochs 3``, ``--data.max_train_samples 5000`` ...).
        plots: write ``history.png`` and ``importance.png`` at the end.

    Returns:
        The Optuna study (``study.best_trial``, ``study.trials``); ``best.yaml`` is in the study folder.

    Example:
        >>> import peft_lightning
        >>> study = peft_lightning.tune("effnet_fashion", n_trials=10,
        ...                             args=["--data.max_train_samples", "6000"])  # doctest: +SKIP
        >>> study.best_params  # doctest: +SKIP
    """
    if n_trials < 1:
        raise UsageError(f"--n_trials must be >= 1, got {n_trials}")
    fit = fit_command(recipe, args, space)
    study_name = study or fit.name
    study_dir = _study_dir(fit, study_name)
    the_study = _open_study(fit, study_name, make_storage(storage, study_dir), pruner, sampler)
    study_dir.mkdir(parents=True, exist_ok=True)
    objective = Objective(fit, the_study, study_dir)
    fail_dead(the_study)
    _print_start(the_study, fit, n_trials, storage or f"sqlite:///{(study_dir / 'study.db').resolve()}", study_dir)
    _search(the_study, objective, n_trials, timeout)
    if plots:
        write_plots(the_study, study_dir, fit.recipe.monitor)
    return the_study


def _study_dir(fit: FitCommand, study_name: str) -> Path:
    """``<root>/<recipe>/tune-<study>``: the recipe's folder named as run_folder.run_dir names it."""
    slug = re.sub(r"[^\w.-]+", "_", fit.name).strip("_.") or "run"
    root = Path(fit.trainer.get("default_root_dir") or "runs")
    return root / slug / ("tune-" + (re.sub(r"[^\w.-]+", "_", study_name).strip("_.") or "study"))


def _open_study(
    fit: FitCommand,
    study_name: str,
    storage: Any,
    pruner: str | optuna.pruners.BasePruner,
    sampler: optuna.samplers.BaseSampler | None,
) -> optuna.Study:
    """The study, created or (the same command again, another worker) loaded; one of another recipe stops here."""
    import optuna

    the_study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        sampler=sampler,
        pruner=make_pruner(pruner) if isinstance(pruner, str) else pruner,
        direction="maximize" if fit.recipe.monitor_mode == "max" else "minimize",
    )
    claim(the_study, fit.name, fit.recipe.monitor)
    return the_study


def _print_start(study: optuna.Study, fit: FitCommand, n_trials: int, where: str, study_dir: Path) -> None:
    mode, monitor = fit.recipe.monitor_mode, fit.recipe.monitor
    print(
        f"study {study.study_name!r} in {where}: {len(counted(study))} of {n_trials} trials so far; searching "
        f"{', '.join(fit.space)} for the {'highest' if mode == 'max' else 'lowest'} {monitor}; runs in {study_dir}"
    )


def _search(study: optuna.Study, objective: Objective, n_trials: int, timeout: float | None) -> None:
    """Run the missing trials; ``best.yaml`` and the table of trials after each one and at the end."""
    monitor = objective.fit.recipe.monitor
    after = functools.partial(_after_trial, study_dir=objective.study_dir, monitor=monitor, n_trials=n_trials)
    try:
        if len(counted(study)) < n_trials:
            # Any exception a trial raises fails that trial only; KeyboardInterrupt still stops the study.
            study.optimize(objective, timeout=timeout, catch=(Exception,), callbacks=[after], gc_after_trial=True)
    finally:  # interrupted too: where the study stands
        write_best(study, objective.study_dir, monitor)
        print_trials(study, monitor)


def _after_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, *, study_dir: Path, monitor: str, n_trials: int
) -> None:
    fail_dead(study)
    write_best(study, study_dir, monitor)
    if len(counted(study)) >= n_trials:  # Optuna's MaxTrialsCallback, counting as `counted` does
        study.stop()  # the whole table follows
    else:
        print_trials(study, monitor, last=12)


# --- the command ---
def tune_command(argv: list[str], debug: bool = False) -> None:
    """``python -m peft_lightning tune``: see ``tune`` and docs/tune.md."""
    known, fit_args = _command_parser().parse_known_args(argv)
    import optuna

    if not debug:
        # Optuna logs a failed trial with its whole traceback; the table gives its reason in one line.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.perf_counter()
    # Lightning's log levels, lowered by --quiet, come back after each trial: PeftLightningCLI restores them.
    study = tune(
        known.recipe,
        known.n_trials,
        timeout=known.timeout,
        study=known.study,
        storage=known.storage,
        space=known.space,
        pruner=known.pruner,
        args=fit_args,
    )
    _print_best(study, time.perf_counter() - started)


def _command_parser() -> argparse.ArgumentParser:
    from peft_lightning.cli.commands import command_parser

    parser = command_parser(
        "tune",
        "Search a recipe's hyperparameters with Optuna: each trial is a real `fit` with every fit flag given here "
        "(--trainer.* --model.* --data.* --finetuning.* --checkpoint.* --peft.* -c FILE) plus the sampled ones, "
        "scored on the recipe's validation metric (never the test set), in its own run folder "
        "RUNS/RECIPE/tune-STUDY/trial-NNN. The same command resumes; several on one --storage share the study.",
    )
    parser.usage = (
        "python -m peft_lightning tune --recipe NAME [--n_trials N] [--timeout SECONDS] [--study NAME] "
        "[--storage URL] [--space FILE] [--pruner {median,hyperband,none}] [fit flags ...]"
    )
    parser.allow_abbrev = False  # a fit flag must never be taken for an abbreviation of one of these
    parser.add_argument("--recipe", metavar="NAME", help="built-in recipe name or package.module:Class (see `list`)")
    parser.add_argument(
        "--n_trials",
        type=int,
        default=20,
        metavar="N",
        help="the study's total number of trials, whichever worker ran them; a rerun runs only the "
        "missing ones (default: 20)",
    )
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds after which no new trial starts")
    parser.add_argument("--study", metavar="NAME", help="the study's name (default: the recipe's name)")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL: sqlite:///FILE, postgresql://..., or journal://FILE "
        "(default: RUNS/RECIPE/tune-STUDY/study.db)",
    )
    parser.add_argument(
        "--space",
        metavar="FILE",
        help="YAML file of distributions overriding or extending the recipe's "
        "search_space, e.g. 'model.lr: {type: float, low: 1e-4, high: 1e-2, log: "
        "true}'",
    )
    parser.add_argument(
        "--pruner",
        choices=PRUNERS,
        default="median",
        help="stop poor trials at an epoch's validation (default: median)",
    )
    parser.epilog = (
        "Results in the study folder: best.yaml (fit -c best.yaml reruns the best trial), history.png, "
        "importance.png, trial-NNN/ run folders (`plot STUDY_FOLDER` overlays them). See docs/tune.md."
    )
    return parser


def _print_best(study: optuna.Study, seconds: float) -> None:
    """The best trial and how to rerun it; exit 1 when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        # Not a usage error (exit 2): the command was fine, its trials failed, each with its reason.
        print(
            f"error: no trial of study {study.study_name!r} completed: see the reasons in the table above",
            file=sys.stderr,
        )
        sys.exit(1)
    best = study.best_trial
    folder = Path(best.user_attrs.get("run_dir", "")).parent
    print(
        f"\nbest trial {best.number}: {study.user_attrs.get('monitor')} {best.value:.4f}  "
        f"({', '.join(f'{k}={_short(v)}' for k, v in best.params.items())})  wall {_wall(seconds)}"
    )
    if (folder / "best.yaml").is_file():
        print(f"rerun it: python -m peft_lightning fit -c {folder / 'best.yaml'}")
