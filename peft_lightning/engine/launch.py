"""Whether a launch can run here: a strategy that cannot run where asked (FSDP on a CPU, more devices than exist,
several nodes without a launcher) stops with one line before any model is built; Lightning raises the same errors
only once the trainer exists."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_lightning.engine.precision import on_gpu
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.engine.precision import Hardware


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
    strategy = _strategy_name(trainer.get("strategy"))
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    requested = _requested_devices(trainer.get("devices", "auto"))
    num_nodes = int(trainer.get("num_nodes") or 1)
    cuda = hardware.cuda_devices if hardware is not None else None
    if cuda is None:
        from lightning.fabric.accelerators.cuda import num_cuda_devices

        cuda = num_cuda_devices()
    gpu = on_gpu(accelerator, cuda)
    _check_accelerator(accelerator, strategy, cuda, gpu)
    _check_devices(requested, trainer.get("devices"), cuda, gpu)
    _check_counts(num_nodes, trainer.get("accumulate_grad_batches"))
    _check_launcher(num_nodes, requested, environ)
    _check_activation_checkpointing(model or {}, strategy)


def _check_accelerator(accelerator: str, strategy: str, cuda: int, gpu: bool) -> None:
    """A GPU asked for where none is visible; FSDP (GPUs only) on the CPU."""
    if accelerator in ("gpu", "cuda") and cuda == 0:
        raise UsageError(
            f"--trainer.accelerator {accelerator} but no CUDA GPU is visible here: drop it (CPU) or run "
            "on a GPU machine"
        )
    if strategy.startswith("fsdp") and not gpu:
        raise UsageError(
            f"--trainer.strategy {strategy} needs CUDA GPUs and this run is on the CPU: use "
            "--trainer.strategy ddp (or ddp_spawn) on CPUs"
        )


def _check_devices(requested: int | None, devices: Any, cuda: int, gpu: bool) -> None:
    """``--trainer.devices``: at least one, and no more GPUs, or CPU processes, than this machine has."""
    if requested is not None and requested < 1:
        raise UsageError(f"--trainer.devices must be >= 1, 'auto' or -1, got {devices}")
    if requested is not None and gpu and requested > cuda:
        raise UsageError(
            f"--trainer.devices {requested} asks for {requested} GPUs but this machine has {cuda}: "
            f"pass --trainer.devices {cuda} (or fewer)"
        )
    cores = os.cpu_count() or 1
    if requested is not None and not gpu and requested > cores:
        raise UsageError(
            f"--trainer.devices {requested} starts {requested} CPU processes but this machine has "
            f"{cores} cores: pass --trainer.devices {cores} (or fewer)"
        )


def _check_counts(num_nodes: int, accumulate: Any) -> None:
    """``--trainer.num_nodes`` and ``--trainer.accumulate_grad_batches``: at least one."""
    if num_nodes < 1:
        raise UsageError(f"--trainer.num_nodes must be >= 1, got {num_nodes}")
    if accumulate is not None and int(accumulate) < 1:
        raise UsageError(
            f"--trainer.accumulate_grad_batches must be >= 1 (batches summed per optimizer step), got {accumulate}"
        )


def _check_launcher(num_nodes: int, requested: int | None, environ: Mapping[str, str]) -> None:
    """Several nodes need a launcher; under torchrun, devices x nodes must be the processes it started."""
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


def _check_activation_checkpointing(model: Mapping[str, Any], strategy: str) -> None:
    if model.get("activation_checkpointing") and not strategy.startswith("fsdp"):
        raise UsageError(
            "--model.activation_checkpointing works through FSDP (it works on one GPU too): add "
            "--trainer.strategy fsdp, or drop it (text models also have --model.gradient_checkpointing)"
        )
