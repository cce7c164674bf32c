"""What the command line and the launcher say before anything is parsed: the recipe's name, the run folder's key.

Both are plain functions of ``argv`` (and of the environment the caller passes in): ``main`` reads the recipe to
pick the LightningModule before LightningCLI parses anything, and the LightningCLI subclass names the run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from peft_lightning.errors import UsageError

SUBCOMMANDS = ("fit", "validate", "test", "predict")
"""LightningCLI's subcommands; a ``-c`` file may nest its ``recipe:`` under one of them."""


def recipe_arg(argv: list[str]) -> str | None:
    """The ``--recipe`` value from the command line, else from a ``-c/--config`` YAML file.

    Example:
        >>> recipe_arg(["fit", "--recipe", "effnet_fashion", "--trainer.max_epochs", "3"])
        'effnet_fashion'
    """
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            name = _config_recipe(Path(path))
            if name:
                return name
    return None


def _config_recipe(path: Path) -> str | None:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"cannot parse config {str(path)!r}: {str(err).splitlines()[0]}") from None
    if isinstance(cfg, dict):
        for sub in (cfg, *(cfg.get(c) for c in SUBCOMMANDS)):
            if isinstance(sub, dict) and sub.get("recipe"):
                return str(sub["recipe"])
    return None


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

    Example:
        >>> run_key({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242"}, ["fit"]).startswith("slurm-4242-")
        True
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
