"""Which precision a run trains in: the hardware it looks at, ``auto_precision``'s decision, and the one plugin
override (``16-mixed`` on a CPU).

A recipe whose ``trainer_defaults`` say ``"precision": "auto"`` trains in ``bf16-mixed`` on hardware with native
bf16 matrix units (CUDA GPUs of compute capability >= 8.0, x86 CPUs with AMX-BF16 or AVX512-BF16) and in
``32-true`` elsewhere: on an AVX2-only CPU bf16 is emulated, and a MiniLM training step measured 3.6x slower than
fp32 (docs/text.md). Everything here chooses among Lightning's own precision plugins.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUTO = "auto"
"""The ``trainer_defaults["precision"]`` value that asks for ``auto_precision`` at startup."""
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of x86 bf16 matrix/dot-product units (Intel Sapphire Rapids+ AMX, Cooper Lake / AMD Zen 4
AVX512-BF16): with them oneDNN runs bf16 matmuls natively instead of converting to fp32."""


@dataclass(frozen=True)
class Hardware:
    """What the precision decision looks at; ``detect_hardware()`` fills it, tests build it by hand."""

    cuda_devices: int = 0
    cuda_bf16: bool = False
    """Every visible CUDA device has native bf16 (compute capability >= 8.0: A100, H100, L4, RTX 30xx+)."""
    cpu_capability: str = "DEFAULT"
    """``torch.backends.cpu.get_cpu_capability()``: the SIMD level torch's kernels use (``AVX2``, ``AVX512``)."""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def cpu_bf16(self) -> bool:
        return any(flag in self.cpu_flags for flag in CPU_BF16_FLAGS)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cuda_bf16() -> bool:
    # Asked in a child process: initialising CUDA here would forbid Lightning's fork-based strategies
    # (ddp_notebook) in this process. nvidia-smi answers in milliseconds; a Python child covers ROCm and the rest.
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if out:
            return min(float(cap) for cap in out) >= 8.0
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    code = "import torch; print(int(torch.cuda.is_bf16_supported(including_emulation=False)))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return done.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False


NO_CPU_BF16 = "PEFT_LIGHTNING_CPU_BF16"
"""Set to ``0`` to have ``auto`` see this CPU as one without bf16 units (it then picks ``32-true``): the suite's
time on a CPU without bf16 is measured on any machine with ``PEFT_LIGHTNING_CPU_BF16=0 pytest``, and subprocesses
inherit it."""


def detect_hardware() -> Hardware:
    """This machine's CUDA devices and CPU features (no CUDA context is created in this process)."""
    import torch
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    n = num_cuda_devices()
    flags = cpu_flags() if platform.system() == "Linux" else frozenset()
    if os.environ.get(NO_CPU_BF16) == "0":
        flags = flags - set(CPU_BF16_FLAGS)
    return Hardware(
        cuda_devices=n,
        cuda_bf16=n > 0 and _cuda_bf16(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=flags,
    )


def on_gpu(accelerator: str, cuda_devices: int) -> bool:
    """Whether ``--trainer.accelerator`` puts the run on CUDA GPUs: asked for, or ``auto`` with one visible."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_devices > 0)


def auto_precision(hardware: Hardware, accelerator: str = "auto") -> tuple[str, str]:
    """The precision an ``auto`` recipe trains in on ``hardware``, and why (one phrase).

    ``bf16-mixed`` where bf16 matmuls are native (CUDA compute capability >= 8.0; x86 CPUs with AMX-BF16 or
    AVX512-BF16), ``32-true`` elsewhere: emulated bf16 is slower than fp32 (3.6-14x measured on an AVX2 CPU), and
    fp16 on older GPUs needs loss scaling that a recipe's defaults should not assume.

    Example:
        >>> auto_precision(Hardware(cpu_flags=frozenset({"avx2", "amx_bf16"})), "cpu")
        ('bf16-mixed', 'CPU with native bf16 units (amx_bf16)')
    """
    if on_gpu(accelerator, hardware.cuda_devices):
        if hardware.cuda_bf16:
            return "bf16-mixed", "CUDA GPU with native bf16"
        return "32-true", "CUDA GPU without native bf16 (compute capability < 8.0)"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator}"
    units = [flag for flag in CPU_BF16_FLAGS if flag in hardware.cpu_flags]
    if units:
        return "bf16-mixed", f"CPU with native bf16 units ({', '.join(units)})"
    return "32-true", f"CPU without native bf16 units (torch kernels: {hardware.cpu_capability}; bf16 is emulated)"


def resolve_auto_precision(trainer: Any, hardware: Hardware) -> str | None:
    """Replace ``precision: auto`` in a trainer config (a dict or the CLI's namespace) by ``auto_precision`` for
    ``hardware`` and the configured accelerator; returns the reason, printed at the start of fit, or None if the
    precision was not ``auto``."""
    if trainer.get("precision") != AUTO:
        return None
    accelerator = str(trainer.get("accelerator") or "auto")
    trainer["precision"], why = auto_precision(hardware, accelerator)
    return f"precision auto: {why}; override with --trainer.precision"


def _on_cpu(accelerator: str, hardware: Hardware | None = None) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    cuda = hardware.cuda_devices if hardware is not None else torch.cuda.device_count()
    return cuda == 0 and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def precision_overrides(trainer: Mapping[str, Any], hardware: Hardware | None = None) -> dict[str, Any]:
    """``precision: 16-mixed`` on a CPU -> Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin with a CPU
    ``GradScaler`` (as Trainer arguments: ``precision=None`` and the plugin appended to ``plugins``): torch autocasts
    to float16 on CPUs, where Lightning's string would switch to bf16. Empty for anything else."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if str(trainer.get("precision")) != "16-mixed" or not _on_cpu(accelerator, hardware):
        return {}
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugins = trainer.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    return {"precision": None, "plugins": [*plugins, MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
