"""Reliability: a run killed at a random step resumes to the same weights and metrics; SIGTERM/SIGINT stop with a
resumable checkpoint; checkpoint writes are never torn; a non-finite loss stops before it spoils anything.

The kill/resume tests run the CLI as a user would, in processes that a callback (tests/reliability_callbacks.py)
kills with SIGKILL in the middle of an optimizer step (or at any other point of a run), or signals with SIGTERM /
SIGINT; the uninterrupted reference is such a process too (same threads, same fresh start). Each is forked from a
server that has imported torch and Lightning (helpers.forked_cli): a run takes seconds. Tiny EfficientNet at 32 px,
8-20 steps: the point is the bookkeeping, not the model.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_lightning.data.sampling import EpochShuffle
from peft_lightning.errors import UsageError
from peft_lightning.model_files.checkpoints import find_last, read_checkpoint, resolve_ckpt_path

from conftest import ROOT, make_image_folder
from helpers import forked_cli, tiny_cli_args

SEED = int(os.environ.get("RELIABILITY_SEED", random.randrange(10_000)))  # printed in every failure message


def run_args(folder: Path, root: Path, *extra: str, epochs: int = 3) -> list[str]:
    # 24 images: 5 carved for test, 4 for val, 15 train = 4 steps of 4 per epoch. The prefix cache is off: its rows
    # are computed in one batch and read in another, equal to the uncached ones only to float tolerance (here the
    # last batch, 3 images, first differed in the last bits), which AdamW turns into visible differences over
    # epochs; these tests compare weights to 1e-6 (tests/test_prefix_cache.py compares cached runs, resumed or not).
    return tiny_cli_args(
        folder,
        root,
        "--model.optimizer",
        "adamw",
        "--model.lr",
        "1e-2",
        "--model.warmup",
        "0",
        "--data.augment",
        "false",
        "--finetuning.cache_features",
        "false",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.deterministic",
        "true",
        "--checkpoint.last_every_n_train_steps",
        "3",
        "--trainer.callbacks+=reliability_callbacks.RecordMetrics",
        "--trainer.callbacks.path",
        str(root / "metrics.jsonl"),
        *extra,
    )


def kill_args(step: int, where: str = "optimizer_step", signum: int = signal.SIGKILL) -> list[str]:
    return [
        "--trainer.callbacks+=reliability_callbacks.KillAt",
        "--trainer.callbacks.step",
        str(step),
        "--trainer.callbacks.where",
        where,
        "--trainer.callbacks.signum",
        str(int(signum)),
    ]


def subprocess_cli(args: list[str]) -> subprocess.CompletedProcess:
    # A fresh process, forked from a server that imported torch and Lightning once (seconds instead of ~8 each).
    return forked_cli(args)


def final_state(root: Path) -> dict:
    last = find_last(root)
    assert last is not None, f"no last.ckpt under {root}"
    return read_checkpoint(last)


def last_save_before(step: int) -> int:
    """The step of the newest last.ckpt a SIGKILL in the middle of step ``step + 1`` leaves: written every 3 steps
    (``--checkpoint.last_every_n_train_steps 3``) and after each validation (every 4 steps, at epoch ends)."""
    return max(s for s in range(1, step + 1) if s % 3 == 0 or s % 4 == 0)


def metrics_by_step(root: Path) -> dict[int, dict]:
    # The validations (rows with an epoch; RecordMetrics(weights=True) adds a row per training step too).
    return {row["step"]: row for row in recorded(root) if "epoch" in row}


def recorded(root: Path) -> list[dict]:
    """RecordMetrics' rows: the history of the checkpoints the run's last process descends from."""
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, resumed: Path, why: str) -> None:
    a, b = final_state(reference), final_state(resumed)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"], why
    assert a["state_dict"].keys() == b["state_dict"].keys(), why
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor.float(), b["state_dict"][name].float(), atol=1e-6), f"{name} ({why})"
    assert metrics_by_step(reference) == metrics_by_step(resumed), why


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("reliability") / "imgs", classes=3, per_class=8, size=32)


# --- the pieces, in process -----------------------------------------------------------------------------------
def test_epoch_shuffle_resumes_mid_epoch_with_the_rest_of_the_same_order():
    full = EpochShuffle(20, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = EpochShuffle(20, seed=3)
    resumed.resume(epoch=2, samples=8)
    resumed.set_epoch(2)  # Lightning's call before the epoch
    assert list(resumed) == order[8:]
    assert list(resumed) == order  # only once: the next pass of that epoch is whole
    other = EpochShuffle(20, seed=3)
    other.resume(epoch=2, samples=20)  # saved at the end of epoch 2: epoch 3 starts whole
    other.set_epoch(3)
    full.set_epoch(3)
    assert list(other) == list(full)


def test_ckpt_path_last_finds_the_newest_last_checkpoint_of_any_run(tmp_path):
    old = tmp_path / "vit_cifar" / "20260101-000000" / "checkpoints" / "last.ckpt"
    new = tmp_path / "vit_cifar" / "20260102-000000" / "checkpoints" / "last.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    (tmp_path / "vit_cifar" / "20260102-000000" / "checkpoints" / "best-epoch00-step4.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", root=tmp_path / "vit_cifar") == str(new)
    assert resolve_ckpt_path("last", root=tmp_path / "vit_cifar", dirpath=str(old.parent)) == str(old)
    assert resolve_ckpt_path("last", root=tmp_path / "nothing_yet") is None  # a first run starts fresh
    assert resolve_ckpt_path(str(old), root=tmp_path) == str(old)
    with pytest.raises(UsageError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "typo.ckpt"), root=tmp_path)


ATOMIC_KILL = """
import io, os, signal, sys, torch
from peft_lightning.callbacks.checkpoint import AtomicCheckpointIO
path, writer = sys.argv[1], AtomicCheckpointIO()
writer.save_checkpoint({"step": 1, "w": torch.ones(50_000)}, path)
real_save = torch.save

