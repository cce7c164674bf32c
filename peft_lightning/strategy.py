"""The strategy a run trains under, as Lightning objects configured from the task: ``--trainer.strategy fsdp``
becomes ``FSDPStrategy(auto_wrap_policy=<the task's block classes>, activation_checkpointing_policy=<the same, if
asked>)``; ``use_orig_params`` (Lightning's default) keeps ``requires_grad`` per original parameter, so frozen
layers and peft adapters live in one FSDP unit. ``trainer_overrides`` gathers every Trainer argument replaced so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError
from peft_lightning.precision import precision_overrides

if TYPE_CHECKING:
    from peft_lightning.precision import Hardware


def fsdp_strategy(task: Any, name: str = "fsdp", **kwargs: Any) -> Any:
    """``FSDPStrategy`` wrapping each of ``task.fsdp_block_classes()`` in its own FSDP unit (the rest of the model
    is the root unit), with activation checkpointing of the same blocks when ``task.activation_checkpointing``.

    ``use_orig_params=True`` (Lightning's default, and what ``FineTuning`` sets): FSDP keeps the original parameters
    as views of its flat shards, so one unit can hold frozen weights, trainable ones and peft adapters, and a
    group unfrozen mid-run trains without re-wrapping. ``name == "fsdp_cpu_offload"`` also offloads to host memory.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    classes = set(task.fsdp_block_classes())
    kwargs.setdefault("use_orig_params", True)
    if name == "fsdp_cpu_offload":
        kwargs.setdefault("cpu_offload", True)
    checkpointing = task.activation_checkpointing
    if checkpointing and not classes:
        raise UsageError(f"{type(task).__name__} names no blocks to checkpoint: drop --model.activation_checkpointing")
    return FSDPStrategy(
        auto_wrap_policy=classes or None, activation_checkpointing_policy=classes if checkpointing else None, **kwargs
    )


def trainer_overrides(trainer: Mapping[str, Any], task: Any, hardware: Hardware | None = None) -> dict[str, Any]:
    """Trainer arguments that replace what the user asked for by the configured Lightning objects:

    - ``strategy: fsdp`` -> ``fsdp_strategy(task)`` (the task's blocks as FSDP units);
    - ``precision: 16-mixed`` on a CPU -> Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin with a CPU
      ``GradScaler`` (``precision.precision_overrides``): torch autocasts to float16 on CPUs, where Lightning's
      string would switch to bf16.
    """
    out: dict[str, Any] = {}
    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy.lower() in ("fsdp", "fsdp_cpu_offload"):
        out["strategy"] = fsdp_strategy(task, strategy.lower())
    if "strategy" not in out:
        out.update(precision_overrides(trainer, hardware))
    return out
