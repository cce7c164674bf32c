"""LightningCLI bound to one recipe: ``fit/validate/test/predict`` with its classes and defaults.

Imported only for those subcommands (and by ``tune``): it imports Lightning, which ``--help`` and ``list`` never do.
Lightning's own steps run in its order (``LightningCLI.__init__``): parse → ``_parse_ckpt_path`` (here:
``resume.config_from_checkpoint``) → ``before_instantiate_classes`` → model, datamodule, ``instantiate_trainer``
(here: then ``datamodule.connect(**model.data_needs())``) → ``before_<subcommand>`` → the Trainer's method →
``after_<subcommand>``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import ActionYesNo
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from peft_lightning.adapters import AdapterConfig
from peft_lightning.callbacks.checkpoint import ResumableCheckpoint
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.predictions import PredictionWriter
from peft_lightning.callbacks.strategies import BUILTIN
from peft_lightning.cli.args import run_key
from peft_lightning.cli.resume import Done, config_from_checkpoint
from peft_lightning.data.base import FineTuneDataModule
from peft_lightning.engine import launch, precision, strategy
from peft_lightning.errors import UsageError
from peft_lightning.output import summary
from peft_lightning.output.report import PhaseProgressBar, RunReport  # imported before parsing: --help lists them
from peft_lightning.output.run_folder import run_dir, run_loggers, user_trackers

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from peft_lightning.tasks.base import FineTuneTask

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
"""The loggers ``--quiet`` turns down to warnings for one run."""


class Parser(LightningArgumentParser):
    """jsonargparse prints the whole usage (100+ lines) before a parse error; one line is enough."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        flat = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        raise UsageError(strategy_error(flat) or f"{flat[:400]} (see `fit --recipe NAME --help`)")


