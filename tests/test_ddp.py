"""DDP on CPU (gloo): 2 processes end with the weights of 1 process at the same global batch, across an unfreeze,
and each rank trains on its own disjoint shard of every batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image_folder

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "tests" / "ddp_run.py"


def run_script(out: Path, folder: Path, devices: int, batch: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch), str(folder)],
        env=env,
        cwd=out,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(out: Path, single: str, multi: str, ranks: int) -> None:
    """The ``multi`` run (``ranks`` processes) ended with the ``single`` run's weights, and its ranks' batches were
    disjoint shards whose union is, step by step, the single process's batch."""
    one = torch.load(out / f"weights_{single}.pt", weights_only=True)
    many = torch.load(out / f"weights_{multi}.pt", weights_only=True)
    for name in one:
        assert torch.allclose(one[name], many[name], atol=1e-6), name
    from helpers import tiny_model

    initial = tiny_model().state_dict()
    key = "model.blocks.4.mlp.fc1.weight"  # unfrozen at epoch 1: it trained, identically on every rank
    assert not torch.allclose(initial[key], many[key])
    assert torch.equal(initial["model.blocks.0.mlp.fc1.weight"], many["model.blocks.0.mlp.fc1.weight"])
    alone = json.loads((out / f"seen_{single}_0.json").read_text())
    per_rank = [json.loads((out / f"seen_{multi}_{r}.json").read_text()) for r in range(ranks)]
    for epoch, batches in alone.items():
        shards = [rank[epoch] for rank in per_rank]
        assert all(len(s) == len(batches) for s in shards)  # the same number of optimizer steps
        for step, batch in enumerate(batches):
            parts = [set(s[step]) for s in shards]
            assert sum(len(p) for p in parts) == len(batch)
            assert set().union(*parts) == set(batch), (epoch, step)  # together: the single process's batch
            for i in range(ranks):
                for j in range(i + 1, ranks):
                    assert not parts[i] & parts[j], (epoch, step)  # disjoint shards
    assert (
        "global batch 8 = 8 per device x 1 device x 1 node x 1 accumulated"
        in (out / f"summary_{single}.txt").read_text()
    )


def single_process_baseline(tmp_path_factory) -> tuple[Path, Path]:
    """The image folder and the 1-process run, made once per session (test_multinode compares against it too)."""
    out = tmp_path_factory.getbasetemp() / "ddp_baseline"
    # 60 images: 6 carved for test, 6 for val, 48 train: 6 steps of 8 images (1 process) or 2 x 4 (2 processes).
    folder = out / "imgs"
    if not (out / "weights_1.pt").exists():
        make_image_folder(folder, classes=3, per_class=20)
        run_script(out, folder, 1, 8)
    return out, folder


def test_two_process_ddp_matches_one_process_through_an_unfreeze(tmp_path_factory):
    out, folder = single_process_baseline(tmp_path_factory)
    run_script(out, folder, 2, 4)
    assert_same_run(out, "1", "2", ranks=2)
    summary = (out / "summary_2.txt").read_text()
    assert "global batch 8 = 4 per device x 2 devices x 1 node x 1 accumulated" in summary
    assert "strategy DDP" in summary
