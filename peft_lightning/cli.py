"""The command line: LightningCLI's ``fit/validate/test/predict`` for a recipe, plus ``list``.

    python -m peft_lightning fit --recipe effnet_fashion --trainer.max_epochs 3
    python -m peft_lightning fit --recipe my_pkg.recipes:MyFlowers -c my_run.yaml
    python -m peft_lightning list
    python -m peft_lightning export --recipe effnet_fashion --ckpt_path last.ckpt --out adapter/ --merge
    python -m peft_lightning plot runs/effnet_fashion/20260101-120000 runs/effnet_fashion/20260102-090000

``--recipe`` picks the LightningModule (the recipe class), its LightningDataModule and their defaults; everything
else is plain LightningCLI. This module is the only one that reads the environment (``PEFT_LIGHTNING_DEBUG``; the
launcher's job id for the run folder's name, see ``run_key``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.tasks.base import FineTuneTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP = """usage: python -m peft_lightning {fit,validate,test,predict,tune,list,export,plot} [--recipe NAME] [options]

Fine-tune pretrained models with recipes on Lightning.

commands:
  fit        train (and, by default, test the best checkpoint at the end)
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    predict on the test split
  tune       search hyperparameters with Optuna, each trial a fit; see `python -m peft_lightning tune --help`
  list       list the recipes, their domain and whether their data and weights are here
  export     write a checkpoint's adapter in the peft format (and the merged model with --merge);
             see `python -m peft_lightning export --help`
  plot       draw training curves of one run folder, or overlay several: plot RUN_DIR [RUN_DIR ...] [--out FILE]

Each run writes one folder, runs/RECIPE/YYYYmmdd-HHMMSS (under --trainer.default_root_dir): config.yaml,
metrics.csv, tensorboard/, checkpoints/ and curves.png. --quiet: no progress bar or info lines (CI logs).

Every Lightning CLI convention holds: --trainer.*, --model.*, --data.*, --finetuning.*, --checkpoint.*,
-c run.yaml, --print_config, --ckpt_path. Adapters from peft: --peft.method lora --peft.r 8 ... See `python -m peft_lightning fit --recipe NAME --help`.
Set PEFT_LIGHTNING_DEBUG=1 (or pass --debug) for full tracebacks.
"""


def _recipe_arg(argv: list[str]) -> str | None:
    """The ``--recipe`` value from the command line, else from a ``-c/--config`` YAML file."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            import yaml

            try:
                cfg = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError as err:
                raise UsageError(f"cannot parse config {path!r}: {str(err).splitlines()[0]}") from None
            if isinstance(cfg, dict):
                for sub in (cfg, *(cfg.get(c) for c in SUBCOMMANDS)):
                    if isinstance(sub, dict) and sub.get("recipe"):
                        return str(sub["recipe"])
    return None


