"""Two "nodes" over loopback: `torchrun --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`, one process each,
both started here, end with the weights of a single process at the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ddp import SCRIPT, assert_same_run, single_process_baseline

from conftest import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(out: Path, folder: Path, nodes: int, batch: int, timeout: float = 600) -> None:
    """Start one torchrun per node, as an operator would on each machine, and wait for all of them."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` entry point of this interpreter
    procs = []
    for rank in range(nodes):
        cmd = [
            *torchrun,
            "--nnodes",
            str(nodes),
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(SCRIPT),
            str(out),
            "1",
            str(batch),
            str(folder),
            str(nodes),
            "nodes",
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank}:\n{log[-3000:]}"


def test_two_nodes_by_torchrun_match_one_process(tmp_path_factory):
    out, folder = single_process_baseline(tmp_path_factory)
    torchrun_nodes(out, folder, nodes=2, batch=4)
    assert_same_run(out, "1", "nodes", ranks=2)
    summary = (out / "summary_nodes.txt").read_text()
    assert "global batch 8 = 4 per device x 1 device x 2 nodes x 1 accumulated" in summary
