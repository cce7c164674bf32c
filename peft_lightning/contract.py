"""What the fine-tuning callback needs from a task: one typed contract, checked once at setup.

``FineTuneTask`` (``peft_lightning/tasks/base.py``) implements it for every domain; any LightningModule that has
these members can be fine-tuned too, without the base class. ``FineTuning``, the run report, the model card and the
export use these members directly; ``check_task`` is the one place that asks whether they are there.

The task owns its LR schedule; the callback steers it only through ``lr_scales`` and ``schedule_epochs``, which the
schedule reads live at every step (so a resumed run recomputes them and the optimizer never changes shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import torch

    from peft_lightning.callbacks.prefix_cache import PrefixCache
    from peft_lightning.prefix import Split

LayerGroups = list[tuple[str, list[str]]]
"""Ordered (name, parameter names) pairs, from the input side (stem/embeddings) to the head."""


@dataclass
class LRScales:
    """The learning-rate multipliers the fine-tuning callback sets and the task's LR schedule reads at every step:
    layer group ``g`` trains at ``lr x schedule(step) x factor(g)``.

    Example:
        >>> LRScales(layer={"head": 1.0, "body": 0.5}, phase=0.1).factor("body")
        0.05
    """

    layer: dict[str, float] = field(default_factory=dict)
    """Layer-wise LR decay per group (``--finetuning.lr_decay``), set once at setup."""
    phase: float = 1.0
    """The current phase's (milestone) or re-tuning round's multiplier of every group."""
    group: dict[str, float] = field(default_factory=dict)
    """The current phase's multiplier per group (``auto``'s scaling by relative gradient norm)."""

    def factor(self, group: str) -> float:
        return self.layer.get(group, 1.0) * self.phase * self.group.get(group, 1.0)


@runtime_checkable
class Tunable(Protocol):
    """The members a task offers the fine-tuning callback (``FineTuneTask`` documents each one)."""

    monitor: str
    """The validation metric that selects the best weights and ends re-tuning rounds (``val/acc``)."""
    monitor_mode: Literal["min", "max"]
    lr_scales: LRScales
    """Set by the callback, read live by the task's LR schedule."""
    schedule_epochs: int | None
    """The LR schedule's length in epochs; None: the whole run (re-tuning sets one round's length)."""
    prefix_cache: PrefixCache | None
    """Set by the callback while the frozen groups' output is cached; the task's training step reads from it."""
    compile_blocks: bool
    """Whether the task compiles its blocks (``--model.compile``): a compiled prefix is not cached."""

    def layer_groups(self) -> LayerGroups:
        """Ordered (name, parameter names) pairs from the input side to the head."""
        ...

    def trainable_parameter_names(self) -> set[str] | None:
        """The parameters that may ever train (None: all); with adapters, the adapters and the head."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training can change (the best weights a re-tuning round restores)."""
        ...

    def prefix_split(self, group: str) -> Split | None:
        """Where the training forward can start from cached rows: at the input of ``group``, or None."""
        ...


MEMBERS = (
    "monitor",
    "monitor_mode",
    "lr_scales",
    "schedule_epochs",
    "prefix_cache",
    "compile_blocks",
    "layer_groups",
    "trainable_parameter_names",
    "trainable_state_dict",
    "prefix_split",
)


def check_task(module: object, who: str = "FineTuning") -> Tunable:
    """``module`` if it keeps the contract and its layer groups are well formed, else one ``UsageError`` saying
    what is missing or wrong."""
    if not isinstance(module, Tunable):
        missing = ", ".join(name for name in MEMBERS if not hasattr(module, name))
        raise UsageError(
            f"{who} needs a task with layer groups: {type(module).__name__} lacks {missing}; subclass "
            "peft_lightning.FineTuneTask (or a domain task such as ImageClassifier) and override layer_groups()"
        )
    groups = module.layer_groups()
    names = [name for name, _ in groups]
    if not groups or len(set(names)) != len(names):
        raise UsageError(f"{type(module).__name__}.layer_groups() must name one or more groups, each once; got {names}")
    return module