def _make_cli_class():
    # Lightning is imported here, not at module import, so `--help` and `list` stay fast.
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from peft_lightning import engine
    from peft_lightning.adapters import AdapterConfig
    from peft_lightning.callbacks.checkpoint import ResumableCheckpoint
    from peft_lightning.callbacks.finetuning import FineTuning

    class Parser(LightningArgumentParser):
        """jsonargparse prints the whole usage (100+ lines) before a parse error; one line is enough."""

        def error(self, message: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            flat = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
            raise UsageError(f"{flat[:400]} (see `fit --recipe NAME --help`)")

    class PeftLightningCLI(LightningCLI):
        """LightningCLI bound to one recipe: its classes, its defaults, and a test of the best checkpoint after fit."""

        def __init__(self, recipe: type[FineTuneTask], recipe_name: str, **kwargs: Any) -> None:
            self.recipe = recipe
            self.recipe_name = recipe_name
            self.started = time.perf_counter()
            # Under a launcher that restarts this command (a requeued SLURM job, torchrun), the run folder is named
            # by the job, not the clock: the restart continues it (see run_key and _parse_ckpt_path).
            args = kwargs.get("args")  # a list of flags, or a dict/Namespace from a notebook
            argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else [repr(args)]
            self.run_key = run_key(os.environ, argv)
            # default_root_dir: each run gets its own folder below it, <root>/<recipe>/<timestamp> (see
            # instantiate_trainer and peft_lightning/report.py).
            trainer_defaults = {
                "callbacks": [LearningRateMonitor(logging_interval="step")],
                "default_root_dir": "runs",
                **recipe.trainer_defaults,
            }
            # A recipe's "precision": "auto" stays "auto" in --help and --print_config (the recipe's value, the same
            # on every machine); before_instantiate_classes resolves it for this machine (engine.auto_precision).
            self.run_summary = engine.RunSummary()
            trainer_defaults["callbacks"] = [*trainer_defaults["callbacks"], self.run_summary]
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
            # A checkpoint's hyperparameters fill in the model's arguments. Its adapter options fill in the
            # top-level --peft.* group (the model's `peft` is linked from it and cannot be parsed itself) when that
            # group was left off: `predict --ckpt_path` of a LoRA run needs no --peft.* flags. Flags given anyway
            # must fit the checkpoint, or the load stops with one line (FineTuneTask.on_load_checkpoint).
            from lightning.pytorch.utilities import rank_zero_info

            from peft_lightning.callbacks.checkpoint import find_resume, read_checkpoint, resolve_ckpt_path
            from peft_lightning.report import run_dir

            if not self.config.get("subcommand"):
                return
            config = self.config[self.config.subcommand]
            # `last`: the newest last.ckpt of this recipe's runs (each run has its own folder; Lightning's own
            # "last" looks only in the new run's empty one), or a fresh start when there is none yet.
            root = Path((config.get("trainer") or {}).get("default_root_dir") or "runs")
            folder = run_dir(root, self.recipe_name, key=self.run_key)
            recipe_root = folder.parent
            dirpath = (config.get("checkpoint") or {}).get("dirpath")
            # A restarted fit (requeued SLURM job, torchrun restart: same command, same keyed folder) continues its
            # own folder from the newest of Lightning's hpc_ckpt_N.ckpt and last.ckpt, whatever --ckpt_path says:
            # that flag named where the first start began. Every rank reads the same files before the rendezvous.
            resume = find_resume(folder, dirpath) if self.run_key and self.config.subcommand == "fit" else None
            if resume is not None:
                rank_zero_info(f"run folder {folder} ({self.run_key}) was started before: resuming from {resume}")
                config.ckpt_path = ckpt_path = str(resume)
            else:
                config.ckpt_path = ckpt_path = resolve_ckpt_path(
                    config.get("ckpt_path"), root=recipe_root if recipe_root.is_dir() else root, dirpath=dirpath
                )
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            ckpt = read_checkpoint(ckpt_path)  # weights_only=True: one line for a corrupt or hostile file
            hparams = dict(ckpt.get("hyper_parameters", {}))
            saved_peft = hparams.pop("peft", None)
            for key in ("_instantiator", "_class_path"):
                hparams.pop(key, None)
            given = config.get("peft")
            if (
                isinstance(saved_peft, dict)
                and saved_peft.get("method", "none") != "none"
                and (given is None or given.get("method", "none") == "none")
            ):
                self.config = self.parser.parse_object({self.config.subcommand: {"peft": saved_peft}}, self.config)
            if hparams:
                try:
                    self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
                except UsageError:
                    raise UsageError(
                        f"checkpoint {ckpt_path!r} was not written by recipe {self.recipe_name!r}: its "
                        f"model arguments ({', '.join(sorted(hparams))}) do not fit this recipe; pass the "
                        "--recipe that wrote it"
                    ) from None
            if self.config.subcommand == "fit":
                self._stop_if_finished(ckpt, ckpt_path)

        def _stop_if_finished(self, ckpt: dict[str, Any], ckpt_path: str) -> None:
            # A finished run (retune's rounds done, early stopped, max_epochs or max_steps reached) is not trained
            # again: one line and exit 0, not an error (a job script that always passes --ckpt_path last ends).
            from lightning.pytorch.utilities import rank_zero_only

            from peft_lightning.callbacks.checkpoint import ResumableCheckpoint, finished_reason

            trainer = self.config[self.config.subcommand].get("trainer") or {}
            why = finished_reason(ckpt, trainer.get("max_epochs"), trainer.get("max_steps"))
            if why is None:
                return
            state = next(
                (v for k, v in ckpt.get("callbacks", {}).items() if k.startswith(ResumableCheckpoint.__name__)), {}
            )
            best = state.get("best_model_path") or ""
            tested = best if best and Path(best).is_file() else ckpt_path
            if rank_zero_only.rank == 0:
                print(
                    f"fit: the run in {ckpt_path} has finished ({why}); nothing to train. Test it with `test "
                    f"--recipe {self.recipe_name} --ckpt_path {tested}` or start a new run without --ckpt_path"
                )
            sys.exit(0)

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
            from jsonargparse import ActionYesNo

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
            # Adapters are a model init argument (so checkpoints carry them) shown at top level as --peft.*.
            parser.add_class_arguments(AdapterConfig, "peft")
            parser.link_arguments("peft", "model.peft", compute_fn=_adapter_config)
            recipe = self.recipe
            defaults: dict[str, Any] = {
                "checkpoint.monitor": recipe.monitor,
                "checkpoint.mode": recipe.monitor_mode,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
            defaults.update({f"finetuning.{k}": v for k, v in recipe.finetuning_defaults.items()})
            defaults.update({f"data.{k}": v for k, v in recipe.data_defaults.items()})
            parser.set_defaults(defaults)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            # The run folder, its loggers and the progress bar (peft_lightning/report.py). A logger or progress bar
            # the user configured is kept as given; `--trainer.logger false` keeps the folder for checkpoints.
            import logging

            from lightning.pytorch.callbacks import ProgressBar

            from peft_lightning.report import PhaseProgressBar, RunReport, run_dir, run_loggers

            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer = config.get("trainer", {})
            self.run_dir = run_dir(trainer.get("default_root_dir") or "runs", self.recipe_name, key=self.run_key)
            kwargs.setdefault("default_root_dir", str(self.run_dir))
            if trainer.get("logger") in (None, True):
                kwargs.setdefault("logger", run_loggers(self.run_dir))
            callbacks = list(trainer.get("callbacks") or [])
            self.report = RunReport()
            callbacks.append(self.report)
            quiet = bool(config.get("quiet", False))
            if quiet:
                kwargs.setdefault("enable_progress_bar", False)
                kwargs.setdefault("enable_model_summary", False)
                for name in ("lightning.pytorch", "lightning.fabric"):
                    logging.getLogger(name).setLevel(logging.WARNING)
            elif trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                callbacks.append(PhaseProgressBar())
            kwargs.setdefault("callbacks", callbacks)
            # --trainer.strategy fsdp -> FSDPStrategy over the task's blocks; 16-mixed on a CPU stays float16.
            kwargs.update(engine.trainer_overrides(trainer, self.model))
            return super().instantiate_trainer(**kwargs)

        def before_instantiate_classes(self) -> None:
            # Before any weights or data load: a launch that cannot run here stops with one line.
            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config.get("trainer")
            if trainer is not None and trainer.get("precision") == engine.AUTO:
                # Resolved here, not at parse time: config.yaml and the start-of-fit line get this machine's
                # precision, --help and --print_config the recipe's "auto".
                self.run_summary.precision_note = engine.resolve_auto_precision(trainer, engine.detect_hardware())
            engine.check_launch(trainer or {}, config.get("model") or {}, os.environ)

        def before_fit(self) -> None:
            callback = next((c for c in self.trainer.callbacks if isinstance(c, FineTuning)), None)
            if callback is not None and callback.show_groups:
                callback.print_groups(self.model, epochs=self.trainer.max_epochs or 1)
                sys.exit(0)

        def after_fit(self) -> None:
            config = self.config[self.subcommand]
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            metrics: dict[str, float] = {}
            if not self.trainer.interrupted and config.get("test_after_fit", True):
                results = self.trainer.test(
                    self.model, datamodule=self.datamodule, ckpt_path="best" if best else None, verbose=False
                )
                metrics = results[0] if results else {}
            self._summary(metrics, best)

        def _summary(self, metrics: dict[str, float], best: str) -> None:
            from peft_lightning.report import best_validation, format_wall, print_summary, summary_rows

            wall = time.perf_counter() - self.started
            if not self.trainer.is_global_zero:
                return
            # One grep-able line first (CI logs, tests), then the table.
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("loss"))
            best_seen = best_validation(self.trainer, self.report)
            if not shown and best_seen is not None:
                shown = f"best {best_seen['metric']} {best_seen['value']:.4f}"
            stopped = "  (interrupted)" if self.trainer.interrupted else ""
            print(
                f"\n{self.recipe_name}: {shown}  wall {format_wall(wall)}"
                f"  ({'best checkpoint ' + best if best else 'final weights'}){stopped}"
            )
            print_summary(
                summary_rows(
                    self.trainer,
                    self.model,
                    recipe=self.recipe_name,
                    report=self.report,
                    test_metrics=metrics,
                    wall=wall,
                    datamodule=self.datamodule,
                )
            )

        def after_validate(self) -> None:
            self._print_run_dir()

        def after_test(self) -> None:
            self._print_run_dir()

        def after_predict(self) -> None:
            self._print_run_dir()

        def _print_run_dir(self) -> None:
            if self.trainer.is_global_zero and Path(self.run_dir).is_dir():
                print(f"run folder: {self.run_dir}")

    return PeftLightningCLI


def run_key(environ: Mapping[str, str], argv: Sequence[str]) -> str | None:
    """The run folder's name when a launcher may start this command again, else None (a timestamped folder).

    The same on every rank and node, and across a requeue: Lightning's SLURM auto-requeue writes
    ``hpc_ckpt_N.ckpt`` into the run folder and the requeued job must find it there.

    - SLURM, where Lightning uses it (``SLURM_NTASKS`` set and a job name other than ``bash``/``interactive``, as its
      ``SLURMEnvironment.detect``): ``slurm-<job id>``, ``slurm-<array job id>_<task id>`` for an array task (the id
      Lightning requeues);
    - torchrun with a rendezvous id (``--rdzv_id``; its default ``none`` names nothing): ``torchrun-<id>``;

    then a hash of the command's arguments, so that two different commands of one job (a sweep, fit then test)
    get two folders, while the same command started again gets its own back.
    """
    if "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        job = environ.get("SLURM_JOB_ID")
        if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
        key = f"slurm-{job}" if job else None
    else:
        run_id = environ.get("TORCHELASTIC_RUN_ID", "none")
        key = f"torchrun-{run_id}" if run_id not in ("", "none") else None
    if key is None:
        return None
    import hashlib

    return f"{key}-{hashlib.sha256(chr(0).join(argv).encode()).hexdigest()[:6]}"


def _adapter_config(value: Any) -> Any:
    """The linked ``--peft.*`` group as the model's ``peft`` argument (a Namespace on parse, a dataclass later)."""
    from peft_lightning.adapters import AdapterConfig

    return value if isinstance(value, AdapterConfig) or value is None else AdapterConfig(**dict(vars(value)))


def _command_parser(name: str, description: str) -> Any:
    """An argparse parser for a plain command (export, plot) whose errors are one-line UsageErrors."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # type: ignore[override]
            raise UsageError(f"{name}: {message} (see `python -m peft_lightning {name} --help`)")

    return Parser(prog=f"python -m peft_lightning {name}", description=description)


def export_command(argv: list[str]) -> None:
    parser = _command_parser(
        "export",
        "Write a checkpoint's adapter in the standard peft format (adapter_config.json + "
        "adapter_model.safetensors, loadable by PeftModel.from_pretrained) and, with --merge, the merged "
        "model (model.safetensors for timm, merged/ with save_pretrained for transformers), and README.md: a model "
        "card with the recipe, base model, data, adapter options, the checkpoint's recorded metrics and how to load "
        "it.",
    )
    parser.add_argument("--recipe", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint from fit (adapter-only or full)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="also write the model with the adapters merged in")
    args = parser.parse_args(argv)
    from peft_lightning.adapters import export, load_task
    from peft_lightning.registry import get_recipe

    task = load_task(get_recipe(args.recipe), args.ckpt_path)
    for path in export(task, args.out, merge=args.merge, recipe=args.recipe, ckpt_path=args.ckpt_path):
        print(path)


def plot_command(argv: list[str]) -> None:
    parser = _command_parser(
        "plot",
        "Training curves from run folders' metrics.csv, as a PNG. One run: loss, the monitored metric "
        "and the learning rate per layer group, with unfreeze points and re-tuning rounds marked, written "
        "to RUN_DIR/curves.png. Several runs (or a folder of runs): overlaid, written to --out.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (runs/RECIPE/TIMESTAMP), their metrics.csv, or folders holding runs",
    )
    parser.add_argument(
        "--out", help="output image (default: RUN_DIR/curves.png for one run, comparison.png for several)"
    )
    parser.add_argument("--x", choices=("step", "epoch"), default="step", help="x axis (default: step)")
    args = parser.parse_args(argv)
    from peft_lightning.plots import find_runs, plot_compare, plot_run

    runs = find_runs(args.runs)
    if len(runs) == 1:
        print(plot_run(runs[0], args.out, x=args.x))
    else:
        print(plot_compare(runs, args.out or "comparison.png", x=args.x))


def list_command() -> None:
    # Cards read from the recipes' source: no recipe (and so no torch) is imported, `list` answers in ~0.2 s.
    from peft_lightning.registry import recipe_cards

    rows = [(card.name, card.domain, *card.availability(), card.description) for card in recipe_cards()]
    width = max(len(r[0]) for r in rows)
    print(f"{'recipe':<{width}}  {'domain':<8} {'here':<5} description")
    for name, domain, ok, why, desc in rows:
        print(f"{name:<{width}}  {domain:<8} {'yes' if ok else 'no':<5} {desc}\n{'':<{width}}  {'':<8} {'':<5} ({why})")


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    import warnings

    # jsonargparse warns that it cannot dump the AdapterConfig instance the --peft.* link builds; the config it
    # saves and prints carries the --peft.* group itself, so nothing is lost.
    warnings.filterwarnings("ignore", message=r"(?s).*Unable to serialize instance AdapterConfig")
    debug = bool(os.environ.get("PEFT_LIGHTNING_DEBUG")) or "--debug" in argv or "--debug=true" in argv
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(HELP)
            return
        if argv[0] == "list":
            list_command()
            return
        if argv[0] == "export":
            export_command(argv[1:])
            return
        if argv[0] == "plot":
            plot_command(argv[1:])
            return
        if argv[0] == "tune":
            from peft_lightning.tuning import tune_command  # imports optuna: only for this command

            tune_command(argv[1:], debug=debug)
            return
        if argv[0] not in SUBCOMMANDS:
            raise UsageError(
                f"unknown command {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)}, tune, list, export, plot"
            )
        name = _recipe_arg(argv)
        if name is None:
            raise UsageError("no recipe given: pass --recipe NAME (see `python -m peft_lightning list`)")
        from peft_lightning.registry import get_recipe

        recipe = get_recipe(name)
        if not debug:  # a default run shows what this project means to show; PEFT_LIGHTNING_DEBUG=1 shows all
            from peft_lightning.report import hide_third_party_noise

            hide_third_party_noise()
        import logging

        # --quiet lowers Lightning's log level for the run; put it back for whoever runs next in this process.
        levels = {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")}
        try:
            _make_cli_class()(recipe, name, args=args)
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
    except UsageError as err:
        if debug:
            raise
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: torch wraps the message in a traceback
            message = message.strip().splitlines()[-1].split("UsageError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:
        if type(stop).__name__ != "SIGTERMException":  # Lightning's graceful stop on SIGTERM (and our SIGINT)
            raise
        import signal

        from peft_lightning.callbacks.checkpoint import stop_signal

        signum = stop_signal() or signal.SIGTERM
        print(
            f"stopped by {signal.Signals(signum).name}: last.ckpt saved; resume with the same command and "
            "--ckpt_path last",
            file=sys.stderr,
        )
        sys.exit(128 + signum)  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    except Exception as err:  # one line, not 40: the traceback is there for whoever asks
        if debug:
            raise
        if type(err).__name__ == "MisconfigurationException":  # Lightning's word for a Trainer flag it cannot honour
            flat = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            print(f"error: {flat[:400]} (see --trainer.* in `fit --recipe NAME --help`)", file=sys.stderr)
            sys.exit(2)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        if isinstance(err, ModuleNotFoundError):  # a flag whose backend is an optional package (transformer-engine)
            print(f"error: {first}: install it, or choose a setting that does not need it", file=sys.stderr)
            sys.exit(2)
        print(f"error: {type(err).__name__}: {first} (set PEFT_LIGHTNING_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
