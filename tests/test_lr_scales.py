"""Each layer group's learning rate in the optimizer is the one the run prints and logs, under every scheduler and
strategy: layer-wise decay, a milestone's or a re-tuning round's scale and ``auto``'s per-group scales reach the
optimizer (under ``plateau`` they once did not: every group trained at the base LR)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from test_layer_selection import tiny_effnet

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import Auto, FreezeUnfreeze, Full, Gradual, Head, Milestones, Retune
from peft_lightning.tasks.schedules import GroupPlateau

from helpers import tiny_data

DECAY = 0.7
STRATEGIES = {  # fresh strategies for each run (retune's keeps its rounds)
    "full": lambda: Full(),
    "head": lambda: Head(3),
    "freeze_unfreeze": lambda: FreezeUnfreeze(at_epoch=1),
    "gradual": lambda: Gradual(),
    "milestones": lambda: Milestones([{"epoch": 1, "groups": 4, "lr_scale": 0.3}]),
    "retune": lambda: Retune(lr_scale=0.3, round_epochs=1),
    "auto_scale": lambda: Auto("scale", probe_batches=2, every=1),
    "auto_depth": lambda: Auto(probe_batches=2, lp=0.3),
}
SCHEDULERS = ["cosine", "linear", "constant", "onecycle", "plateau"]


class Recorder(Callback):
    """At every optimizer step: each named group's LR in the optimizer, and the scales the run set (what its tables
    print): layer decay, the phase's scale, auto's per-group scales from its last probe."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ft = FineTuning.find(trainer)
        groups = [g for g, _ in pl_module.layer_groups()]
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        sched = trainer.lr_scheduler_configs[0].scheduler
        self.steps.append(
            {
                "step": trainer.global_step,
                "lrs": lrs,
                # what the run prints: the layer-decay column of show_groups, the phase's scale (milestone, round),
                # and auto scale's column of the probe table (RGN over the largest below the head)
                "decay": {g: DECAY ** (len(groups) - 1 - i) for i, g in enumerate(groups)},
                "phase": ft.strategy.phase(ft.state(trainer.current_epoch, groups)).lr_scale,
                "auto": dict(Auto.normalised(ft.probe["rgn"], groups))
                if ft.probe and ft.strategy.mode == "scale"
                else dict(pl_module.lr_scales.group),  # depth: the body's warm-up after the linear probe
                "plateau": sched.scale if isinstance(sched, GroupPlateau) else None,
                "lr": pl_module.lr,
            }
        )


def expected(record: dict, name: str) -> float:
    group = name.removesuffix(".no_wd")
    return record["decay"][group] * record["phase"] * record["auto"].get(group, 1.0)


@pytest.mark.parametrize(
    "scheduler, strategy",
    [("plateau", s) for s in STRATEGIES]
    + [(s, k) for s in SCHEDULERS if s != "plateau" for k in ("milestones", "auto_scale")],
)
def test_each_groups_lr_in_the_optimizer_is_what_the_run_prints_and_logs(
    scheduler, strategy, image_folder, one_thread, tmp_path
):
    model = tiny_effnet(scheduler=scheduler, warmup=0.0)
    recorder = Recorder()
    ft = FineTuning(STRATEGIES[strategy](), lr_decay=DECAY)
    trainer = Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, ft, LearningRateMonitor(logging_interval="step")],  # the recorder sees the LRs in use
    )
    trainer.fit(model, tiny_data(image_folder, model, image_size=32))
    assert len(recorder.steps) >= 4
    for record in recorder.steps:
        lrs = record["lrs"]
        head = lrs["head"] / expected(record, "head")  # the schedule's own factor at this step, the same for all
        for name, lr in lrs.items():
            assert lr == pytest.approx(head * expected(record, name), rel=1e-6), (record["step"], name)
        if scheduler == "plateau":
            # the plateau's own factor: halved 0, 1, 2 ... times (the phase scales, 0.3, are no power of 0.5)
            halvings = math.log2(record["lr"] / head)
            assert halvings == pytest.approx(round(halvings), abs=1e-6) and round(halvings) >= 0, record["step"]
            if record["plateau"] is not None:
                assert head == pytest.approx(record["lr"] * record["plateau"], rel=1e-6)
    # the scales are not all 1: the check above would hold for a run that dropped them
    assert any(lr != lrs["head"] for lr in lrs.values())
    # what metrics.csv logged at each step is what the optimizer used in that step
    rows = list(csv.DictReader(open(Path(tmp_path) / "metrics.csv")))
    logged = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("lr-AdamW/") and value:
                logged[(int(row["step"]), key.removeprefix("lr-AdamW/"))] = float(value)
    by_step = {r["step"]: r["lrs"] for r in recorder.steps}
    checked = 0
    for (step, name), value in logged.items():
        if step in by_step and name in by_step[step]:
            assert value == pytest.approx(by_step[step][name], rel=1e-6), (step, name)
            checked += 1
    assert checked >= len(recorder.steps)


def test_plateau_halves_every_group_and_keeps_their_scales():
    import torch

    w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW([{"params": [w[0]]}, {"params": [w[1]]}], lr=1.0)
    scales = {"a": 1.0, "b": 0.1}
    sched = GroupPlateau(opt, [lambda: scales["a"], lambda: scales["b"]], mode="max", patience=0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
    sched.step(0.5)  # the first value is the best so far
    sched.step(0.4)  # worse: halved
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])
    scales["b"] = 0.2  # a new phase between epochs
    sched.refresh()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.1])
    state = sched.state_dict()
    assert "factors" not in state
    again = GroupPlateau(opt, [lambda: scales["a"], lambda: scales["b"]], mode="max", patience=0)
    again.load_state_dict(state)
    assert again.scale == 0.5 and [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.1])
