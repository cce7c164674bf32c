"""The parallel and mixed-precision engine: which precision a recipe picks, what FSDP wraps, whether a launch can
run here, and the global batch.

Everything here configures Lightning's own strategies and precision plugins; nothing wraps a model by hand.

- ``auto_precision``: a recipe whose ``trainer_defaults`` say ``"precision": "auto"`` trains in ``bf16-mixed`` on
  hardware with native bf16 matrix units (CUDA GPUs of compute capability >= 8.0, x86 CPUs with AMX-BF16 or
  AVX512-BF16) and in ``32-true`` elsewhere: on an AVX2-only CPU bf16 is emulated, and a MiniLM training step
  measured 3.6x slower than fp32 (docs/text.md).
- ``fsdp_strategy``: ``--trainer.strategy fsdp`` becomes ``FSDPStrategy(auto_wrap_policy=<the task's block
  classes>, activation_checkpointing_policy=<the same, if asked>)``; ``use_orig_params`` (Lightning's default)
  keeps ``requires_grad`` per original parameter, so frozen layers and peft adapters live in one FSDP unit.
- ``check_launch``: a strategy that cannot run where asked (FSDP on a CPU, more devices than exist, several
  nodes without a launcher) stops with one line before any model is built.
- ``global_batch`` / ``lr_scale``: effective batch = per-device batch x devices x nodes x accumulation, and the
  learning-rate factor of ``--model.scale_lr linear|sqrt`` relative to the recipe's reference batch.
- ``RunSummary``: prints the global batch, precision, strategy and learning rate at the start of fit (rank 0).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

AUTO = "auto"
"""The ``trainer_defaults["precision"]`` value that asks for ``auto_precision`` at startup."""
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
ScaleLR = Literal["none", "linear", "sqrt"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of x86 bf16 matrix/dot-product units (Intel Sapphire Rapids+ AMX, Cooper Lake / AMD Zen 4
AVX512-BF16): with them oneDNN runs bf16 matmuls natively instead of converting to fp32."""


# --- hardware and automatic precision ---
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


def detect_hardware() -> Hardware:
    """This machine's CUDA devices and CPU features (no CUDA context is created in this process)."""
    import torch
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    n = num_cuda_devices()
    return Hardware(
        cuda_devices=n,
        cuda_bf16=n > 0 and _cuda_bf16(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=cpu_flags() if platform.system() == "Linux" else frozenset(),
    )


def auto_precision(hardware: Hardware, accelerator: str = "auto") -> tuple[str, str]:
    """The precision an ``auto`` recipe trains in on ``hardware``, and why (one phrase).

    ``bf16-mixed`` where bf16 matmuls are native (CUDA compute capability >= 8.0; x86 CPUs with AMX-BF16 or
    AVX512-BF16), ``32-true`` elsewhere: emulated bf16 is slower than fp32 (3.6-14x measured on an AVX2 CPU), and
    fp16 on older GPUs needs loss scaling that a recipe's defaults should not assume.

    Example:
        >>> auto_precision(Hardware(cpu_flags=frozenset({"avx2", "amx_bf16"})), "cpu")
        ('bf16-mixed', 'CPU with native bf16 units (amx_bf16)')
    """
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and hardware.cuda_devices > 0)
    if on_gpu:
        if hardware.cuda_bf16:
            return "bf16-mixed", "CUDA GPU with native bf16"
        return "32-true", "CUDA GPU without native bf16 (compute capability < 8.0)"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator}"
    units = [flag for flag in CPU_BF16_FLAGS if flag in hardware.cpu_flags]
    if units:
        return "bf16-mixed", f"CPU with native bf16 units ({', '.join(units)})"
    return "32-true", f"CPU without native bf16 units (torch kernels: {hardware.cpu_capability}; bf16 is emulated)"


# --- strategies ---
def _strategy_name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy.lower()
    class_path = strategy.get("class_path") if isinstance(strategy, Mapping) else getattr(strategy, "class_path", None)
    name = str(class_path or type(strategy).__name__).rsplit(".", 1)[-1].lower()
    return name.removesuffix("strategy")