def dying_save(obj, f, *args, **kwargs):  # the machine dies halfway through writing the next checkpoint
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
writer.save_checkpoint({"step": 2, "w": torch.zeros(50_000)}, path)
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    res = subprocess.run(
        [sys.executable, "-c", ATOMIC_KILL, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    good = torch.load(path, weights_only=True)
    assert good["step"] == 1 and torch.equal(good["w"], torch.ones(50_000))
    # The torn half lies in a temp file beside it, never under the checkpoint's name.
    assert [p.name.startswith(".last.ckpt.") for p in path.parent.iterdir() if p != path] == [True]


def test_a_truncated_checkpoint_stops_with_one_line(tmp_path, folder, cli):
    root = tmp_path / "run"
    code, _, err = cli(*run_args(folder, root, epochs=1))
    assert code == 0, err[-3000:]
    last = find_last(root)
    data = last.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 3])
    code, _, err = cli(*run_args(folder, tmp_path / "again"), "--ckpt_path", str(cut))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint '{cut}'")
    assert last.read_bytes() == data  # the good one is untouched


def test_nonfinite_loss_stops_before_it_spoils_the_last_good_checkpoint(tmp_path, folder, cli):
    root = tmp_path / "run"
    args = run_args(folder, root, "--model.nan_at_step", "7", epochs=3)
    args[args.index("vit_cifar")] = "reliability_callbacks:NanAt"
    code, _, err = cli(*args)
    last_line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert last_line.startswith("error: the training loss is nan at epoch 1, step 7") and "--model.lr" in last_line
    ckpt = final_state(root)  # written at step 6 (every 3 steps), before the NaN
    assert ckpt["global_step"] == 6
    assert all(t.isfinite().all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert str(find_last(root)) in last_line  # the message names the checkpoint to resume from


@pytest.mark.slow
def test_memory_stays_flat_over_epochs(tmp_path, folder, cli):
    """Twelve epochs with validation, checkpoints, the CSV and TensorBoard loggers, the LR monitor and cached
    features: after the first epochs (the cache filled, the allocator warm) no epoch leaves tensors or memory
    behind. A leak of one tensor per epoch would add 8; a leaked batch of activations, megabytes."""
    root = tmp_path / "run"
    probe = root / "memory.jsonl"
    code, _, err = cli(
        *run_args(folder, root, "--finetuning.strategy", "head", "--finetuning.cache_features", "true", epochs=12),
        "--trainer.callbacks+=reliability_callbacks.MemoryProbe",
        "--trainer.callbacks.path",
        str(probe),
    )
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in probe.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(12))
    settled, last = rows[3], rows[-1]
    assert last["tensors"] - settled["tensors"] < 8, rows  # 8 epochs later: not one tensor per epoch
    assert last["rss_mib"] - settled["rss_mib"] < 24, rows


