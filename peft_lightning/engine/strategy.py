"""The strategy a run trains under, as Lightning objects configured from the task: ``--trainer.strategy fsdp``
becomes ``FSDPStrategy(auto_wrap_policy=<the task's block classes>, activation_checkpointing_policy=<the same, if
asked>)``; ``use_orig_params`` (Lightning's default) keeps ``requires_grad`` per original parameter, so frozen
layers and peft adapters live in one FSDP unit. ``trainer_overrides`` gathers every Trainer argument replaced so;
``allow_freezing`` configures a strategy for layer groups that freeze and unfreeze during the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_lightning import internals
from peft_lightning.engine.precision import precision_overrides
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.engine.precision import Hardware


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


def allow_freezing(strategy: Any, probes: bool) -> None:
    """Configure Lightning's ``strategy`` for layer groups frozen and unfrozen mid-run (``FineTuning``, before the
    model is wrapped), or refuse it with one line; ``probes``: a gradient probe runs outside training steps."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        raise UsageError(
            "FineTuning cannot freeze or unfreeze layer groups under DeepSpeed (its optimizer "
            "partitions only the parameters trainable at start): use --trainer.strategy fsdp or ddp"
        )
    ddp_kwargs = internals.ddp_kwargs(strategy)
    if ddp_kwargs is not None:
        # A group unfrozen after DDP wrapped the model must still be all-reduced: DDP registers every parameter
        # (nothing is frozen yet: FineTuning freezes in on_fit_start) and tolerates the ones that get no gradient.
        ddp_kwargs["find_unused_parameters"] = True
    if isinstance(strategy, FSDPStrategy) and probes:
        # FSDP's forward runs on unsharded copies of the parameters: their gradients reach the flat parameters
        # only through its backward hooks, which the probe must not fire outside a training step.
        raise UsageError(
            "the gradient probe (--finetuning.strategy auto, retune's order rgn) does not run under FSDP: use "
            "--trainer.strategy ddp, or choose the groups: --finetuning.strategy Head --finetuning.strategy.groups"
        )
    if isinstance(strategy, FSDPStrategy):
        # FSDP flattens each wrapped block's parameters into one; `use_orig_params` keeps requires_grad per
        # original parameter, so a block may hold frozen and trainable weights and unfreeze later.
        strategy.kwargs["use_orig_params"] = True
