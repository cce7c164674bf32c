"""The gradient probe of ``--finetuning.strategy auto``: how much each layer group's gradient says about the task.

Two figures per group, from ``B`` training batches' gradients ``g_1 .. g_B``:

- ``signal = (||sum_b g_b||^2 / sum_b ||g_b||^2 - 1) / (B - 1)``: the share of one batch's gradient that is the
  expected gradient, ``||E g||^2 / E ||g||^2`` (0: the batches pull in unrelated directions, pure noise; 1: every
  batch pulls the same way). It is the gradient noise scale of McCandlish et al. ("An Empirical Model of
  Large-Batch Training", 2018) seen from one batch, per group. It has no unit, so groups of any size and depth
  compare: a stem of 928 weights and a block of 1.6M are measured alike.
- ``RGN = ||sum_b g_b|| / ||weight||``, the relative gradient norm (Lee et al., "Surgical Fine-Tuning Improves
  Adaptation to Distribution Shifts", ICLR 2023), which ``Auto``'s ``select`` and ``scale`` modes use. Across the
  layers of one network it follows the architecture more than the task (measured on EfficientNet-Lite0 after a
  linear probe: the stem's RGN is 20x the last block's, and its signal is 0: noise; docs/layers.md).

``measure`` runs it for the ``FineTuning`` callback (on the strategy's ``probe_batches``), ``table`` prints it and
``log_figures`` logs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from peft_lightning.callbacks.auto import Auto
from peft_lightning.callbacks.strategy_base import Phase


@dataclass
class ProbeResult:
    rgn: dict[str, float]
    """Each group's relative gradient norm."""
    signal: dict[str, float]
    """Each group's gradient signal: the share of a batch's gradient that is the expected gradient, in [0, 1]."""
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


def signal_from_norms(trainer: Trainer, names: list[str], s2: torch.Tensor, q2: torch.Tensor, batches: int):
    """Each group's gradient signal from ``s2 = ||sum_b g_b||^2`` and ``q2 = sum_b ||g_b||^2`` (averaged over
    processes first), clipped to [0, 1]; 0 for every group when fewer than two batches were seen."""
    if trainer.world_size > 1:
        both = trainer.strategy.reduce(torch.stack([s2, q2]).to(trainer.strategy.root_device), reduce_op="mean")
        s2, q2 = both[0].cpu(), both[1].cpu()
    if batches < 2:
        return {n: 0.0 for n in names}
    share = (s2 / q2.clamp_min(1e-30) - 1) / (batches - 1)
    share = torch.where(q2 > 0, share.clamp(0.0, 1.0), torch.zeros_like(share))
    return {n: float(v) for n, v in zip(names, share)}


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
    squares: dict[str, torch.Tensor] = {}  # sum over batches of each parameter's squared gradient norm
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
                    sq = g.detach().double().pow(2).sum().cpu()
                    squares[n] = squares[n] + sq if n in squares else sq
            done += 1
        g2, w2 = group_norms(pl_module, groups, allowed, grads=sums)
        q2 = torch.stack(
            [
                sum((squares[n] for n in members if n in squares), torch.zeros((), dtype=torch.float64))
                for _, members in groups
            ]
        )
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
    return ProbeResult(
        rgn_from_norms(trainer, names, g2, w2),
        signal_from_norms(trainer, names, g2, q2, done),
        counts,
        done,
        time.perf_counter() - start,
    )


def measure(trainer: Trainer, pl_module: LightningModule, batches: int) -> dict[str, Any]:
    """Each group's RGN and signal on ``batches`` training batches (every rank the same figures), as the record
    ``FineTuning.probe`` keeps (saved in checkpoints)."""
    # A loader of its own from the data module: iterating the fit's loader (whose iterator Lightning holds, and
    # persistent workers share) would move the epoch under it.
    dm = trainer.datamodule
    loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
    cache, pl_module.prefix_cache = pl_module.prefix_cache, None  # the probe runs every layer
    # A short run spends at most a quarter of its steps' worth on the probe (at least 2 batches: the signal compares
    # batches).
    batches = min(batches, max(2, int(trainer.estimated_stepping_batches) // 4))
    try:
        result = probe(trainer, pl_module, loader, batches, pl_module.trainable_parameter_names())
    finally:
        pl_module.prefix_cache = cache
    return {
        "rgn": result.rgn,
        "signal": result.signal,
        "params": result.params,
        "batches": result.batches,
        "seconds": round(result.seconds, 2),
    }


def remeasure(trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
    """Each group's RGN from the training step's own gradients (``auto scale``'s re-measurement: already all-reduced
    under DDP, so every rank computes the same figures; no extra forward or backward pass)."""
    groups = pl_module.layer_groups()
    g2, w2 = group_norms(pl_module, groups, pl_module.trainable_parameter_names())
    return rgn_from_norms(trainer, [name for name, _ in groups], g2, w2)


def warmup_factor(record: Mapping[str, Any] | None, step: int, steps: int) -> float | None:
    """``auto``'s body warm-up at ``step``: the LR factor of the groups the probe (``record``) chose, rising linearly
    from near 0 to 1 over ``steps`` steps after it; None outside the warm-up."""
    if not steps or not record or "step" not in record or not 0 <= step - record["step"] <= steps:
        return None
    return min(1.0, (step - record["step"] + 1) / (steps + 1))


def log_figures(trainer: Trainer, record: Mapping[str, Any], names: list[str]) -> None:
    """The probe's figures per group and what it chose, to every logger."""
    chosen = record["chosen"]
    figures = {
        **{f"probe/rgn/{g}": v for g, v in record["rgn"].items()},
        **{f"probe/signal/{g}": v for g, v in record["signal"].items()},
        # what the probe chose: the lowest group that trains (its index from the input side) and how many do
        "probe/lowest_trained": float(min(names.index(g) for g in chosen)),
        "probe/groups_trained": float(len(chosen)),
    }
    for logger in trainer.loggers:
        logger.log_metrics(figures, step=trainer.global_step)


def table(record: Mapping[str, Any], phase: Phase) -> str:
    """The gradient probe's figures per group (``FineTuning.probe``) and what ``phase`` made of them."""
    rgn, params = record["rgn"], record["params"]
    signal = record.get("signal") or {}
    groups = list(rgn)
    norm = Auto.normalised(rgn, groups)
    scales = phase.group_lr_scales
    lines = [
        f"gradient probe: {record['batches']} batches forward and backward in {record['seconds']:.1f} s"
        " (signal: the share of a batch's gradient that is the expected gradient; rgn: relative gradient norm"
        " ||grad|| / ||weight||, rgn/max: over the largest below the head)",
        f"{'group':<20}{'params':>12}{'signal':>8}{'rgn':>11}{'rgn/max':>9}  {'lr scale' if scales else 'trains'}",
    ]
    for g, v in rgn.items():
        chosen = f"{scales[g]:.3g}" if scales else ("yes" if g in phase.groups else "-")
        shown = "head" if g == groups[-1] else f"{norm[g]:.3f}"
        lines.append(f"{g:<20}{params.get(g, 0):>12,}{signal.get(g, 0.0):>8.3f}{v:>11.3g}{shown:>9}  {chosen}")
    return "\n".join(lines)
