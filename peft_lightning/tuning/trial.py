"""One trial: the ``fit`` command, parsed and checked once before the search (``fit_command``), then run per trial
through its own LightningCLI class with the sampled flags and scored on the recipe's monitor (``Objective``)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from peft_lightning.errors import UsageError
from peft_lightning.tuning.space import flag, load_space, samples, suggest
from peft_lightning.tuning.study import HOST, PID, retry

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
            # The base names a timestamped folder under --trainer.default_root_dir; a trial's is its own, where the
            # base puts the run's loggers (and a tracker the user added after them).
            kwargs.setdefault("default_root_dir", str(self.trial_folder))
            built = super().instantiate_trainer(**kwargs)
            # After construction: passing `callbacks` would replace the base's (RunReport, the progress bar). First,
            # so a pruned epoch stops before ModelCheckpoint saves it.
            built.callbacks[:0] = self.trial_callbacks
            return built

    return ParseOnly, Trial


def _parse(parse_only: type, recipe: type, name: str, args: list[str]) -> Any:
    """The ``ParseOnly`` CLI after parsing ``args``: its ``parser`` and resolved ``config``."""
    try:
        parse_only(recipe, name, args=args)
    except _Parsed as done:
        return done.cli
    raise RuntimeError("the fit command did not parse its arguments")  # pragma: no cover


def _check_flags(cli: Any, args: list[str], space: Mapping[str, BaseDistribution], source: str, name: str) -> None:
    """Every key of ``space`` is a ``fit`` flag of this recipe, and both ends of its range and every choice parse."""
    config = cli.config["fit"]
    for key in space:
        if not _is_flag(config, key):
            raise UsageError(
                f"{source}: {key!r} is not a fit flag of recipe {name} with these flags (see `python -m "
                f"peft_lightning fit --recipe {name} --help`; a strategy's options need its class: "
                "--finetuning.strategy Gradual, not gradual)"
            )
    for flags in samples(space):
        try:
            cli.parser.parse_args([*args, *flags])
        except UsageError as err:
            raise UsageError(f"{source}: {err}") from None


def _is_flag(config: Any, key: str) -> bool:
    """Whether ``key`` is in ``config``, directly or as an option of a class given by path, as jsonargparse takes
    it on the command line (``finetuning.strategy.groups`` for ``finetuning.strategy.init_args.groups``)."""
    head, _, option = key.rpartition(".")
    return key in config or (f"{head}.class_path" in config and f"{head}.init_args.{option}" in config)


def _check_one_device(trainer: Mapping[str, Any]) -> None:
    """Stop with one line unless the trials would run on one device of one node."""
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


@dataclass
class FitCommand:
    """The ``fit`` command every trial runs, checked: the recipe, the flags, the space and the trial's CLI class."""

    recipe: type
    """The recipe class (a ``FineTuneTask``): its ``monitor`` and ``monitor_mode`` score the trials."""
    name: str
    """The name it was asked by: the study folder's and the default study name."""
    args: list[str]
    """``fit`` and the user's fit flags, the same for every trial."""
    space: dict[str, BaseDistribution]
    """The search space: ``fit`` flag names to Optuna distributions."""
    trainer: Mapping[str, Any]
    """The parsed ``--trainer.*`` settings (``default_root_dir`` places the study folder)."""
    cli: type
    """The LightningCLI class that runs one trial (``_cli_classes``)."""


def fit_command(recipe: str | None, args: Sequence[str], space: str | Path | Mapping[str, Any] | None) -> FitCommand:
    """Parse and check the ``fit`` command once: a bad flag, space or launch stops here, before any trial."""
    from peft_lightning.cli.args import recipe_arg
    from peft_lightning.registry import get_recipe

    fit_args = ["fit", *(["--recipe", recipe] if recipe else []), *args]
    name = recipe or recipe_arg(fit_args)
    if name is None:
        raise UsageError("no recipe given: pass --recipe NAME (see `python -m peft_lightning list`)")
    recipe_cls = get_recipe(name)
    _hide_repeated_notices()
    parse_only, trial_cli = _cli_classes()
    space_source = str(space) if isinstance(space, (str, Path)) else "the recipe's search_space"
    dists = load_space(recipe_cls.search_space, space)
    parsed = _parse(parse_only, recipe_cls, name, fit_args)  # a bad fit flag stops here, before any trial
    _check_flags(parsed, fit_args, dists, space_source, name)
    trainer_cfg = parsed.config["fit"].get("trainer") or {}
    _check_one_device(trainer_cfg)
    return FitCommand(recipe_cls, name, fit_args, dists, trainer_cfg, trial_cli)


def _hide_repeated_notices() -> None:
    import optuna

    from peft_lightning.output.summary import hide_third_party_noise

    hide_third_party_noise()  # as `fit` does (cli.main): each trial would repeat the same library notices
    # jsonargparse cannot dump the AdapterConfig the --peft.* link builds; the saved config has --peft.* (cli.main).
    warnings.filterwarnings("ignore", message=r"(?s).*Unable to serialize instance AdapterConfig")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, PED-ANOVA
    # Trials pass their flags as `args` while sys.argv holds the tune command's: by design here, not a mistake.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


# --- one trial ---
@dataclass
class Objective:
    """Optuna's objective: one trial is a ``fit`` with the sampled flags in its own run folder
    (``study_dir/trial-NNN``), scored on the recipe's best ``monitor``; why it failed or was pruned is its ``reason``.
    """

    fit: FitCommand
    study: optuna.Study
    study_dir: Path
    pruning: bool = field(init=False)

    def __post_init__(self) -> None:
        import optuna

        self.pruning = not isinstance(self.study.pruner, optuna.pruners.NopPruner)

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", PID)
        flags = [flag(key, suggest(trial, key, dist)) for key, dist in self.fit.space.items()]
        trial.set_user_attr("params_drawn", True)  # all of them: a trial lost after this runs again (study.retry)
        folder = _free(self.study_dir / f"trial-{trial.number:03d}")
        trial.set_user_attr("run_dir", str(folder))
        callbacks = self._callbacks(trial)
        try:
            # The sampled flags after the user's (they win), --test_after_fit false after them (the test set stays
            # unseen whatever the flags say).
            args = [*self.fit.args, *flags, "--test_after_fit=false"]
            cli = self.fit.cli(self.fit.recipe, self.fit.name, args=args, folder=folder, callbacks=callbacks)
            return _score(cli, self.fit.recipe.monitor)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("reason", str(pruned))
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            self._stopped(trial, stop)
        except Exception as err:
            trial.set_user_attr("reason", _reason(err))
            raise
        finally:
            _free_device_memory()

    def _callbacks(self, trial: optuna.Trial) -> list[Any]:
        if not self.pruning:
            return []
        from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

        return [PyTorchLightningPruningCallback(trial, monitor=self.fit.recipe.monitor)]

    def _stopped(self, trial: optuna.Trial, stop: KeyboardInterrupt | SystemExit) -> NoReturn:
        if not _interrupted(stop):  # e.g. --finetuning.show_groups, which exits after printing
            trial.set_user_attr("reason", f"fit exited with code {stop.code}")
            raise RuntimeError(f"fit exited with code {stop.code}") from None
        # Ctrl+C or SIGTERM: this trial runs again when the study resumes; Optuna marks it failed and stops.
        trial.set_user_attr("reason", "interrupted (Ctrl+C or SIGTERM): runs again when the study resumes")
        trial.set_user_attr("interrupted", True)
        retry(self.study, trial)
        raise KeyboardInterrupt from None


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
