"""A requeued SLURM job continues its run: Lightning's auto-requeue (SIGUSR1 before the time limit: save
``hpc_ckpt_N.ckpt`` into the trainer's default_root_dir, then ``scontrol requeue``) needs the requeued process to use
the same run folder, which the CLI names by the job (``cli.run_key``), and to resume from it.

The job is simulated: SLURM's variables in the environment (Lightning's ``SLURMEnvironment`` detects them), a fake
``scontrol`` on PATH that records its call and then kills the job with SIGKILL as SLURM does once a requeued job's
grace time is over (so only the hpc checkpoint holds the last steps), and the same command started again.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from peft_lightning.cli import main, run_key
from peft_lightning.model_files.checkpoints import find_last, find_resume, read_checkpoint
from peft_lightning.output.run_folder import run_dir, run_loggers

from conftest import ROOT, make_image_folder
from helpers import tiny_cli_args

TESTS = Path(__file__).resolve().parent
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "tiny_fit",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def fake_scontrol(folder: Path) -> Path:
    """A `scontrol` that records its arguments, then kills its caller (the training process) with SIGKILL."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\nkill -KILL $PPID\n')
    script.chmod(0o755)
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
        "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "peft_lightning", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600
    )


def test_a_requeued_slurm_job_resumes_from_its_hpc_checkpoint_in_the_same_run_folder(tmp_path, monkeypatch, caplog):
    images = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=32)
    # 24 images: 5 test, 4 val, 15 train = 4 steps of 4 per epoch; SIGUSR1 after step 6, mid-epoch 1, where the
    # newest last.ckpt (validation end of epoch 0, step 4) is older than the hpc checkpoint. `--ckpt_path last` is
    # in the command as a job script may have it: it must not win over the newer hpc checkpoint.
    common = [
        "--trainer.max_epochs",
        "2",
        "--data.augment",
        "false",
        "--trainer.deterministic",
        "true",
        "--checkpoint.last_every_minutes",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--ckpt_path",
        "last",
    ]
    reference = tmp_path / "reference"  # uninterrupted, no SLURM: in this process (no interpreter start)
    main(tiny_cli_args(images, reference, *common))
    root = tmp_path / "runs"
    args = tiny_cli_args(
        images,
        root,
        *common,
        "--trainer.callbacks+=reliability_callbacks.KillAt",
        "--trainer.callbacks.step",
        "6",
        "--trainer.callbacks.where",
        "batch_end",
        "--trainer.callbacks.signum",
        str(int(signal.SIGUSR1)),
    )
    bin_dir = fake_scontrol(tmp_path / "bin")
    env = {**SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    first = cli_process(args, env)  # its own process: the fake scontrol kills it
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert (bin_dir / "calls.txt").read_text().split() == ["requeue", "4242"]
    (folder,) = (root / "vit_cifar").iterdir()
    assert folder.name == run_key(SLURM, args) and folder.name.startswith("slurm-4242-")
    hpc = folder / "hpc_ckpt_1.ckpt"
    assert read_checkpoint(hpc)["global_step"] == 6
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 4

    # The requeued job: the same command, the same job id (in this process: the signal never comes again).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # whatever Lightning's SLURMEnvironment sets is undone afterwards
        monkeypatch.delenv(name, raising=False)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(args)
    assert f"Restored all states from the checkpoint at {hpc}" in caplog.text, caplog.text[-3000:]
    assert [p.name for p in (root / "vit_cifar").iterdir()] == [folder.name]  # the same folder, no new one
    assert (bin_dir / "calls.txt").read_text().count("requeue") == 1
    final, expected = (read_checkpoint(find_last(r)) for r in (root, reference))
    assert final["global_step"] == expected["global_step"] == 8 and final["epoch"] == expected["epoch"]
    for name, tensor in expected["state_dict"].items():  # as if never requeued
        assert torch.allclose(tensor, final["state_dict"][name], atol=1e-6), name
    # One metrics.csv, continued: the first start's rows, then the requeued one's, as the uninterrupted run logged
    # them, less the training loss of the step SIGUSR1 interrupted (index 5): Lightning logs a step's metrics after
    # on_train_batch_end, where the hpc checkpoint was written, and the restored loop counts that step as done.
    (ref_folder,) = (reference / "vit_cifar").iterdir()
    logged = {
        run: {
            (r["step"], k, v)
            for r in read_csv(run / "metrics.csv")
            for k, v in r.items()
            if v and k in ("train/loss", "val/acc", "val/loss")
        }
        for run in (folder, ref_folder)
    }
    assert logged[folder] == {row for row in logged[ref_folder] if row[:2] != ("5", "train/loss")}


def test_run_key_names_a_run_by_its_job_and_command():
    argv = ["fit", "--recipe", "vit_cifar"]
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train"}
    key = run_key(slurm, argv)
    assert key is not None and key.startswith("slurm-77-")
    assert run_key(slurm, argv) == key  # a requeue: the same name
    assert run_key(slurm, [*argv, "--model.lr", "0.1"]) != key  # another command in the same job: another folder
    array = {**slurm, "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_key(array, argv).startswith("slurm-70_3-")  # the id Lightning requeues
    assert run_key({**slurm, "SLURM_JOB_NAME": "interactive"}, argv) is None  # Lightning ignores SLURM there
    assert run_key({"TORCHELASTIC_RUN_ID": "none"}, argv) is None  # torchrun's default: no id
    assert run_key({"TORCHELASTIC_RUN_ID": "job/5"}, argv).startswith("torchrun-job/5-")
    assert run_key({}, argv) is None
    assert run_dir("runs", "vit_cifar", key="torchrun-job/5-abc") == Path("runs/vit_cifar/torchrun-job_5-abc")


def test_a_continued_run_folder_appends_to_its_metrics(tmp_path):
    first = run_loggers(tmp_path)[0]
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    again = run_loggers(tmp_path)[0]  # Lightning's CSVLogger would delete metrics.csv here
    again.log_metrics({"train/loss": 0.5, "val/acc": 0.75}, step=1)  # a new column widens the header
    again.save()
    assert read_csv(tmp_path / "metrics.csv") == [
        {"step": "0", "train/loss": "1.0", "val/acc": ""},
        {"step": "1", "train/loss": "0.5", "val/acc": "0.75"},
    ]


def test_find_resume_takes_the_newer_of_hpc_and_last(tmp_path):
    assert find_resume(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    for i, path in enumerate([tmp_path / "hpc_ckpt_2.ckpt", tmp_path / "hpc_ckpt_10.ckpt", last]):
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 + i * 10**9,) * 2)
    assert find_resume(tmp_path) == last  # trained on after the last requeue
    os.utime(tmp_path / "hpc_ckpt_10.ckpt", ns=(2 * 10**18,) * 2)
    assert find_resume(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"  # Lightning's highest N, not the 2
