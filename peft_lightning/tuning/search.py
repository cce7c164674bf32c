"""The search: each trial a ``fit`` through the ``fit`` command's own LightningCLI class, and the ``tune`` command."""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError
from peft_lightning.tuning.space import flag, load_space, samples, suggest
from peft_lightning.tuning.study import (
    HOST,
    PID,
    PRUNERS,
    _short,
    _wall,
    claim,
    counted,
    fail_dead,
    make_pruner,
    make_storage,
    print_trials,
    retry,
    write_best,
    write_plots,
)

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution


# --- the fit command, parsed once and run per trial ---
class _Parsed(Exception):
    def __init__(self, cli: Any) -> None:
        super().__init__("parsed")
        self.cli = cli


def _cli_classes() -> tuple[type, type]:
    """(ParseOnly, Trial) subclasses of the ``fit`` command's LightningCLI class."""
    from peft_lightning.cli.lightning_cli import PeftLightningCLI
    from peft_lightning.run_folder import run_loggers

    class FitOnly(PeftLightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # Trials only fit: building the validate/test/predict parsers too would cost ~0.7 s a trial.
            return {"fit": PeftLightningCLI.subcommands()["fit"]}

    class ParseOnly(FitOnly):
        """Stops right after parsing: the parser and the resolved config, with nothing instantiated."""

        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)
            raise _Parsed(self)

    class Trial(FitOnly):
        """The ``fit`` command with the trial's run folder and its pruning callback."""

        def __init__(self, *args: Any, folder: Path, callbacks: Sequence[Any], **kwargs: Any) -> None:
            self.trial_folder, self.trial_callbacks = folder, list(callbacks)
            super().__init__(*args, **kwargs)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            # The base names a timestamped folder under --trainer.default_root_dir; a trial's is its own. The base
            # only sets these when unset, and leaves a logger the user configured alone, as here.
            trainer = self.config_init[self.subcommand].get("trainer", {})
            kwargs.setdefault("default_root_dir", str(self.trial_folder))
            if trainer.get("logger") in (None, True):
                kwargs.setdefault("logger", run_loggers(self.trial_folder))
            built = super().instantiate_trainer(**kwargs)
            # After construction: passing `callbacks` would replace the base's (RunReport, the progress bar). First,
            # so a pruned epoch stops before ModelCheckpoint saves it.
            built.callbacks[:0] = self.trial_callbacks
            return built

    return ParseOnly, Trial


def _parse(parse_only: type, recipe: type, name: str, args: list[str]) -> Any:
    try:
        parse_only(recipe, name, args=args)
    except _Parsed as done:
        return done.cli
    raise RuntimeError("the fit command did not parse its arguments")  # pragma: no cover


def _check_flags(cli: Any, args: list[str], space: Mapping[str, BaseDistribution], source: str, name: str) -> None:
    """Every key of ``space`` is a ``fit`` flag of this recipe, and both ends of its range and every choice parse."""
    config = cli.config["fit"]
    for key in space:
        if key not in config:
            raise UsageError(
                f"{source}: {key!r} is not a fit flag of recipe {name} "
                f"(see `python -m peft_lightning fit --recipe {name} --help`)"
            )
    for flags in samples(space):
        try:
            cli.parser.parse_args([*args, *flags])
        except UsageError as err:
            raise UsageError(f"{source}: {err}") from None


