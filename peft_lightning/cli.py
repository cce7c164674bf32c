"""The command line: LightningCLI's ``fit/validate/test/predict`` for a recipe, plus ``list``.

    python -m peft_lightning fit --recipe effnet_fashion --trainer.max_epochs 3
    python -m peft_lightning fit --recipe my_pkg.recipes:MyFlowers -c my_run.yaml
    python -m peft_lightning list
    python -m peft_lightning export --recipe effnet_fashion --ckpt_path last.ckpt --out adapter/ --merge

``--recipe`` picks the LightningModule (the recipe class), its LightningDataModule and their defaults; everything
else is plain LightningCLI. This module is the only one that reads the environment (``PEFT_LIGHTNING_DEBUG``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.tasks.base import FineTuneTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP = """usage: python -m peft_lightning {fit,validate,test,predict,list,export} [--recipe NAME] [options]

Fine-tune pretrained models with recipes on Lightning.

commands:
  fit        train (and, by default, test the best checkpoint at the end)
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    predict on the test split
  list       list the recipes, their domain and whether their data and weights are here
  export     write a checkpoint's adapter in the peft format (and the merged model with --merge);
             see `python -m peft_lightning export --help`

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
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from peft_lightning.adapters import AdapterConfig
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
            trainer_defaults = {"callbacks": [LearningRateMonitor(logging_interval="step")],
                                **recipe.trainer_defaults}
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
            # A checkpoint's hyperparameters fill in the model's arguments, except `peft`: it is linked from the
            # top-level --peft.* group (a link target cannot be re-parsed), so that group must say it again;
            # a mismatch stops with a message naming the flags (FineTuneTask.on_load_checkpoint).
            import torch

            ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            try:
                ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            except Exception as err:
                raise UsageError(f"cannot read checkpoint {ckpt_path!r} ({type(err).__name__}): it is corrupt, "
                                 "truncated or not a Lightning checkpoint") from None
            hparams = dict(ckpt.get("hyper_parameters", {}))
            for key in ("_instantiator", "_class_path", "peft"):
                hparams.pop(key, None)
            if hparams:
                self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--recipe", type=str, default=self.recipe_name,
                                help="built-in recipe name or package.module:Class (see `list`)")
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="after fit, test the best checkpoint and print the test metrics")
            parser.add_argument("--debug", type=bool, default=False, help="show full tracebacks on errors")
            parser.add_lightning_class_args(FineTuning, "finetuning")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

        def before_fit(self) -> None:
            callback = next((c for c in self.trainer.callbacks if isinstance(c, FineTuning)), None)
            if callback is not None and callback.show_groups:
                callback.lr_decay = callback.lr_decay  # groups print with their LR scales
                callback.print_groups(self.model)
                sys.exit(0)

        def after_fit(self) -> None:
            config = self.config[self.subcommand]
            if self.trainer.interrupted or not config.get("test_after_fit", True):
                return
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                                        verbose=False)
            metrics = results[0] if results else {}
            wall = time.perf_counter() - self.started
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("loss"))
            if self.trainer.is_global_zero:
                print(f"\n{self.recipe_name}: {shown}  wall {wall / 60:.0f}m{wall % 60:02.0f}s"
                      f"  ({'best checkpoint ' + best if best else 'final weights'})")

    return PeftLightningCLI


def _adapter_config(value: Any) -> Any:
    """The linked ``--peft.*`` group as the model's ``peft`` argument (a Namespace on parse, a dataclass later)."""
    from peft_lightning.adapters import AdapterConfig

    return value if isinstance(value, AdapterConfig) or value is None else AdapterConfig(**dict(vars(value)))


def export_command(argv: list[str]) -> None:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # type: ignore[override]
            raise UsageError(f"export: {message} (see `python -m peft_lightning export --help`)")

    parser = Parser(
        prog="python -m peft_lightning export",
        description="Write a checkpoint's adapter in the standard peft format (adapter_config.json + "
                    "adapter_model.safetensors, loadable by PeftModel.from_pretrained) and, with --merge, the merged "
                    "model (model.safetensors for timm, merged/ with save_pretrained for transformers).")
    parser.add_argument("--recipe", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint from fit (adapter-only or full)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="also write the model with the adapters merged in")
    args = parser.parse_args(argv)
    from peft_lightning.adapters import export, load_task
    from peft_lightning.registry import get_recipe

    task = load_task(get_recipe(args.recipe), args.ckpt_path)
    for path in export(task, args.out, merge=args.merge):
        print(path)


def list_command() -> None:
    from peft_lightning.registry import list_recipes

    rows = [(name, cls.domain, *cls.availability(), cls.description) for name, cls in list_recipes()]
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
        if argv[0] not in SUBCOMMANDS:
            raise UsageError(f"unknown command {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)}, list, export")
        name = _recipe_arg(argv)
        if name is None:
            raise UsageError("no recipe given: pass --recipe NAME (see `python -m peft_lightning list`)")
        from peft_lightning.registry import get_recipe

        recipe = get_recipe(name)
        _make_cli_class()(recipe, name, args=args)
    except UsageError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # one line, not 40: the traceback is there for whoever asks
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(err).__name__}: {first} (set PEFT_LIGHTNING_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
