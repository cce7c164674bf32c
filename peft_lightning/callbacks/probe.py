"""The gradient probe of ``--finetuning.strategy auto``: each layer group's relative gradient norm.

``RGN(group) = ||grad|| / ||weight||`` over the group's parameters (Lee et al., "Surgical Fine-Tuning Improves
Adaptation to Distribution Shifts", ICLR 2023: the per-layer criterion that ranked best across their datasets). A
large RGN means the task pulls that group far from its pretrained weights relative to their size.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer


@dataclass
class ProbeResult:
    rgn: dict[str, float]
    """Each group's relative gradient norm."""
    params: dict[str, int]
    """Each group's parameter count (of the parameters that may train)."""
    batches: int
    seconds: float
    """Wall time of the probe's forward and backward passes."""


def group_norms(
    pl_module: LightningModule,
    groups: list[tuple[str, list[str]]],
    allowed: set[str] | None,
    grads: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared gradient and weight norms per group, of the parameters that have a gradient (``grads``, else each
    parameter's ``.grad``), as two tensors."""
    params = dict(pl_module.named_parameters())
    g_out, w_out = [], []
    for _, names in groups:
        g2 = w2 = torch.zeros((), dtype=torch.float64)
        for n in names:
            p = params.get(n)
            grad = grads.get(n) if grads is not None else (p.grad if p is not None else None)
            if p is None or (allowed is not None and n not in allowed) or grad is None:
                continue
            g2 = g2 + grad.detach().double().pow(2).sum().cpu()
            w2 = w2 + p.detach().double().pow(2).sum().cpu()
        g_out.append(g2)
        w_out.append(w2)
    return torch.stack(g_out), torch.stack(w_out)


def rgn_from_norms(trainer: Trainer, names: list[str], g2: torch.Tensor, w2: torch.Tensor) -> dict[str, float]:
    """``sqrt(g2 / w2)`` per group, the squared norms first averaged over processes: under DDP and FSDP every rank
    gets the same figures (sharded norms are all divided by the world size alike, so the ratio is exact)."""
    if trainer.world_size > 1:
        both = trainer.strategy.reduce(torch.stack([g2, w2]).to(trainer.strategy.root_device), reduce_op="mean")
        g2, w2 = both[0].cpu(), both[1].cpu()
    rgn = torch.where(w2 > 0, (g2 / w2.clamp_min(1e-30)).sqrt(), torch.zeros_like(g2))
    return {n: float(v) for n, v in zip(names, rgn)}


def probe(
    trainer: Trainer,
    pl_module: LightningModule,
    batches: Iterable[Any],
    n_batches: int,
    allowed: set[str] | None = None,
) -> ProbeResult:
    """Forward and backward ``n_batches`` training batches with every (allowed) parameter differentiable, sum the
    gradients, and return each group's RGN. Weights, ``.grad``, BatchNorm statistics, the optimizer and
    ``requires_grad`` are left as found."""
    groups = pl_module.layer_groups()
    params = dict(pl_module.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    wanted = [(n, p) for n, p in params.items() if allowed is None or n in allowed]
    # The forward passes run in training mode (dropout, BatchNorm on batch statistics, as training will), but
    # the running statistics they update are put back: the probe measures, it does not train.
    saved_buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
    was_training = pl_module.training
    pl_module.train()
    # The task's own training_step computes the loss (every domain, adapters, label smoothing ...); what it logs is
    # not a training step's, so `self.log` is a no-op while the probe runs.
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    sums: dict[str, torch.Tensor] = {}
    start, done = time.perf_counter(), 0
    try:
        for _, p in wanted:
            p.requires_grad_(True)
        for i, batch in enumerate(islice(batches, n_batches)):
            batch = trainer.strategy.batch_to_device(batch)
            with trainer.precision_plugin.forward_context():
                out = pl_module.training_step(batch, i)
            loss = out["loss"] if isinstance(out, dict) else out
            # autograd.grad, not backward(): nothing accumulates into .grad, so no DDP/FSDP gradient hook fires
            # outside a training step (the figures are averaged over processes in rgn_from_norms instead).
            grads = torch.autograd.grad(loss, [p for _, p in wanted], allow_unused=True)
            for (n, _), g in zip(wanted, grads):
                if g is not None:
                    sums[n] = sums[n] + g if n in sums else g.detach().clone()
            done += 1
        g2, w2 = group_norms(pl_module, groups, allowed, grads=sums)
    finally:
        del pl_module.log  # the class's method again
        with torch.no_grad():
            for n, b in pl_module.named_buffers():
                b.copy_(saved_buffers[n])
        for n, p in params.items():
            p.requires_grad_(before[n])
        pl_module.train(was_training)
    names = [name for name, _ in groups]
    counts = {
        name: sum(params[n].numel() for n in members if n in params and (allowed is None or n in allowed))
        for name, members in groups
    }
    return ProbeResult(rgn_from_norms(trainer, names, g2, w2), counts, done, time.perf_counter() - start)