# --- kills and signals, in subprocesses -------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_an_unfreeze_phase_with_adapter_only_checkpoints(tmp_path, folder):
    """LoRA (checkpoints hold only adapters, head and buffers) with freeze_unfreeze: SIGKILL mid-step at a random
    step after the unfreeze, then SIGTERM (a pre-emption) in the resumed run; the twice-resumed run ends as the
    uninterrupted one, weight for weight and metric for metric."""
    extra = [
        "--peft.method",
        "lora",
        "--peft.r",
        "4",
        "--finetuning.strategy",
        "FreezeUnfreeze",
        "--finetuning.strategy.at_epoch",
        "1",
    ]
    reference = tmp_path / "reference"  # a process like the interrupted ones: same threads, same start
    res = subprocess_cli(run_args(folder, reference, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "adapter_only" in final_state(reference)
    rng = random.Random(SEED)
    kill_step = rng.randrange(5, 9)  # epoch 1 (steps 4-7): after the unfreeze, mid-epoch
    why = f"SIGKILL at step {kill_step} (RELIABILITY_SEED={SEED})"
    run = tmp_path / "run"
    res = subprocess_cli(run_args(folder, run, *extra, *kill_args(kill_step)))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert final_state(run)["global_step"] == last_save_before(kill_step)  # the work since then is lost
    term_step = rng.randrange(kill_step + 1, 12)
    res = subprocess_cli(
        run_args(folder, run, *extra, "--ckpt_path", "last", *kill_args(term_step, "batch_end", signal.SIGTERM))
    )
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: last.ckpt saved")
    assert "Traceback" not in res.stderr
    assert final_state(run)["global_step"] == term_step  # a graceful stop loses nothing
    res = subprocess_cli(run_args(folder, run, *extra, "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run, why + f", SIGTERM at step {term_step}")


@pytest.mark.slow
def test_sigint_and_sigkill_during_retune_rounds(tmp_path, folder):
    """retune: Ctrl+C (SIGINT) in round 0 stops gracefully; SIGKILL mid-step in a later round; the resumed run ends
    with the uninterrupted run's weights, metrics and round history."""
    extra = [
        "--finetuning.strategy",
        "Retune",
        "--finetuning.monitor",
        "val/loss",
        "--finetuning.mode",
        "min",
        "--finetuning.strategy.round_epochs",
        "2",
        "--finetuning.strategy.patience",
        "1",
        "--finetuning.strategy.per_round",
        "3",
        "--finetuning.strategy.max_rounds",
        "3",
    ]
    reference = tmp_path / "reference"
    res = subprocess_cli(run_args(folder, reference, *extra, epochs=5))
    assert res.returncode == 0, res.stderr[-3000:]
    history = next(v for k, v in final_state(reference)["callbacks"].items() if k.startswith("FineTuning"))["history"]
    round0_steps = history[0]["epochs"] * 4
    assert len(history) >= 2, history
    rng = random.Random(SEED)
    int_step = rng.randrange(1, round0_steps)
    kill_step = rng.randrange(round0_steps + 1, round0_steps + 8)  # inside round 1
    why = f"SIGINT at step {int_step}, SIGKILL at step {kill_step} (RELIABILITY_SEED={SEED})"
    run = tmp_path / "run"
    res = subprocess_cli(run_args(folder, run, *extra, *kill_args(int_step, "batch_end", signal.SIGINT), epochs=5))
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("stopped by SIGINT: last.ckpt saved"), why
    assert final_state(run)["global_step"] == int_step, why
    res = subprocess_cli(run_args(folder, run, *extra, "--ckpt_path", "last", *kill_args(kill_step), epochs=5))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    res = subprocess_cli(run_args(folder, run, *extra, "--ckpt_path", "last", epochs=5))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run, why)
    resumed_history = next(v for k, v in final_state(run)["callbacks"].items() if k.startswith("FineTuning"))
    assert [(r["groups"], r["epochs"], r["best"]) for r in resumed_history["history"]] == [
        (r["groups"], r["epochs"], r["best"]) for r in history
    ], why


# Every moment a SIGKILL can strike a run of 2 epochs of 4 steps, in order, as KillAt's (where, global step): inside
# each step (the newest last.ckpt is then the previous step's: one is written after every step here), and at each
# epoch's end at the start and at the end of its validation (before the validation-end save; the epoch's last step
# saves there, not before) and between that save and the epoch-end one.
KILL_POINTS = [
    *(("optimizer_step", s) for s in range(4)),
    ("validation", 4),
    ("validation_end", 4),
    ("epoch_end", 4),
    *(("optimizer_step", s) for s in range(4, 8)),
    ("validation", 8),
    ("validation_end", 8),
    ("epoch_end", 8),
]
STRATEGIES = {
    "retune": [
        "--finetuning.strategy",
        "Retune",
        "--finetuning.strategy.round_epochs",
        "1",
        "--finetuning.monitor",
        "val/loss",
        "--finetuning.mode",
        "min",
    ],  # a round per epoch: a decision at every validation
    "gradual": ["--finetuning.strategy", "Gradual", "--finetuning.strategy.at_epoch", "1"],
}


def saved_before(where: str, step: int) -> int | None:
    """The step of the newest last.ckpt a kill at KillAt's (where, step) leaves, with a last.ckpt every step."""
    if where == "optimizer_step":  # inside step `step + 1`
        return step or None
    return step - 1 if where in ("validation", "validation_end") else step


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_sigkill_at_any_point_of_a_run_resumes_exactly(tmp_path, folder, strategy):
    """One run killed at every point of KILL_POINTS in turn, each kill in the process resumed (`--ckpt_path last`)
    after the one before, ends as the uninterrupted run: weights, the validations (none skipped or run twice) and a
    digest of the weights after every step. Between two kills, the newest checkpoint's history must be the
    uninterrupted run's so far, which names the resume that went wrong."""

    def args(root: Path, *extra: str) -> list[str]:
        return run_args(
            folder,
            root,
            "--trainer.callbacks.weights",
            "true",
            *STRATEGIES[strategy],
            "--checkpoint.last_every_n_train_steps",
            "1",
            *extra,
            epochs=2,
        )

    reference = tmp_path / "reference"
    res = forked_cli(args(reference))
    assert res.returncode == 0, res.stderr[-3000:]
    history = recorded(reference)
    run, before, saved = tmp_path / "run", "none", []
    for where, step in KILL_POINTS:
        point = f"{where} at step {step}"
        res = forked_cli(args(run, "--ckpt_path", "last", *kill_args(step, where)))
        why = f"{strategy}, resumed after the kill at {before}, killed at {point}"
        assert res.returncode == -signal.SIGKILL, f"{why}: the run did not get there\n{res.stderr[-1500:]}"
        last = find_last(run)
        ckpt = read_checkpoint(last) if last is not None else None
        rows = ckpt["callbacks"]["RecordMetrics"]["rows"] if ckpt else []
        assert rows == history[: len(rows)], why
        saved.append(ckpt["global_step"] if ckpt else None)
        before = point
    res = forked_cli(args(run, "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    why = f"{strategy}, resumed after the kill at {before}"
    assert_same_run(reference, run, why)
    assert recorded(run) == history, why
    # What each kill lost: the step in flight, or the epoch's last step until its validation ended.
    assert saved == [saved_before(where, step) for where, step in KILL_POINTS], strategy
    res = forked_cli(args(run, "--ckpt_path", "last"))  # finished: nothing more to train
    assert res.returncode == 0 and res.stdout.startswith("fit: the run in "), res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_a_signal_in_an_epochs_last_step_or_its_validation_stops_when_that_validation_ends(tmp_path, folder):
    """Lightning stops at the next validation batch and a checkpoint from there resumes as if the epoch had ended
    (its validation, and retune's round decision, skipped): SIGTERM in an epoch's last step and SIGINT at the start
    of a validation (of 2 batches here) stop once it ended, with its validation in last.ckpt; the twice-resumed run
    ends as the uninterrupted one."""
    extra = [*STRATEGIES["retune"], "--data.eval_batch_size", "2"]
    reference = tmp_path / "reference"
    res = forked_cli(run_args(folder, reference, *extra, epochs=3))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    for signum, where, step, validated in (
        (signal.SIGTERM, "optimizer_step", 3, 4),
        (signal.SIGINT, "validation", 8, 8),
    ):
        res = forked_cli(
            run_args(folder, run, *extra, "--ckpt_path", "last", *kill_args(step, where, signum), epochs=3)
        )
        assert res.returncode == 128 + signum, res.stderr[-3000:]
        rows = final_state(run)["callbacks"]["RecordMetrics"]["rows"]
        assert final_state(run)["global_step"] == validated and rows[-1]["step"] == validated, rows
    res = forked_cli(run_args(folder, run, *extra, "--ckpt_path", "last", epochs=3))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run, "SIGTERM in the last step of epoch 0, SIGINT in the validation of epoch 1")
    assert recorded(run) == recorded(reference)


@pytest.mark.slow
def test_a_resumed_run_keeps_its_best_checkpoint_and_a_finished_run_is_not_trained_again(tmp_path, folder):
    """retune in rounds of one epoch, at most 2: the run stops after epoch 1 of max_epochs 4. A SIGKILL in epoch 1,
    after the best checkpoint (it monitors the epoch, mode min: epoch 0's is the best, whatever the data), and the
    resume into a new run folder: the summary's best validation and the checkpoint tested after fit are both
    epoch 0's, in the first folder. Then `fit --ckpt_path last` of the finished run says so in one line (exit 0) and
    trains nothing."""

    def args(*extra: str) -> list[str]:
        return run_args(
            folder,
            tmp_path,
            "--finetuning.strategy",
            "Retune",
            "--finetuning.strategy.round_epochs",
            "1",
            "--finetuning.strategy.max_rounds",
            "2",
            "--checkpoint.monitor",
            "epoch",
            "--checkpoint.mode",
            "min",
            "--test_after_fit",
            "true",
            *extra,
            epochs=4,
        )

    res = forked_cli(args(*kill_args(5)))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    best = next(tmp_path.glob("vit_cifar/*/checkpoints/best-epoch00-step4.ckpt"))
    res = res_fit = forked_cli(args("--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    tested = re.search(r"\(best checkpoint (\S+)\)", res.stdout)
    shown = re.search(r"best validation\s*│\s*epoch ([\d.]+) \(epoch (\d+), step (\d+)\)", res.stdout)
    assert tested and shown, res.stdout[-3000:]
    assert tested[1] == str(best) and shown.groups() == ("0.0000", "0", "4"), res.stdout[-3000:]
    last = find_last(tmp_path)
    assert final_state(tmp_path)["global_step"] == 8  # stopped by retune after epoch 1, not by max_epochs
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    res = forked_cli(args("--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    shown = result_line(res_fit.stdout)
    assert res.stdout.strip().splitlines() == [
        f"fit: the run in {last} has finished (its re-tuning rounds are done) and was tested ({shown}, {best}); "
        "nothing to do. Start a new run without --ckpt_path"
    ], res.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def result_line(out: str) -> str:
    """The test metrics of the result line a fit prints (``RECIPE: test/acc ...  wall ...``)."""
    found = re.search(r"^vit_cifar: (test/.*?)  wall ", out, re.M)
    assert found, out[-3000:]
    return found[1]


@pytest.mark.slow
def test_a_kill_in_the_test_after_fit_resumes_to_that_test(tmp_path, folder):
    """The test after fit is part of what `fit` promised: killed before its second batch, and then (resumed) once
    its metrics were computed, each resume tests the run's best checkpoint again; the third prints the result line
    of the uninterrupted run. Only then does a resume say that nothing is left to do."""

    def args(root: Path, *extra: str) -> list[str]:
        return run_args(folder, root, "--test_after_fit", "true", "--data.eval_batch_size", "2", *extra, epochs=1)

    res = forked_cli(args(tmp_path / "reference"))
    assert res.returncode == 0, res.stderr[-3000:]
    expected = result_line(res.stdout)
    run = tmp_path / "run"
    for where, batch in (("test", 1), ("test_end", 0)):
        res = forked_cli(args(run, "--ckpt_path", "last", *kill_args(batch, where)))
        assert res.returncode == -signal.SIGKILL, f"killed at {where}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        assert "nothing" not in res.stdout and not list(run.rglob("test_results.json")), where
    best = next(run.glob("vit_cifar/*/checkpoints/best-*.ckpt"))
    res = forked_cli(args(run, "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert result_line(res.stdout) == expected and f"(best checkpoint {best})" in res.stdout, res.stdout[-3000:]
    assert json.loads(next(run.rglob("test_results.json")).read_text())["tested"] == str(best)
    res = forked_cli(args(run, "--ckpt_path", "last"))
    assert res.returncode == 0 and "and was tested (test/acc" in res.stdout, res.stdout[-3000:]
    assert res.stdout.rstrip().endswith("nothing to do. Start a new run without --ckpt_path"), res.stdout[-3000:]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer BERT with dropout on (its draws must resume too) and a small SST-2-shaped CSV folder."""
    import csv
    import string

    import transformers

    base = tmp_path_factory.mktemp("text")
    words = ["good", "bad", "movie", "plot", "the", "was", "very", "not"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *string.ascii_lowercase]
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(base / "bert")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(base / "bert")
    rng = random.Random(0)
    (base / "data").mkdir()
    for split, n in (("train", 30), ("validation", 12)):
        with open(base / "data" / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["idx", "sentence", "label"])
            for i in range(n):
                label = rng.randrange(2)
                filler = " ".join(rng.choice(words[2:]) for _ in range(rng.randrange(1, 9)))  # lengths vary
                w.writerow([i, f"the movie was {['bad', 'good'][label]} {filler}", label])
    return base / "bert", base / "data"


@pytest.mark.slow
def test_sigkill_mid_epoch_of_a_text_run_with_dropout(tmp_path, text_run):
    """Text: batches grouped by length in an epoch-seeded order, dropout on. A SIGKILL mid-epoch, then
    --ckpt_path last: the resumed run draws the rest of that epoch's batches and the same dropout masks, and ends
    with the uninterrupted run's weights."""
    bert, data = text_run

    def args(root: Path, *extra: str) -> list[str]:
        # 30 sentences, 6 carved for validation, batch 8: 3 steps per epoch.
        return [
            "fit",
            "--recipe",
            "bert_sst2",
            "--model.model_name",
            str(bert),
            "--data.dataset",
            str(data),
            "--data.val_fraction",
            "0.2",
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "0",
            "--model.lr",
            "1e-3",
            "--trainer.precision",
            "32-true",
            "--trainer.max_epochs",
            "3",
            "--trainer.deterministic",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--checkpoint.last_every_n_train_steps",
            "1",
            *extra,
        ]

    reference = tmp_path / "reference"
    res = subprocess_cli(args(reference))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = final_state(reference)["global_step"]
    kill_step = random.Random(SEED).randrange(2, steps - 1)
    why = f"SIGKILL at step {kill_step} of {steps} (RELIABILITY_SEED={SEED})"
    run = tmp_path / "run"
    res = subprocess_cli(args(run, *kill_args(kill_step)))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert final_state(run)["global_step"] == kill_step, why  # last.ckpt every step here: nothing lost
    res = subprocess_cli(args(run, "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = final_state(reference), final_state(run)
    assert a["global_step"] == b["global_step"], why
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor.float(), b["state_dict"][name].float(), atol=1e-6), f"{name} ({why})"
