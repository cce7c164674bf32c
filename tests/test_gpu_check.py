"""scripts/gpu_check.py in its CPU dry mode: every group runs in its own child, each check's figures or error lands
in the JSON, and a check that cannot run here (FSDP on a CPU) is recorded without stopping the others."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dry_run_writes_figures_and_records_errors(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--dry",
            "--only",
            "vit,fsdp,compile",
            "--budget",
            "900",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] is True and result["machine"]["torch"]
    checks = result["checks"]
    assert set(checks) == {
        "vit_32-true",
        "vit_bf16-mixed",
        "vit_16-mixed",
        "vit_plain_loop_bf16",
        "fsdp_frozen",
        "fsdp_lora",
        "fsdp_checkpointing",
        "compile_vit_bf16",
    }
    for name in ("vit_32-true", "vit_bf16-mixed", "vit_16-mixed", "vit_plain_loop_bf16", "compile_vit_bf16"):
        res = checks[name]
        assert res["ok"], (name, res)
        assert res["samples_per_s"] > 0 and res["loss_first"] > 0 and res["seconds"] > 0
    assert checks["vit_16-mixed"]["precision"] == "16-mixed"  # fp16 on the CPU, not Lightning's bf16 switch
    assert "speedup_vs_32" in checks["vit_bf16-mixed"]
    assert checks["compile_vit_bf16"]["compiled_modules"] == 6  # test_vit's six blocks
    for name in ("fsdp_frozen", "fsdp_lora", "fsdp_checkpointing"):  # Lightning runs FSDP on CUDA only
        assert not checks[name]["ok"] and "GPU" in checks[name]["error"]
    assert "checks ok" in done.stdout


def test_unknown_group_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--only", "warp"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and done.stderr.strip().startswith("error: unknown group")
