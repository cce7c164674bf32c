"""What ``--ckpt_path`` means for a recipe's run: which file, and the arguments it brings with it.

LightningCLI calls ``_parse_ckpt_path`` between parsing and instantiating; ``PeftLightningCLI`` hands that step to
``config_from_checkpoint`` here, a plain function of the parser and the parsed config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft_lightning.errors import UsageError


class Done(SystemExit):
    """The command did what was asked without training (``--finetuning.show_groups``, a run that has finished).

    Exit status 0: ``main`` returns quietly; anyone else running the CLI class (a ``tune`` trial, a notebook) stops
    as for ``sys.exit(0)``."""

    def __init__(self) -> None:
        super().__init__(0)


def config_from_checkpoint(
    parser: Any, config: Any, *, recipe_name: str, run_key: str | None
) -> tuple[Any, str | None]:
    """``config`` with ``ckpt_path`` resolved and the checkpoint's arguments filled in, and the checkpoint a ``fit``
    has left to test (None: none).

    ``last`` is the newest ``last.ckpt`` of this recipe's runs (each run has its own folder: Lightning's own "last"
    looks only in the new run's empty one), or a fresh start when there is none. A restarted ``fit`` under a
    launcher (``run_key``: a requeued SLURM job, a torchrun restart) continues its own folder from the newest of
    Lightning's ``hpc_ckpt_N.ckpt`` and ``last.ckpt``, whatever ``--ckpt_path`` says: that flag named where the
    first start began. The checkpoint's hyperparameters fill in the model's arguments, its adapter options the
    ``--peft.*`` group when that was left off. A ``fit`` of a run that has finished prints one line and raises
    ``Done``; one whose training ended but whose test after fit did not (killed while it tested) returns the
    checkpoint that test was to use (the run's best; its final weights when it kept none): ``fit`` then tests it,
    what the first command promised.
    """
    subcommand = config.get("subcommand")
    if not subcommand:
        return config, None
    ckpt_path = resolve(config[subcommand], subcommand=subcommand, recipe_name=recipe_name, run_key=run_key)
    config[subcommand].ckpt_path = ckpt_path
    if not ckpt_path or not Path(ckpt_path).is_file():
        return config, None
    from peft_lightning.model_files.checkpoints import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)  # weights_only=True: one line for a corrupt or hostile file
    config = _fill_arguments(parser, config, ckpt, ckpt_path=ckpt_path, recipe_name=recipe_name)
    if subcommand == "fit":
        from peft_lightning.model_files.checkpoints import test_results

        trainer = config[subcommand].get("trainer") or {}
        note = finished_note(ckpt, ckpt_path, trainer=trainer, recipe_name=recipe_name)
        if note is not None:
            if config[subcommand].get("test_after_fit", True) and test_results(Path(ckpt_path).parent) is None:
                return config, tested_checkpoint(ckpt, ckpt_path)
            from lightning.pytorch.utilities import rank_zero_only

            if rank_zero_only.rank == 0:
                print(note)
            raise Done
    return config, None


def resolve(config: Any, *, subcommand: str, recipe_name: str, run_key: str | None) -> str | None:
    """The checkpoint a subcommand's ``config`` starts from (see ``config_from_checkpoint``), or None."""
    from lightning.pytorch.utilities import rank_zero_info

    from peft_lightning.model_files.checkpoints import find_resume, resolve_ckpt_path
    from peft_lightning.output.run_folder import run_dir

    root = Path((config.get("trainer") or {}).get("default_root_dir") or "runs")
    folder = run_dir(root, recipe_name, key=run_key)
    dirpath = (config.get("checkpoint") or {}).get("dirpath")
    # Every rank reads the same files before the rendezvous.
    resume = find_resume(folder, dirpath) if run_key and subcommand == "fit" else None
    if resume is not None:
        rank_zero_info(f"run folder {folder} ({run_key}) was started before: resuming from {resume}")
        return str(resume)
    recipe_root = folder.parent
    return resolve_ckpt_path(
        config.get("ckpt_path"), root=recipe_root if recipe_root.is_dir() else root, dirpath=dirpath
    )


def _fill_arguments(parser: Any, config: Any, ckpt: dict[str, Any], *, ckpt_path: str, recipe_name: str) -> Any:
    # The model's `peft` is linked from the top-level --peft.* group and cannot be parsed itself: the saved adapter
    # options go to --peft.* when that group was left off (`predict --ckpt_path` of a LoRA run needs no --peft.*
    # flags). Flags given anyway must fit the checkpoint, or the load stops with one line
    # (FineTuneTask.on_load_checkpoint).
    from peft_lightning.internals import CLI_HPARAM_KEYS

    subcommand = config.subcommand
    hparams = dict(ckpt.get("hyper_parameters", {}))
    saved_peft = hparams.pop("peft", None)
    for key in CLI_HPARAM_KEYS:  # LightningCLI's own bookkeeping, no argument of the model
        hparams.pop(key, None)
    given = config[subcommand].get("peft")
    if (
        isinstance(saved_peft, dict)
        and saved_peft.get("method", "none") != "none"
        and (given is None or given.get("method", "none") == "none")
    ):
        config = parser.parse_object({subcommand: {"peft": saved_peft}}, config)
    if hparams:
        try:
            config = parser.parse_object({subcommand: {"model": hparams}}, config)
        except UsageError:
            raise UsageError(
                f"checkpoint {ckpt_path!r} was not written by recipe {recipe_name!r}: its model arguments "
                f"({', '.join(sorted(hparams))}) do not fit this recipe; pass the --recipe that wrote it"
            ) from None
    return config


def finished_note(ckpt: dict[str, Any], ckpt_path: str, *, trainer: Any, recipe_name: str) -> str | None:
    """The line a ``fit`` prints instead of training again a run that has finished (retune's rounds done, early
    stopped, ``max_epochs`` or ``max_steps`` reached), or None: a job script that always passes ``--ckpt_path last``
    ends with exit 0, not an error."""
    from peft_lightning.model_files.checkpoints import finished_reason, test_results

    why = finished_reason(ckpt, trainer.get("max_epochs"), trainer.get("max_steps"))
    if why is None:
        return None
    done = test_results(Path(ckpt_path).parent)
    if done is not None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(done["metrics"].items()) if not k.endswith("loss"))
        return (
            f"fit: the run in {ckpt_path} has finished ({why}) and was tested ({shown or 'no metrics'}, "
            f"{done['tested']}); nothing to do. Start a new run without --ckpt_path"
        )
    tested = tested_checkpoint(ckpt, ckpt_path)
    return (
        f"fit: the run in {ckpt_path} has finished ({why}); nothing to train. Test it with `test "
        f"--recipe {recipe_name} --ckpt_path {tested}` or start a new run without --ckpt_path"
    )


def tested_checkpoint(ckpt: dict[str, Any], ckpt_path: str) -> str:
    """The checkpoint the test after a finished fit uses: its best one (what ``ckpt_path="best"`` tested in the run
    itself), else ``ckpt_path`` (the final weights: last.ckpt is written again when a fit ends)."""
    from peft_lightning.callbacks.checkpoint import ResumableCheckpoint

    state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith(ResumableCheckpoint.__name__)), {})
    best = state.get("best_model_path") or ""
    return best if best and Path(best).is_file() else ckpt_path