class PeftLightningCLI(LightningCLI):
    """LightningCLI bound to one recipe: its classes, its defaults, and a test of the best checkpoint after fit.

    Args:
        recipe: the recipe class (the LightningModule); its ``datamodule_class`` and ``*_defaults`` come with it.
        recipe_name: the name it was asked by (``effnet_fashion``, ``my_pkg.recipes:MyFlowers``): the run folder's.
        **kwargs: passed to ``LightningCLI`` (``args``: the flags, as a list or a dict from a notebook).
    """

    def __init__(self, recipe: type[FineTuneTask], recipe_name: str, **kwargs: Any) -> None:
        self.recipe = recipe
        self.recipe_name = recipe_name
        self.started = time.perf_counter()
        # Under a launcher that restarts this command (a requeued SLURM job, torchrun), the run folder is named by
        # the job, not the clock: the restart continues it (see args.run_key and resume.resolve).
        args = kwargs.get("args")  # a list of flags, or a dict/Namespace from a notebook
        argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else [repr(args)]
        self.run_key = run_key(os.environ, argv)
        # A recipe's "precision": "auto" stays "auto" in --help and --print_config (the recipe's value, the same on
        # every machine); before_instantiate_classes resolves it for this machine (precision.resolve_auto_precision).
        self.run_summary = summary.RunSummary()
        trainer_defaults = {
            "callbacks": [LearningRateMonitor(logging_interval="step")],
            # each run gets its own folder below it, <root>/<recipe>/<timestamp> (see instantiate_trainer)
            "default_root_dir": "runs",
            **recipe.trainer_defaults,
        }
        trainer_defaults["callbacks"] = [*trainer_defaults["callbacks"], self.run_summary]
        with _restored_log_levels():  # --quiet lowers Lightning's log level for this run only
            super().__init__(
                model_class=recipe,
                datamodule_class=recipe.datamodule_class,
                trainer_defaults=trainer_defaults,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=42,
                # One road for the optimizer: the task's named, layer-wise param groups, not --optimizer.
                auto_configure_optimizers=False,
                parser_class=Parser,
                parser_kwargs={"prog": "python -m peft_lightning"},
                **kwargs,
            )

    def _parse_ckpt_path(self) -> None:
        # Lightning's private step between parse_arguments and before_instantiate_classes, replaced: no public hook
        # runs there, and Lightning's version would parse the checkpoint's `peft` into the model's linked argument
        # (an error) and cannot resolve `last` across run folders.
        self.config, self.untested = config_from_checkpoint(
            self.parser, self.config, recipe_name=self.recipe_name, run_key=self.run_key
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--recipe",
            type=str,
            default=self.recipe_name,
            help="built-in recipe name or package.module:Class (see `list`)",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, test the best checkpoint and print the test metrics",
        )
        parser.add_argument("--debug", type=bool, default=False, help="show full tracebacks on errors")
        parser.add_argument(
            "--quiet",
            action=ActionYesNo,
            default=False,
            help="for CI logs: no progress bar, no model summary, only warnings from Lightning; "
            "the summary at the end still prints (--quiet, or quiet: true in a config)",
        )
        parser.add_lightning_class_args(FineTuning, "finetuning")
        # ModelCheckpoint plus a recent, whole, finite last.ckpt and graceful SIGTERM/SIGINT (docs/reliability.md)
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        # What `predict` writes: predictions.parquet (and .csv) in the run folder, one row per input.
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # Adapters are a model init argument (so checkpoints carry them) shown at top level as --peft.*.
        parser.add_class_arguments(AdapterConfig, "peft")
        parser.link_arguments("peft", "model.peft", compute_fn=adapter_config)
        parser.set_defaults(recipe_defaults(self.recipe))

    def before_instantiate_classes(self) -> None:
        # Before any weights or data load: a launch that cannot run here stops with one line.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("precision") == precision.AUTO:
            # Resolved here, not at parse time: config.yaml and the start-of-fit line get this machine's precision,
            # --help and --print_config the recipe's "auto".
            self.run_summary.precision_note = precision.resolve_auto_precision(trainer, precision.detect_hardware())
        launch.check_launch(trainer or {}, config.get("model") or {}, os.environ)
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # the writer has them on disk; a large set would fill memory twice

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The task hands its data what the data needs from the model (timm's preprocessing, the tokenizer),
        # explicitly and before the Trainer's method reads any data (data/base.py). A data module that is not ours
        # (a recipe's own LightningDataModule) gets nothing.
        if isinstance(self.datamodule, FineTuneDataModule):
            self.datamodule.connect(**self.model.data_needs())

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The run folder, its loggers and the progress bar (peft_lightning/output/report.py). A progress bar the user
        # configured is kept as given; a logger (`--trainer.logger MLFlowLogger ...`: a tracker) logs after the run
        # folder's own, not instead; `--trainer.logger false` keeps the folder for checkpoints.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer", {})
        self.run_dir = run_dir(trainer.get("default_root_dir") or "runs", self.recipe_name, key=self.run_key)
        folder = kwargs.setdefault("default_root_dir", str(self.run_dir))  # a tune trial's is its own
        trackers = user_trackers(trainer.get("logger"))
        if trainer.get("logger") is not False:
            kwargs.setdefault("logger", run_loggers(folder, trackers))
        callbacks = list(trainer.get("callbacks") or [])
        if trackers:
            # Imported here: not a callback to configure, so not among the ones --help lists.
            from peft_lightning.callbacks.trackers import Trackers

            callbacks.append(Trackers(trackers))  # the config, the run folder and the best checkpoint's path
        self.report = RunReport()
        callbacks.append(self.report)
        if config.get("quiet", False):
            kwargs.setdefault("enable_progress_bar", False)
            kwargs.setdefault("enable_model_summary", False)
            for name in LIGHTNING_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        elif trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(PhaseProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        # --trainer.strategy fsdp -> FSDPStrategy over the task's blocks; 16-mixed on a CPU stays float16.
        kwargs.update(strategy.trainer_overrides(trainer, self.model))
        built = super().instantiate_trainer(**kwargs)
        if not built.loggers:  # `--trainer.logger false`: our LearningRateMonitor (trainer_defaults) would stop fit
            built.callbacks = [c for c in built.callbacks if not isinstance(c, LearningRateMonitor)]
        return built

    def before_fit(self) -> None:
        # --finetuning.show_groups: the table of layer groups instead of a run (exit 0, nothing trained).
        callback = FineTuning.find(self.trainer)
        if callback is not None and callback.show_groups:
            callback.print_groups(self.model, epochs=self.trainer.max_epochs or 1)
            raise Done
        if self.untested:  # the run's training ended, the test after it did not (killed): that test, then done
            self._test_after_fit(self.untested, Path(self.config[self.subcommand].ckpt_path).parent)
            raise Done

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if not self.trainer.interrupted and config.get("test_after_fit", True):
            folder = checkpoint.dirpath if checkpoint is not None else None
            self._test_after_fit(best, folder)
        else:
            self._summary({}, best)

    def _test_after_fit(self, tested: str, folder: str | Path | None) -> None:
        """Test ``tested`` (a checkpoint; "": the weights in memory), print the result line and the summary, and
        record in ``folder`` (the checkpoints') that the fit's test ended: a resume after a kill in this test
        tests again; one after it has nothing left to do (``resume.config_from_checkpoint``)."""
        from peft_lightning.model_files.checkpoints import write_test_results

        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=tested or None, verbose=False)
        metrics = results[0] if results else {}
        if folder is not None and self.trainer.is_global_zero and not self.trainer.interrupted:
            write_test_results(folder, tested or "final weights", {k: float(v) for k, v in metrics.items()})
        self._summary(metrics, tested)

    def _summary(self, metrics: dict[str, float], best: str) -> None:
        from peft_lightning.output.summary import best_validation, final_line, print_summary, summary_rows

        wall = time.perf_counter() - self.started
        if not self.trainer.is_global_zero:
            return
        # One grep-able line first (CI logs, tests), then the table.
        best_seen = best_validation(self.trainer, self.report)
        print("\n" + final_line(self.recipe_name, metrics, best_seen, wall, best, self.trainer.interrupted))
        rows = summary_rows(
            self.trainer,
            self.model,
            recipe=self.recipe_name,
            report=self.report,
            test_metrics=metrics,
            wall=wall,
            datamodule=self.datamodule,
        )
        print_summary(rows)

    def after_validate(self) -> None:
        self._print_run_dir()

    def after_test(self) -> None:
        self._print_run_dir()

    def after_predict(self) -> None:
        self._print_run_dir()

    def _print_run_dir(self) -> None:
        if self.trainer.is_global_zero and Path(self.run_dir).is_dir():
            print(f"run folder: {self.run_dir}")


def strategy_error(message: str) -> str | None:
    """jsonargparse's error for a ``--finetuning.strategy`` that is neither a built-in name nor a class path (or a
    name given options) in one line that says what to do, else None."""
    found = re.search(r'key "finetuning\.strategy".*Expected a dot import path string: (\S+)', message)
    if found is None:
        return None
    name = found[1]
    if name in BUILTIN:  # a name followed by options
        cls = BUILTIN[name].__name__
        return (
            f"--finetuning.strategy {name} runs with its default options and takes none: to set them give its class, "
            f"--finetuning.strategy {cls} --finetuning.strategy.OPTION VALUE (--finetuning.strategy.help {cls})"
        )
    return (
        f"--finetuning.strategy {name!r} is neither a built-in strategy ({', '.join(BUILTIN)}) nor the import path "
        "of a Strategy class (e.g. --finetuning.strategy Retune --finetuning.strategy.round_epochs 1)"
    )


def recipe_defaults(recipe: type[FineTuneTask]) -> dict[str, Any]:
    """The parser defaults a recipe sets, by flag: ``model_defaults``, ``data_defaults``, ``finetuning_defaults``
    and its checkpoint monitor (``trainer_defaults`` go to LightningCLI's ``trainer_defaults``).

    Example:
        >>> from recipes.effnet_fashion import EffnetFashion
        >>> recipe_defaults(EffnetFashion)["model.scheduler"]  # doctest: +SKIP
        'onecycle'
    """
    defaults: dict[str, Any] = {
        "checkpoint.monitor": recipe.monitor,
        "checkpoint.mode": recipe.monitor_mode,
        "checkpoint.save_last": True,
        "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
        "checkpoint.auto_insert_metric_name": False,
    }
    defaults.update({f"model.{k}": v for k, v in recipe.model_defaults.items()})
    defaults.update({f"finetuning.{k}": v for k, v in recipe.finetuning_defaults.items()})
    defaults.update({f"data.{k}": v for k, v in recipe.data_defaults.items()})
    return defaults


def adapter_config(value: Any) -> Any:
    """The linked ``--peft.*`` group as the model's ``peft`` argument (a Namespace on parse, a dataclass later)."""
    return value if isinstance(value, AdapterConfig) or value is None else AdapterConfig(**dict(vars(value)))


@contextlib.contextmanager
def _restored_log_levels() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
