"""The optimizer every task trains with: parameter groups named after the layer groups (no weight decay on biases
and norm weights), AdamW / Adam / SGD at ``lr`` (scaled with the global batch under ``scale_lr``), and the LR
schedule (``schedules.py``) whose per-group factors the fine-tuning callback changes live through ``lr_scales``."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peft_lightning.tasks.schedules import GroupLambdaLR, GroupPlateau, warmup_cosine

if TYPE_CHECKING:
    from peft_lightning.tasks.base import FineTuneTask


def param_groups(task: FineTuneTask) -> Iterator[dict[str, Any]]:
    """The optimizer's parameter groups, one per layer group (and its ``.no_wd`` twin for biases and norm weights),
    named after it, at ``task.lr`` times the layer's LR scale; parameters in no layer group form ``other``."""
    params = dict(task.named_parameters())
    seen: set[str] = set()
    for name, names in task.layer_groups():
        names = [n for n in names if n in params and n not in seen]
        seen.update(names)
        scale = task.lr_scales.layer.get(name, 1.0)
        # Biases and norm weights (1-D) take no weight decay: the timm / HF convention.
        decay = [params[n] for n in names if params[n].ndim > 1]
        no_decay = [params[n] for n in names if params[n].ndim <= 1]
        if decay:
            yield {"name": name, "params": decay, "lr": task.lr * scale, "weight_decay": task.weight_decay}
        if no_decay:
            yield {"name": f"{name}.no_wd", "params": no_decay, "lr": task.lr * scale, "weight_decay": 0.0}
    rest = [p for n, p in params.items() if n not in seen]
    if rest:
        yield {"name": "other", "params": rest, "lr": task.lr, "weight_decay": task.weight_decay}


def configure_optimizers(task: FineTuneTask) -> Any:
    """``FineTuneTask.configure_optimizers``: the optimizer over ``param_groups`` and the LR schedule of
    ``task.scheduler_name``, whose per-group factors are read live from ``task.lr_scales``."""
    # Every parameter is in the optimizer from the start, frozen or not: frozen ones get no gradient, so the
    # optimizer skips them, and unfreezing later needs no `add_param_group` (which LR schedulers mishandle and
    # which breaks resuming). Each group is named after its layer group for the logged learning rates.
    from peft_lightning.engine.batch import global_batch, lr_scale

    batch = global_batch(task.trainer) if task.scale_lr != "none" else None
    if task.scale_lr != "none" and batch is None:
        from peft_lightning.errors import UsageError

        raise UsageError("--model.scale_lr needs the per-device batch size (the datamodule's batch_size)")
    task.lr = task.base_lr * (lr_scale(task.scale_lr, batch.size, task.reference_batch()) if batch else 1.0)
    groups = list(param_groups(task))
    if task.optimizer_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=task.lr, momentum=task.momentum, nesterov=True)
    elif task.optimizer_name == "adam":
        opt = torch.optim.Adam(groups, lr=task.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=task.lr)
    total = int(task.trainer.estimated_stepping_batches)
    if task.schedule_epochs and task.trainer.max_epochs and task.trainer.max_epochs > 0:
        total = total * task.schedule_epochs // task.trainer.max_epochs
    total = max(1, total)
    warmup = int(task.warmup * total) if task.warmup < 1 else int(task.warmup)
    # The layer, phase and group scales of the fine-tuning callback are read live by every scheduler: the
    # callback can change them between epochs (milestones, retune rounds, auto) without touching the optimizer,
    # and a resumed run recomputes them.
    names = [g["name"].removesuffix(".no_wd") for g in groups]
    for g in opt.param_groups:  # the scales are applied by the schedulers below
        g["lr"] = g["initial_lr"] = task.lr
    if task.scheduler_name == "plateau":
        factors = [partial(task.lr_scales.factor, n) for n in names]
        sched: Any = GroupPlateau(opt, factors, mode=task.monitor_mode, factor=0.5, patience=1)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "monitor": task.monitor, "interval": "epoch"},
        }
    if task.scheduler_name == "onecycle" and not task.warmup:
        warmup = int(0.3 * total)  # OneCycleLR's default pct_start
    shape = warmup_cosine(warmup, total, task.min_lr_ratio, task.scheduler_name)
    sched = GroupLambdaLR(opt, [_group_lambda(task, shape, n) for n in names])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _group_lambda(task: FineTuneTask, shape: Any, name: str) -> Any:
    return lambda step: shape(step) * task.lr_scales.factor(name)
