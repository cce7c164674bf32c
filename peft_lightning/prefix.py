"""Cut a model's forward pass at a layer group: run the frozen prefix once per example, the rest every step.

A task says where it can be cut (``FineTuneTask.prefix_split``) with a ``Split``: ``features`` runs the model on a
batch up to the input of the cut and returns per-example tensors; ``logits`` runs the rest of the model from them.
For models whose groups are the items of one ``nn.Sequential``/``nn.ModuleList`` (timm's ``blocks``/``stages``,
transformers' ``encoder.layer``), ``stop_before`` and ``start_at`` cut without knowing the architecture: the model's
own ``forward`` runs, stopped by a hook at the item's input, or resumed there on a container sliced to ``[k:]``
whose first item's input a hook replaces. ``PrefixCache`` (``callbacks/prefix_cache.py``) checks a split once
against the whole model's output before trusting it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Features = dict[str, torch.Tensor]


@dataclass
class Split:
    """A model cut at the input of layer group ``group``.

    Attributes:
        group: the lowest group that trains: its input is what is cached.
        features: ``batch -> {name: tensor}``, one row per example, the frozen prefix's output (run without grad).
        logits: ``(batch, features) -> logits``: the rest of the model, from cached rows (the batch may hold
            nothing but ``index`` and ``labels``).
        raw_keys: the batch keys ``features`` reads; a batch without them must be served from the cache.
        reference: ``batch -> logits`` through the whole model, uncut: what the split is checked against.
    """

    group: str
    features: Callable[[dict[str, Any]], Features]
    logits: Callable[[dict[str, Any], Features], torch.Tensor]
    raw_keys: tuple[str, ...]
    reference: Callable[[dict[str, Any]], torch.Tensor]


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def container_item(root: nn.Module, members: list[str]) -> tuple[nn.Module, str, int] | None:
    """``(parent, attribute, index)`` of the item of an ``nn.Sequential`` or ``nn.ModuleList`` where a group starts
    (``blocks.5``, ``encoder.layer.3``): the outermost container item holding the group's first parameter, or None.
    ``members`` are parameter names of ``root`` in forward order. Members elsewhere (a final norm that timm groups
    with the last block) run later; ``PrefixCache`` checks that no trainable weight runs before the cut."""
    if not members:
        return None
    path = members[0].rsplit(".", 1)[0].split(".")
    modules = dict(root.named_modules())
    # The outermost: a group `blocks.5.1` is cut at `blocks.5`, so that every block before it leaves the forward
    # pass (the frozen `blocks.5.0` then runs in the rest, as it would uncached).
    for end in range(2, len(path) + 1):
        *head, attr, index = path[:end]
        parent_name = ".".join(head)
        container = modules.get(f"{parent_name}.{attr}" if parent_name else attr)
        if index.isdigit() and isinstance(container, (nn.Sequential, nn.ModuleList)):
            return (modules[parent_name] if parent_name else root), attr, int(index)
    return None


@contextmanager
def modules_run() -> Iterator[list[nn.Module]]:
    """The modules whose ``forward`` is called while inside (in call order)."""
    ran: list[nn.Module] = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: ran.append(module))
    try:
        yield ran
    finally:
        handle.remove()


def _first_arg(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("cannot find the input tensor of the layer the model is cut at")


def stop_before(item: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The input ``item`` receives when ``run()`` calls the model; the model stops there (nothing after runs)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        raise _Stop(_first_arg(args, kwargs))

    handle = item.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop as stop:
        return stop.value
    finally:
        handle.remove()
    raise RuntimeError(f"the model never called {type(item).__name__}: it cannot be cut there")


@contextmanager
def start_at(parent: nn.Module, attr: str, index: int, value: torch.Tensor) -> Iterator[None]:
    """While inside, ``parent.<attr>`` holds its items ``index`` on, and the first of them receives ``value``
    instead of what the model computes for it: call the model on any input of the right kind (the items before
    ``index`` are gone; what runs before the container runs on that input and is thrown away)."""
    container = getattr(parent, attr)
    sliced = container[index:]

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (value, *args[1:]), kwargs
        for key in ("hidden_states", "x", "input"):
            if key in kwargs:
                return args, {**kwargs, key: value}
        raise RuntimeError("cannot find the input tensor of the layer the model is cut at")

    handle = sliced[0].register_forward_pre_hook(hook, with_kwargs=True)
    # `attr` is already a child: setattr replaces it in place (same key, same order), so parameter names and the
    # order of the model's children are those of the uncut model.
    setattr(parent, attr, sliced)
    try:
        yield
    finally:
        setattr(parent, attr, container)
        handle.remove()
