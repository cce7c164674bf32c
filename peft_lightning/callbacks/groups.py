"""A model's layer groups: as a strategy names them (selectors), as ``--finetuning.show_groups`` shows them, and how
the frozen ones run (``set_frozen_modes``).

A model's layer groups are ordered from the input side to the head (``stem, blocks.0 ... blocks.6, head``). A
*selector* names a set of them: a name (``head``), a range (``blocks.4-6``), a pattern (``layer.*``), or a count
from the top (``3``: the top three groups). Selectors combine in a list: ``[stem, blocks.0, head]``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from peft_lightning import internals
from peft_lightning.errors import UsageError

Selector = int | str | Sequence[int | str]
"""A count from the top, a name / range / pattern, or a list of them."""

_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<lo>\d+)-(?P<hi>\d+)$")


def select_groups(selector: Selector | None, groups: Sequence[str]) -> list[str]:
    """The groups ``selector`` names, in the model's order (input side first).

    Example:
        >>> g = ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
        >>> select_groups(["stem", "blocks.1-2"], g), select_groups(2, g), select_groups("blocks.*", g)
        (['stem', 'blocks.1', 'blocks.2'], ['blocks.2', 'head'], ['blocks.0', 'blocks.1', 'blocks.2'])
    """
    if selector is None:
        return list(groups)
    items = [selector] if isinstance(selector, (int, str)) else list(selector)
    chosen: set[str] = set()
    for item in items:
        found = _match(item, groups)
        if not found:
            raise UsageError(
                f"layer group selector {item!r} matches none of the model's groups "
                f"({', '.join(groups)}): see --finetuning.show_groups true"
            )
        chosen.update(found)
    return [g for g in groups if g in chosen]


def _match(item: int | str, groups: Sequence[str]) -> list[str]:
    if isinstance(item, bool):
        raise UsageError(f"layer group selector {item!r} is not a name, range, pattern or count")
    text = str(item).strip()
    if isinstance(item, int) or text.isdigit():
        count = int(text)
        if count < 1:
            raise UsageError(f"a count of layer groups must be >= 1, got {count}")
        return list(groups[-count:])
    if text in groups:
        return [text]
    if any(c in text for c in "*?["):
        return [g for g in groups if fnmatch.fnmatchcase(g, text)]
    m = _RANGE.match(text)
    if m:
        lo, hi = int(m["lo"]), int(m["hi"])
        wanted = {f"{m['prefix']}{i}" for i in range(min(lo, hi), max(lo, hi) + 1)}
        return [g for g in groups if g in wanted]
    return []


def top_down(groups: Sequence[str], among: Sequence[str]) -> list[str]:
    """``among`` ordered from the head down (the order gradual unfreezing adds them)."""
    wanted = set(among)
    return [g for g in reversed(groups) if g in wanted]


def groups_table(
    pl_module: Any,
    scales: dict[str, float],
    phase_of: Callable[[int], set[str]],
    epochs: int,
    label: str,
    notes: Sequence[str],
) -> str:
    """``--finetuning.show_groups``: each of the task's groups with its parameter count and LR scale, and an ``x``
    where it trains in each phase of the first ``epochs`` epochs (``phase_of(epoch)``: the groups that train then;
    ``label``: ``epoch``, ``round 0`` or ``before probe``), then ``notes``."""
    phases: list[tuple[int, set[str]]] = []
    for epoch in range(max(1, epochs)):
        chosen = phase_of(epoch)
        if not phases or phases[-1][1] != chosen:
            phases.append((epoch, chosen))
    params = dict(pl_module.named_parameters())
    heads = [f"{label} {e}" if label == "epoch" else label for e, _ in phases]
    lines = [f"{'group':<24}{'params':>14}  {'lr scale':>8}  " + "  ".join(heads)]
    for name, members in pl_module.layer_groups():
        count = sum(params[n].numel() for n in members if n in params)
        marks = "  ".join(f"{'x' if name in chosen else '.':^{len(h)}}" for h, (_, chosen) in zip(heads, phases))
        lines.append(f"{name:<24}{count:>14,}  {scales[name]:>8.3g}  {marks}")
    return "\n".join([*lines, *notes])


def set_frozen_modes(module: nn.Module, train_bn: bool = False, frozen_dropout: bool = False) -> None:
    """Frozen groups run in eval mode: every largest submodule whose weights are all frozen (its dropout and
    stochastic depth off, its BatchNorm on running statistics), unless ``frozen_dropout`` (then only its BatchNorm)
    or ``train_bn`` (its BatchNorm updates its statistics). Everything else trains, including groups just
    unfrozen, as in a run that never stopped."""
    ps = list(module.parameters())
    if ps and not any(p.requires_grad for p in ps):
        for m in module.modules():
            m.training = train_bn if isinstance(m, internals.BatchNorm) else frozen_dropout
        return
    module.training = True
    for child in module.children():
        set_frozen_modes(child, train_bn, frozen_dropout)