def _requested_devices(devices: Any) -> int | None:
    """How many devices ``--trainer.devices`` asks for; None for ``auto`` / ``-1`` (all there are)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1", "None", ""):
        return None
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return int(text)
    except ValueError:
        return None


def _launcher(environ: Mapping[str, str]) -> str | None:
    """The multi-node launcher this process runs under, if any (Lightning's own cluster-environment detection)."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for name, env in (("torchrun", TorchElasticEnvironment), ("SLURM", SLURMEnvironment), ("LSF", LSFEnvironment)):
        if env.detect():
            return name
    if "NODE_RANK" in environ and "MASTER_ADDR" in environ:  # a hand launch on each node (LightningEnvironment)
        return "NODE_RANK"
    return None


def check_launch(
    trainer: Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    hardware: Hardware | None = None,
) -> None:
    """Stop with one line if the parsed ``--trainer.*`` (and ``--model.*``) settings cannot run on this machine.

    Runs before any model or data is built: Lightning raises the same errors only once the trainer exists.
    """
    environ = os.environ if environ is None else environ
    model = model or {}
    strategy = _strategy_name(trainer.get("strategy"))
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    requested = _requested_devices(trainer.get("devices", "auto"))
    num_nodes = int(trainer.get("num_nodes") or 1)
    cuda = hardware.cuda_devices if hardware is not None else None
    if cuda is None:
        from lightning.fabric.accelerators.cuda import num_cuda_devices

        cuda = num_cuda_devices()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda > 0)
    if accelerator in ("gpu", "cuda") and cuda == 0:
        raise UsageError(
            f"--trainer.accelerator {accelerator} but no CUDA GPU is visible here: drop it (CPU) or run "
            "on a GPU machine"
        )
    if strategy.startswith("fsdp") and not on_gpu:
        raise UsageError(
            f"--trainer.strategy {strategy} needs CUDA GPUs and this run is on the CPU: use "
            "--trainer.strategy ddp (or ddp_spawn) on CPUs"
        )
    if requested is not None and requested < 1:
        raise UsageError(f"--trainer.devices must be >= 1, 'auto' or -1, got {trainer.get('devices')}")
    if requested is not None and on_gpu and requested > cuda:
        raise UsageError(
            f"--trainer.devices {requested} asks for {requested} GPUs but this machine has {cuda}: "
            f"pass --trainer.devices {cuda} (or fewer)"
        )
    cores = os.cpu_count() or 1
    if requested is not None and not on_gpu and requested > cores:
        raise UsageError(
            f"--trainer.devices {requested} starts {requested} CPU processes but this machine has "
            f"{cores} cores: pass --trainer.devices {cores} (or fewer)"
        )
    if num_nodes < 1:
        raise UsageError(f"--trainer.num_nodes must be >= 1, got {num_nodes}")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and int(accumulate) < 1:
        raise UsageError(
            f"--trainer.accumulate_grad_batches must be >= 1 (batches summed per optimizer step), got {accumulate}"
        )
    launcher = _launcher(environ)
    if num_nodes > 1 and launcher is None:
        raise UsageError(
            f"--trainer.num_nodes {num_nodes} needs one launch per node: run the same command on every "
            f"node under `torchrun --nnodes {num_nodes} --node_rank R --master_addr HOST ...` or `srun` "
            "(see docs/parallel.md)"
        )
    if launcher == "torchrun" and requested is not None and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        if requested * num_nodes != world:
            raise UsageError(
                f"torchrun started {world} processes but --trainer.devices {requested} x "
                f"--trainer.num_nodes {num_nodes} = {requested * num_nodes}: make them agree "
                "(devices = --nproc_per_node, num_nodes = --nnodes)"
            )
    if model.get("activation_checkpointing") and not strategy.startswith("fsdp"):
        raise UsageError(
            "--model.activation_checkpointing works through FSDP (it works on one GPU too): add "
            "--trainer.strategy fsdp, or drop it (text models also have --model.gradient_checkpointing)"
        )


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The classes of a network's repeated blocks: the outermost non-container modules named ``blocks.N``,
    ``stages.N``, ``layers.N``, ``layer.N``, ``h.N``, ``block.N``, ``layerK.N`` or one level below such a container
    (timm EfficientNet's ``blocks.S.N``). timm ViT -> ``Block``, EfficientNet -> ``DepthwiseSeparableConv`` and
    ``InvertedResidual``, ResNet -> ``BasicBlock``/``Bottleneck``, BERT -> ``BertLayer``, GPT-2 -> ``GPT2Block``."""
    import re

    from torch import nn

    numbered = re.compile(r"(^|\.)((blocks|stages|layers|layer|h|block)\.\d+|layer\d+\.\d+)(\.\d+)?$")
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    found: set[type[nn.Module]] = set()
    taken: list[str] = []
    for name, child in module.named_modules():
        if not numbered.search(name) or isinstance(child, containers):
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # inside a block already found (T5's block.N.layer.M)
        taken.append(name)
        found.add(type(child))
    return found


def fsdp_strategy(task: Any, name: str = "fsdp", **kwargs: Any) -> Any:
    """``FSDPStrategy`` wrapping each of ``task.fsdp_block_classes()`` in its own FSDP unit (the rest of the model
    is the root unit), with activation checkpointing of the same blocks when ``task.activation_checkpointing``.

    ``use_orig_params=True`` (Lightning's default, and what ``FineTuning`` sets): FSDP keeps the original parameters
    as views of its flat shards, so one unit can hold frozen weights, trainable ones and peft adapters, and a
    group unfrozen mid-run trains without re-wrapping. ``name == "fsdp_cpu_offload"`` also offloads to host memory.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    classes = set(task.fsdp_block_classes()) if hasattr(task, "fsdp_block_classes") else set()
    kwargs.setdefault("use_orig_params", True)
    if name == "fsdp_cpu_offload":
        kwargs.setdefault("cpu_offload", True)
    checkpointing = bool(getattr(task, "activation_checkpointing", False))
    if checkpointing and not classes:
        raise UsageError(f"{type(task).__name__} names no blocks to checkpoint: drop --model.activation_checkpointing")
    return FSDPStrategy(
        auto_wrap_policy=classes or None, activation_checkpointing_policy=classes if checkpointing else None, **kwargs
    )


def _on_cpu(accelerator: str, hardware: Hardware | None = None) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    cuda = hardware.cuda_devices if hardware is not None else torch.cuda.device_count()
    return cuda == 0 and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def trainer_overrides(trainer: Mapping[str, Any], task: Any, hardware: Hardware | None = None) -> dict[str, Any]:
    """Trainer arguments that replace what the user asked for by the configured Lightning objects:

    - ``strategy: fsdp`` -> ``fsdp_strategy(task)`` (the task's blocks as FSDP units);
    - ``precision: 16-mixed`` on a CPU -> Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin with a CPU
      ``GradScaler``: torch autocasts to float16 on CPUs, where Lightning's string would switch to bf16.
    """
    out: dict[str, Any] = {}
    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy.lower() in ("fsdp", "fsdp_cpu_offload"):
        out["strategy"] = fsdp_strategy(task, strategy.lower())
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if str(trainer.get("precision")) == "16-mixed" and _on_cpu(accelerator, hardware) and "strategy" not in out:
        import torch
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        out["precision"] = None
        out["plugins"] = [*plugins, MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]
    return out


# --- global batch and learning-rate scaling ---
@dataclass(frozen=True)
class GlobalBatch:
    """Samples per optimizer step across the whole run."""

    per_device: int
    devices: int
    nodes: int
    accumulate: int

    @property
    def size(self) -> int:
        return self.per_device * self.devices * self.nodes * self.accumulate

    def __str__(self) -> str:
        return (
            f"{self.size} = {self.per_device} per device x {self.devices} device{'s' * (self.devices != 1)} x "
            f"{self.nodes} node{'s' * (self.nodes != 1)} x {self.accumulate} accumulated"
        )


def per_device_batch(trainer: Trainer) -> int | None:
    """The training batch size of one process, from the attached datamodule's ``batch_size``."""
    dm = getattr(trainer, "datamodule", None)
    hp = getattr(dm, "hparams", None)
    size = hp.get("batch_size") if hp is not None and hasattr(hp, "get") else getattr(dm, "batch_size", None)
    return int(size) if size else None


def global_batch(trainer: Trainer) -> GlobalBatch | None:
    """Per-device batch x devices x nodes x gradient accumulation of ``trainer`` (None if the batch is unknown)."""
    size = per_device_batch(trainer)
    if size is None:
        return None
    return GlobalBatch(size, int(trainer.num_devices), int(trainer.num_nodes), int(trainer.accumulate_grad_batches))


def lr_scale(rule: ScaleLR, batch: int, reference: int) -> float:
    """The learning-rate factor for a global ``batch`` when the recipe's LR was tuned at ``reference``:
    ``linear`` (Goyal et al. 2017, for SGD), ``sqrt`` (Krizhevsky 2014; the usual choice for Adam/AdamW) or
    ``none``.

    Example:
        >>> lr_scale("linear", 512, 128), lr_scale("sqrt", 512, 128)
        (4.0, 2.0)
    """
    if rule == "none":
        return 1.0
    if batch < 1 or reference < 1:
        raise UsageError(f"cannot scale the learning rate: global batch {batch}, reference batch {reference}")
    if rule == "linear":
        return batch / reference
    if rule == "sqrt":
        return math.sqrt(batch / reference)
    raise UsageError(f"unknown scale_lr {rule!r}: use none, linear or sqrt")


def compile_modules(modules: list[nn.Module], **kwargs: Any) -> int:
    """``torch.compile`` each module in place (``nn.Module.compile``: parameter names and checkpoints unchanged);
    returns how many were compiled now. Compiling blocks one by one ("regional compilation") compiles one graph
    reused by every block of a class and leaves FSDP's unit boundaries alone."""
    done = 0
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**kwargs)
            done += 1
    return done


class RunSummary(Callback):
    """Prints, at the start of fit on rank 0, the global batch, precision, strategy and learning rate.

    Args:
        precision_note: why this precision (the CLI sets it when the recipe's default was ``auto``).
    """

    def __init__(self, precision_note: str | None = None) -> None:
        self.precision_note = precision_note
        self.line = ""

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch = global_batch(trainer)
        note = f" ({self.precision_note})" if self.precision_note else ""
        parts = [
            f"global batch {batch}" if batch else "global batch: unknown (the datamodule has no batch_size)",
            f"precision {trainer.precision}{note}",
            f"strategy {type(trainer.strategy).__name__.removesuffix('Strategy')}",
        ]
        base, lr = getattr(pl_module, "base_lr", None), getattr(pl_module, "lr", None)
        if base is not None and lr is not None:
            rule = getattr(pl_module, "scale_lr", "none")
            if rule != "none":
                parts.append(
                    f"lr {lr:.3g} ({rule}-scaled from {base:.3g} at reference batch {pl_module.reference_batch()})"
                )
            else:
                parts.append(f"lr {lr:.3g}")
        self.line = "; ".join(parts)
        rank_zero_info(self.line)


def resolve_auto_precision(trainer: Any, hardware: Hardware) -> str | None:
    """Replace ``precision: auto`` in a trainer config (a dict or the CLI's namespace) by ``auto_precision`` for
    ``hardware`` and the configured accelerator; returns the reason, printed at the start of fit, or None if the
    precision was not ``auto``."""
    if trainer.get("precision") != AUTO:
        return None
    accelerator = str(trainer.get("accelerator") or "auto")
    trainer["precision"], why = auto_precision(hardware, accelerator)
    return f"precision auto: {why}; override with --trainer.precision"