def _check_one_device(trainer: Mapping[str, Any]) -> None:
    # A trial runs in this process: several devices would make Lightning start more processes running `tune`.
    devices, accelerator = trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto"))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1):
        import torch

        n = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    else:
        n = int(devices)
    if n > 1 or int(trainer.get("num_nodes") or 1) > 1:
        raise UsageError(
            f"tune runs its trials in its own process, on one device ({n} asked): pass "
            "--trainer.devices 1; for N GPUs start N tune workers on one --storage, each with "
            "CUDA_VISIBLE_DEVICES=i (docs/tune.md)"
        )


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
    import optuna

    from peft_lightning.cli import recipe_arg
    from peft_lightning.registry import get_recipe

    if n_trials < 1:
        raise UsageError(f"--n_trials must be >= 1, got {n_trials}")
    fit_args = ["fit", *(["--recipe", recipe] if recipe else []), *args]
    name = recipe or recipe_arg(fit_args)
    if name is None:
        raise UsageError("no recipe given: pass --recipe NAME (see `python -m peft_lightning list`)")
    recipe_cls = get_recipe(name)
    from peft_lightning.summary import hide_third_party_noise

    hide_third_party_noise()  # as `fit` does (cli.main): each trial would repeat the same library notices
    # jsonargparse cannot dump the AdapterConfig the --peft.* link builds; the saved config has --peft.* (cli.main).
    warnings.filterwarnings("ignore", message=r"(?s).*Unable to serialize instance AdapterConfig")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, PED-ANOVA
    # Trials pass their flags as `args` while sys.argv holds the tune command's: by design here, not a mistake.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    parse_only, trial_cli = _cli_classes()
    space_source = str(space) if isinstance(space, (str, Path)) else "the recipe's search_space"
    dists = load_space(recipe_cls.search_space, space)
    parsed = _parse(parse_only, recipe_cls, name, fit_args)  # a bad fit flag stops here, before any trial
    _check_flags(parsed, fit_args, dists, space_source, name)
    trainer_cfg = parsed.config["fit"].get("trainer") or {}
    _check_one_device(trainer_cfg)
    study_name = study or name
    slug = re.sub(r"[^\w.-]+", "_", name).strip("_.") or "run"  # as run_folder.run_dir names the recipe's folder
    study_dir = (
        Path(trainer_cfg.get("default_root_dir") or "runs")
        / slug
        / ("tune-" + (re.sub(r"[^\w.-]+", "_", study_name).strip("_.") or "study"))
    )
    monitor, mode = recipe_cls.monitor, recipe_cls.monitor_mode
    the_study = optuna.create_study(
        study_name=study_name,
        storage=make_storage(storage, study_dir),
        load_if_exists=True,
        sampler=sampler,
        pruner=make_pruner(pruner) if isinstance(pruner, str) else pruner,
        direction="maximize" if mode == "max" else "minimize",
    )
    claim(the_study, name, monitor)
    study_dir.mkdir(parents=True, exist_ok=True)
    pruning = not isinstance(the_study.pruner, optuna.pruners.NopPruner)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", PID)
        flags = [flag(key, suggest(trial, key, dist)) for key, dist in dists.items()]
        folder = _free(study_dir / f"trial-{trial.number:03d}")
        trial.set_user_attr("run_dir", str(folder))
        callbacks = []
        if pruning:
            from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=monitor))
        try:
            # The sampled flags after the user's (they win), --test_after_fit false after them (the test set stays
            # unseen whatever the flags say).
            cli = trial_cli(
                recipe_cls, name, args=[*fit_args, *flags, "--test_after_fit=false"], folder=folder, callbacks=callbacks
            )
            return _score(cli, monitor)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("reason", str(pruned))
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            if not _interrupted(stop):  # e.g. --finetuning.show_groups, which exits after printing
                trial.set_user_attr("reason", f"fit exited with code {stop.code}")
                raise RuntimeError(f"fit exited with code {stop.code}") from None
            # Ctrl+C or SIGTERM: this trial runs again when the study resumes; Optuna marks it failed and stops.
            trial.set_user_attr("reason", "interrupted (Ctrl+C or SIGTERM): runs again when the study resumes")
            trial.set_user_attr("interrupted", True)
            retry(the_study, trial)
            raise KeyboardInterrupt from None
        except Exception as err:
            trial.set_user_attr("reason", _reason(err))
            raise
        finally:
            _free_device_memory()

    def after_trial(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        fail_dead(study_)
        write_best(study_, study_dir, monitor)
        if len(counted(study_)) >= n_trials:  # Optuna's MaxTrialsCallback, counting as `counted` does
            study_.stop()  # the whole table follows
        else:
            print_trials(study_, monitor, last=12)

    fail_dead(the_study)
    where = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    print(
        f"study {study_name!r} in {where}: {len(counted(the_study))} of {n_trials} trials so far; searching "
        f"{', '.join(dists)} for the {'highest' if mode == 'max' else 'lowest'} {monitor}; runs in {study_dir}"
    )
    try:
        if len(counted(the_study)) < n_trials:
            # Any exception a trial raises fails that trial only; KeyboardInterrupt still stops the study.
            the_study.optimize(
                objective, timeout=timeout, catch=(Exception,), callbacks=[after_trial], gc_after_trial=True
            )
    finally:  # interrupted too: where the study stands
        write_best(the_study, study_dir, monitor)
        print_trials(the_study, monitor)
    if plots:
        write_plots(the_study, study_dir, monitor)
    return the_study


def _free(folder: Path) -> Path:
    """``folder``, or ``folder-2`` ... when taken (a study recreated under the same name in a new storage)."""
    path, n = folder, 1
    while path.exists():
        n += 1
        path = folder.with_name(f"{folder.name}-{n}")
    return path


def _score(cli: Any, monitor: str) -> float:
    """The trial's best ``monitor`` over its validations (RunReport's; ModelCheckpoint's best score otherwise)."""
    best = cli.report.best
    value = best["value"] if best else None
    checkpoint = cli.trainer.checkpoint_callback
    if value is None and checkpoint is not None and checkpoint.best_model_score is not None:
        value = float(checkpoint.best_model_score)
    if value is None:
        raise UsageError(
            f"the trial logged no {monitor}: it ran no validation (see --trainer.limit_val_batches and "
            "--trainer.check_val_every_n_epoch)"
        )
    if not math.isfinite(value):
        raise FloatingPointError(f"{monitor} is {value}")
    return float(value)


def _interrupted(stop: BaseException) -> bool:
    """Whether a trial stopped on Ctrl+C or SIGTERM: a KeyboardInterrupt outside fit, Lightning's graceful stop
    (``SIGTERMException``), or the ``sys.exit(1)`` Lightning raises on a KeyboardInterrupt inside fit, after setting
    SIGINT to be ignored: the default handler is put back, or Ctrl+C would no longer stop the tune process."""
    if isinstance(stop, KeyboardInterrupt) or type(stop).__name__ == "SIGTERMException":
        return True
    if not isinstance(stop.__context__, KeyboardInterrupt):
        return False
    import signal

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


def _reason(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return first if isinstance(err, UsageError) else f"{type(err).__name__}: {first}"


def _free_device_memory() -> None:
    # After an out-of-memory error, the next trial needs the cached blocks back (gc_after_trial frees the objects).
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --- the command ---
def tune_command(argv: list[str], debug: bool = False) -> None:
    """``python -m peft_lightning tune``: see ``tune`` and docs/tune.md."""
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
    known, fit_args = parser.parse_known_args(argv)
    import optuna

    if not debug:
        # Optuna logs a failed trial with its whole traceback; the table gives its reason in one line.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.perf_counter()
    with _restore_log_levels():
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
        f"({', '.join(f'{k}={_short(v)}' for k, v in best.params.items())})  wall {_wall(time.perf_counter() - started)}"
    )
    if (folder / "best.yaml").is_file():
        print(f"rerun it: python -m peft_lightning fit -c {folder / 'best.yaml'}")


@contextlib.contextmanager
def _restore_log_levels() -> Iterator[None]:
    # --quiet lowers Lightning's log level in each trial; give the process back as it was (as cli.main does).
    import logging

    levels = {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")}
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
