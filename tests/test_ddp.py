"""DDP on CPU (gloo): 2 processes end with the weights of 1 process at the same global batch, across an unfreeze."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process_through_an_unfreeze(tmp_path):
    # 60 images: 6 carved for test, 6 for val, 48 train: 6 steps of 8 images (1 process) or 2 x 4 (2 processes).
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for devices, batch in ((1, 8), (2, 4)):
        subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tmp_path), str(devices), str(batch),
                        str(folder)], check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True)
    one = torch.load(tmp_path / "weights_1.pt", weights_only=True)
    two = torch.load(tmp_path / "weights_2.pt", weights_only=True)
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name
    from helpers import tiny_model

    initial = tiny_model().state_dict()
    key = "model.blocks.4.mlp.fc1.weight"  # unfrozen at epoch 1: it trained, identically on both ranks
    assert not torch.allclose(initial[key], two[key]) and torch.equal(initial["model.blocks.0.mlp.fc1.weight"],
                                                                      two["model.blocks.0.mlp.fc1.weight"])
    rank0, rank1 = (json.loads((tmp_path / f"seen_2_{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "seen_1_0.json").read_text())
    for epoch in ("0", "1"):
        assert not set(rank0[epoch]) & set(rank1[epoch])  # disjoint shards
        assert sorted(rank0[epoch] + rank1[epoch]) == sorted(single[epoch])  # together: the single process's data
