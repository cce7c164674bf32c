"""The command line: LightningCLI's ``fit/validate/test/predict`` for a recipe, plus ``tune``, ``list``, ``export``
and ``plot``.

    python -m peft_lightning fit --recipe effnet_fashion --trainer.max_epochs 3
    python -m peft_lightning fit --recipe my_pkg.recipes:MyFlowers -c my_run.yaml
    python -m peft_lightning list
    python -m peft_lightning export --recipe effnet_fashion --ckpt_path last.ckpt --out adapter/ --merge
    python -m peft_lightning plot runs/effnet_fashion/20260101-120000 runs/effnet_fashion/20260102-090000

``--recipe`` picks the LightningModule (the recipe class), its LightningDataModule and their defaults; everything
else is plain LightningCLI. Modules: ``args`` (the recipe's name and the run folder's key, read before parsing),
``commands`` (``list``, ``export``, ``plot``), ``lightning_cli`` (the LightningCLI subclass, imported only for its
subcommands: ``--help`` and ``list`` never import Lightning or torch), ``resume`` (what ``--ckpt_path`` brings).
This package is the only part of peft_lightning that reads the environment (``PEFT_LIGHTNING_DEBUG``; the
launcher's job id for the run folder's name, see ``run_key``).
"""

from __future__ import annotations

import os
import sys

from peft_lightning.cli.args import SUBCOMMANDS, recipe_arg, run_key
from peft_lightning.cli.resume import Done
from peft_lightning.errors import UsageError

__all__ = ["HELP", "SUBCOMMANDS", "main", "recipe_arg", "run_key"]

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


def main(args: list[str] | None = None) -> None:
    """``python -m peft_lightning ARGS``; ``args`` instead of ``sys.argv[1:]`` from Python (a notebook, a test).

    Bad input ends with one line on stderr and exit status 2; another error with one line and 1 (the traceback
    with ``PEFT_LIGHTNING_DEBUG=1`` or ``--debug``); SIGTERM/SIGINT after saving ``last.ckpt`` with 143/130.
    """
    argv = list(sys.argv[1:] if args is None else args)
    import warnings

    # jsonargparse warns that it cannot dump the AdapterConfig instance the --peft.* link builds; the config it
    # saves and prints carries the --peft.* group itself, so nothing is lost.
    warnings.filterwarnings("ignore", message=r"(?s).*Unable to serialize instance AdapterConfig")
    debug = bool(os.environ.get("PEFT_LIGHTNING_DEBUG")) or "--debug" in argv or "--debug=true" in argv
    try:
        run(argv, args, debug=debug)
    except Done:  # show_groups printed, or the run had finished: nothing else to do
        return
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as stop:
        if not _is_sigterm(stop):  # Lightning's graceful stop on SIGTERM (and our SIGINT)
            raise
        sys.exit(_report_stop())
    except Exception as err:  # one line, not 40: the traceback is there for whoever asks
        if debug:
            raise
        message, code = one_line(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)


def run(argv: list[str], args: list[str] | None = None, *, debug: bool = False) -> None:
    """Run the command ``argv`` names; ``args`` is what ``main`` was given (None: the real command line)."""
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help"):
        print(HELP)
    elif command in ("list", "export", "plot"):
        from peft_lightning.cli import commands

        getattr(commands, f"{command}_command")(argv[1:])
    elif command == "tune":
        from peft_lightning.tuning import tune_command  # imports optuna: only for this command

        tune_command(argv[1:], debug=debug)
    elif command in SUBCOMMANDS:
        _run_lightning_cli(argv, args, debug=debug)
    else:
        raise UsageError(f"unknown command {command!r}: use one of {', '.join(SUBCOMMANDS)}, tune, list, export, plot")


def _run_lightning_cli(argv: list[str], args: list[str] | None, *, debug: bool) -> None:
    name = recipe_arg(argv)
    if name is None:
        raise UsageError("no recipe given: pass --recipe NAME (see `python -m peft_lightning list`)")
    from peft_lightning.registry import get_recipe

    recipe = get_recipe(name)
    if not debug:  # a default run shows what this project means to show; PEFT_LIGHTNING_DEBUG=1 shows all
        from peft_lightning.output.summary import hide_third_party_noise

        hide_third_party_noise()
    from peft_lightning.cli.lightning_cli import PeftLightningCLI

    PeftLightningCLI(recipe, name, args=args)


def one_line(err: Exception) -> tuple[str, int]:
    """What ``main`` prints for an error (after ``error: ``) and its exit status: 2 for bad input, else 1."""
    if isinstance(err, UsageError):
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: torch wraps the message in a traceback
            message = message.strip().splitlines()[-1].split("UsageError: ", 1)[-1]
        return message, 2
    if _is_misconfiguration(err):  # Lightning's word for a Trainer flag it cannot honour
        flat = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        return f"{flat[:400]} (see --trainer.* in `fit --recipe NAME --help`)", 2
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Does not validate against any of the Union subtypes"):
        # jsonargparse's words when a class given by the user (`--trainer.logger MLFlowLogger`) raised in its
        # __init__: the class's own reason is listed under "Errors:".
        reasons = [line[2:] for line in lines if line.startswith("- ")]
        return f"a class given on the command line could not be built: {(reasons or lines)[0][:300]}", 2
    first = (lines or [""])[0][:300]
    if isinstance(err, ModuleNotFoundError):  # a flag whose backend is an optional package (transformer-engine)
        return f"{first}: install it, or choose a setting that does not need it", 2
    return f"{type(err).__name__}: {first} (set PEFT_LIGHTNING_DEBUG=1 for the traceback)", 1


# Lightning's exceptions are matched by class, imported only when Lightning is loaded: if it is not, it raised
# nothing, and `--help`, `list`, `export --help` stay fast.
def _is_sigterm(stop: SystemExit) -> bool:
    if "lightning.pytorch" not in sys.modules:
        return False
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(stop, SIGTERMException)


def _is_misconfiguration(err: Exception) -> bool:
    if "lightning.fabric" not in sys.modules:
        return False
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(err, MisconfigurationException)


def _report_stop() -> int:
    import signal

    from peft_lightning.callbacks.checkpoint import stop_signal

    signum = stop_signal() or signal.SIGTERM
    print(
        f"stopped by {signal.Signals(signum).name}: last.ckpt saved; resume with the same command and --ckpt_path last",
        file=sys.stderr,
    )
    return 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
