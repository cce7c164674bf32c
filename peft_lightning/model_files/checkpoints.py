"""Checkpoint files on disk: which one a run continues from, reading one safely, and whether its fit is finished.

``find_last`` and ``find_resume`` find a run folder's newest ``last*.ckpt`` and SLURM's ``hpc_ckpt_N.ckpt``;
``resolve_ckpt_path`` turns ``--ckpt_path last`` into a file; ``read_checkpoint`` reads one with ``weights_only=True``
and stops with one line for a damaged or hostile file (``names_code`` tells which); ``finished_reason`` says whether
the fit saved in one has anything left to train, and ``test_results`` whether the test after it ended (a fit whose
training ended but whose test was killed is not done). ``callbacks/checkpoint.py``'s ``ResumableCheckpoint`` writes
the checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from peft_lightning.errors import UsageError

TEST_RESULTS = "test_results.json"
"""Written beside ``last.ckpt`` when the test after ``fit`` has ended: the checkpoint it tested and its metrics."""


def write_test_results(folder: str | os.PathLike, tested: str, metrics: dict[str, float]) -> Path:
    """Record that the test after ``fit`` ended (``TEST_RESULTS`` in ``folder``, the checkpoints' folder), written
    whole or not at all."""
    path = Path(folder) / TEST_RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps({"tested": tested, "metrics": metrics}, indent=1))
    os.replace(part, path)
    return path


def test_results(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What ``write_test_results`` recorded in ``folder``, or None when the test after fit has not ended there."""
    path = Path(folder) / TEST_RESULTS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_last(root: str | os.PathLike, dirpath: str | None = None) -> Path | None:
    """The newest ``last*.ckpt`` of a run: in ``dirpath`` when set, else in any ``checkpoints`` folder under
    ``root`` (``lightning_logs/version_N/checkpoints``: a resumed run logs to a new version, so Lightning's own
    ``ckpt_path="last"``, which looks in the new version's empty folder, would start over)."""
    if dirpath:
        found = [p for p in Path(dirpath).glob("last*.ckpt") if p.is_file()]
    else:
        found = [p for p in Path(root).rglob("last*.ckpt") if p.is_file() and p.parent.name == "checkpoints"]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def find_resume(folder: str | os.PathLike, dirpath: str | None = None) -> Path | None:
    """The checkpoint a restarted run continues its own run ``folder`` from: the newer of Lightning's highest
    ``folder/hpc_ckpt_N.ckpt`` (written on SLURM's SIGUSR1 before the requeue; what Lightning itself resumes from,
    ``_CheckpointConnector._hpc_resume_path``, see ``internals.MIRRORED``) and the ``last*.ckpt`` in ``dirpath``
    or ``folder/checkpoints``. Newer, not always hpc: SLURM's SIGTERM after the requeue makes the graceful stop
    write ``last.ckpt`` at the end of the step the hpc checkpoint interrupted, and an hpc checkpoint of an earlier
    requeue is older than the ``last.ckpt`` of the training since. A tie goes to hpc. None: nothing to continue."""
    folder = Path(folder)
    numbered = [
        (int(m.group(1)), p)
        for p in folder.glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name)) and p.is_file()
    ]
    found = [max(numbered)[1]] if numbered else []
    last = find_last(folder, dirpath)
    if last is not None:
        found.append(last)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("hpc_ckpt_")), default=None)


