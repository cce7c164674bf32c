"""``torch.compile`` of a model's repeated blocks, one by one ("regional compilation")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_lightning.internals import is_compiled

if TYPE_CHECKING:
    from torch import nn


def compile_modules(modules: list[nn.Module], **kwargs: Any) -> int:
    """``torch.compile`` each module in place (``nn.Module.compile``: parameter names and checkpoints unchanged);
    returns how many were compiled now. Compiling blocks one by one ("regional compilation") compiles one graph
    reused by every block of a class and leaves FSDP's unit boundaries alone."""
    done = 0
    for module in modules:
        if not is_compiled(module):
            module.compile(**kwargs)
            done += 1
    return done