def resolve_ckpt_path(value: str | None, *, root: str | os.PathLike, dirpath: str | None = None) -> str | None:
    """``--ckpt_path`` as a file: ``last`` becomes the newest ``last*.ckpt`` under ``root`` (or ``dirpath``), or
    None when there is none yet (a job can always pass ``--ckpt_path last``: its first run starts fresh). Other
    names Lightning resolves itself (``best``, ``hpc``, URLs) pass through; a missing file stops with one line."""
    if value is None:
        return None
    if value == "last":
        found = find_last(root, dirpath)
        if found is None:
            rank_zero_info(f"--ckpt_path last: no last.ckpt under {dirpath or root} yet: starting a new run")
        return str(found) if found else None
    if value in ("best", "hpc") or "://" in value or Path(value).is_file():
        return value
    raise UsageError(
        f"checkpoint {value!r} does not exist: pass a .ckpt file written by fit, or `last` for the "
        f"newest last.ckpt under {root}"
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents read safely (``weights_only=True``: tensors and plain containers, no code runs),
    or one line saying why the file cannot be used."""
    import pickle

    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # A file that names Python callables to run is refused; anything else is damaged bytes.
        if "unsupported global" in str(err).lower() or names_code(path):
            raise UsageError(
                f"checkpoint {str(path)!r} holds Python objects that safe loading (weights_only=True) "
                "refuses to run: use only checkpoints written by peft_lightning or from a source you "
                "trust"
            ) from None
        raise UsageError(
            f"cannot read checkpoint {str(path)!r} (UnpicklingError): it is corrupt, truncated or not a "
            "Lightning checkpoint"
        ) from None
    except Exception as err:
        raise UsageError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}): it is corrupt, truncated or "
            "not a Lightning checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(
            f"{str(path)!r} is not a Lightning checkpoint (no state_dict): pass a .ckpt written by fit; "
            "plain weights go to --model.checkpoint_path"
        )
    return ckpt


def names_code(path: str | os.PathLike) -> bool:
    """Whether a pickle (plain, or the ``data.pkl`` of a torch zip file) imports anything beyond torch's and
    Python's plain containers: what a hostile file needs to run code on load. Read with ``pickletools``, which
    walks the opcodes without executing any.

    Not ``torch.serialization.get_unsafe_globals_in_checkpoint``: it reads only ``torch.save`` zip files (a plain
    pickle raises ``ValueError``), and a plain pickle of protocol 0 or 4 is exactly the hostile file whose
    ``weights_only`` error says "Unsupported operand" instead of naming the global (torch 2.14); for zip files
    ``torch.load``'s own message already names it. Its verdicts also differ: numpy arrays are "unsafe" to it."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = next((z.read(n) for n in z.namelist() if n.endswith("data.pkl")), b"")
        else:
            data = Path(path).read_bytes()
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):
                module = str(arg).split(" ")[0]
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module = strings[-2]
            else:
                continue
            if module.split(".")[0] not in ("torch", "collections", "numpy", "_codecs"):
                return True
    except Exception:  # not a readable pickle at all: damaged, not hostile
        return False
    return False


def finished_reason(ckpt: dict[str, Any], max_epochs: int | None = None, max_steps: int | None = -1) -> str | None:
    """Why the fit saved in ``ckpt`` has nothing left to train under these ``--trainer.max_*`` limits, or None.

    Finished means: saved after its last epoch's end (``ResumableCheckpoint`` writes ``last.ckpt`` again when a fit
    ends) with a callback's stop recorded (retune's rounds done, early stopping), or with ``max_epochs`` epochs
    done, or ``max_steps`` steps. The limits are this command's: a larger ``max_epochs`` continues a run that
    ended at its old one."""
    from peft_lightning.callbacks.checkpoint import ResumableCheckpoint  # its state holds the recorded stop

    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = int(progress.get("processed", 0))
    after_epoch_end = epochs == int(progress.get("started", -1))
    state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith(ResumableCheckpoint.__name__)), {})
    if after_epoch_end and state.get("stopped"):
        return str(state["stopped"])
    steps = -1 if max_steps is None else max_steps
    if steps >= 0 and int(ckpt.get("global_step", 0)) >= steps:
        return f"max_steps {steps} reached"
    if max_epochs is None:  # Lightning's default
        max_epochs = 1000 if steps == -1 else -1
    if after_epoch_end and 0 <= max_epochs <= epochs:
        return f"max_epochs {max_epochs} reached"
    return None
