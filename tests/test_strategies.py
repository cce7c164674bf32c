"""Every strategy, phase by phase: which groups changed and at which LR; schedulers; re-tuning rounds; resume."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import BUILTIN, FreezeUnfreeze, Milestone, Retune

from helpers import PhaseRecorder, StopAfterEpoch, train

ALL = ["stem", *[f"blocks.{i}" for i in range(6)], "head"]


@pytest.mark.parametrize(
    "strategy, kw, phases",
    [
        ("head", {}, [["head"], ["head"]]),
        ("full", {}, [ALL, ALL]),
        ("freeze_unfreeze", {"at_epoch": 1, "groups": 2}, [["head"], ["blocks.5", "head"]]),
        ("gradual", {"every": 1}, [["head"], ["blocks.5", "head"], ["blocks.4", "blocks.5", "head"]]),
        (
            "milestones",
            {"milestones": [Milestone(1, 3, 0.5), Milestone(2, 1)]},
            [["head"], ["blocks.4", "blocks.5", "head"], ["head"]],
        ),
    ],
)
def test_phase_by_phase(image_folder, strategy, kw, phases):
    rec = PhaseRecorder()
    ft = FineTuning(BUILTIN[strategy](**kw))
    train(image_folder, ft, epochs=len(phases), extra=[rec], model_kw={"scheduler": "constant"})
    assert rec.changed == phases
    if strategy == "milestones":  # the milestone's LR scale applies to every group in its phase
        assert [round(lrs["head"], 6) for lrs in rec.lrs] == [1e-2, 5e-3, 1e-2]


def test_param_groups_never_change_across_unfreezes(image_folder):
    ft = FineTuning("gradual")
    _, trainer = train(image_folder, ft, epochs=3)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names[0] == "stem" and "head" in names and len(names) == len(set(names))


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau"])
def test_schedulers_run_across_an_unfreeze(image_folder, scheduler):
    rec = PhaseRecorder()
    model, trainer = train(
        image_folder,
        FineTuning(FreezeUnfreeze(at_epoch=1), lr_decay=0.5),
        epochs=3,
        extra=[rec],
        model_kw={"scheduler": scheduler, "warmup": 0.2},
    )
    assert rec.changed[0] == ["head"] and rec.changed[1] == ALL
    first, last = rec.lrs[0], rec.lrs[-1]
    if scheduler == "cosine":
        steps_per_epoch = trainer.num_training_batches
        total = steps_per_epoch * 3
        from peft_lightning.tasks.schedules import warmup_cosine

        shape = warmup_cosine(int(0.2 * total), total)
        # The LR of each group follows the one schedule through the unfreeze, scaled by its layer decay.
        assert last["head"] == pytest.approx(1e-2 * shape(2 * steps_per_epoch))
        assert last["blocks.5"] == pytest.approx(0.5 * last["head"])
        assert first["stem"] == pytest.approx(1e-2 * 0.5**7 * shape(0))
    else:
        assert all(v > 0 for v in last.values())


SCHEDULERS = ["cosine", "linear", "constant", "onecycle", "plateau"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "onecycle"])
def test_every_schedule_shape_is_defined_for_every_length_and_warmup(kind):
    import math

    from peft_lightning.tasks.schedules import warmup_cosine

    for total in range(1, 13):
        for warmup in sorted({0, 1, total // 10, total // 2, total, total + 3}):
            shape = warmup_cosine(warmup, total, 0.0, kind)
            values = [shape(step) for step in range(total + 6)]  # past the end too: a resumed or longer round
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (total, warmup, values)
            assert max(values) > 0.0


def _tiny_fit(image_folder, finetuning: FineTuning, scheduler: str, steps: int, epochs: int) -> Trainer:
    from lightning.pytorch import Trainer

    from helpers import tiny_data, tiny_model

    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=steps,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[finetuning],
    )
    trainer.fit(tiny_model(scheduler=scheduler, warmup=0.1), tiny_data(image_folder))
    assert trainer.global_step == steps * epochs or finetuning.name == "retune"
    return trainer


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps, epochs", [(1, 1), (2, 1), (3, 1), (2, 5)])
def test_every_scheduler_trains_any_number_of_steps(image_folder, scheduler, steps, epochs, one_thread):
    # 10 steps with warmup 0.1 is one whole warmup step: torch's OneCycleLR divided by zero there.
    trainer = _tiny_fit(image_folder, FineTuning("full"), scheduler, steps, epochs)
    assert all(g["lr"] >= 0 for g in trainer.optimizers[0].param_groups)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(
    "strategy, kw",
    [
        ("head", {}),
        ("freeze_unfreeze", {"at_epoch": 1}),
        ("gradual", {"every": 1}),
        ("milestones", {"milestones": [Milestone(1, 2, 0.5)]}),
        ("retune", {"round_epochs": 1, "max_rounds": 2}),
    ],
)
def test_every_scheduler_runs_every_strategy_on_one_step_epochs(image_folder, scheduler, strategy, kw, one_thread):
    # One step per epoch, phases and rounds changing every epoch: the shortest schedules a strategy makes.
    ft = FineTuning(BUILTIN[strategy](**kw), monitor="val/loss", mode="min")
    trainer = _tiny_fit(image_folder, ft, scheduler, steps=1, epochs=3)
    assert trainer.global_step >= 2


def test_retune_rounds_unfreeze_restore_best_and_print_a_table(image_folder, capsys):
    ft = FineTuning(Retune(patience=1, round_epochs=2, per_round=2, max_rounds=3), monitor="val/loss", mode="min")
    rec = PhaseRecorder()
    optimizers = []

    class Opt(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            optimizers.append(trainer.optimizers[0])

    model, trainer = train(image_folder, ft, epochs=20, extra=[rec, Opt()])
    assert 2 <= len(ft.rounds.history) <= 3
    assert [r["groups"] for r in ft.rounds.history] == [1 + 2 * i for i in range(len(ft.rounds.history))]
    assert rec.changed[0] == ["head"]
    # Round 1 trains two more groups, with a fresh optimizer.
    first_of_round1 = ft.rounds.history[0]["epochs"]
    assert rec.changed[first_of_round1] == ["blocks.4", "blocks.5", "head"]
    assert optimizers[first_of_round1] is not optimizers[first_of_round1 - 1]
    # The final weights are the best seen: their val loss equals the best recorded.
    val = trainer.validate(model, trainer.datamodule, verbose=False)[0]["val/loss"]
    assert val == pytest.approx(ft.rounds.best, rel=1e-4)
    table = capsys.readouterr().out
    assert "round" in table and "trainable" in table and "best val/loss" in table


@pytest.mark.parametrize(
    "strategy, kw, stop_after",
    [
        ("freeze_unfreeze", {"at_epoch": 2}, 0),  # mid-phase
        ("freeze_unfreeze", {"at_epoch": 2}, 2),  # just after the unfreeze
        ("retune", {"round_epochs": 2, "patience": 1}, 1),  # mid-round / at a turn
    ],
)
def test_resume_matches_an_uninterrupted_run(image_folder, tmp_path, strategy, kw, stop_after):
    epochs = 4

    def ft() -> FineTuning:  # a fresh strategy each run: retune's keeps its rounds
        return FineTuning(BUILTIN[strategy](**kw), monitor="val/loss", mode="min")

    full, _ = train(image_folder, ft(), epochs)
    train(image_folder, ft(), epochs, root=tmp_path, extra=[StopAfterEpoch(stop_after)])
    resumed, _ = train(image_folder, ft(), epochs, root=tmp_path / "again", ckpt_path=str(tmp_path / "last.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_show_groups_prints_and_exits(tmp_path, cli):
    code, out, err = cli(
        "fit",
        "--recipe",
        "effnet_fashion",
        "--finetuning.show_groups",
        "true",
        "--finetuning.lr_decay",
        "0.5",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("group"))
    rows = [line.split() for line in lines[start + 1 :] if line.strip()]
    assert [r[0] for r in rows] == ["stem", *[f"blocks.{i}" for i in range(7)], "head"]
    assert rows[-1][1] == "12,810" and rows[-1][2] == "1" and rows[-2][2] == "0.5"
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_milestones_from_yaml_via_the_cli(tmp_path, cli):
    cfg = tmp_path / "ms.yaml"
    cfg.write_text(
        "recipe: effnet_fashion\nfinetuning:\n  strategy:\n    class_path: Milestones\n    init_args:\n"
        "      milestones:\n        - {epoch: 0, groups: 1}\n        - {epoch: 1, groups: 3, lr_scale: 0.3}\n"
    )
    code, out, err = cli("fit", "-c", str(cfg), "--print_config")
    assert code == 0, err[-2000:]
    assert "lr_scale: 0.3" in out


def test_fsdp_is_configured_for_frozen_groups_and_deepspeed_is_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from helpers import tiny_model

    fsdp = FSDPStrategy()
    FineTuning("gradual").setup(SimpleNamespace(strategy=fsdp, datamodule=None), tiny_model(), "fit")
    assert fsdp.kwargs["use_orig_params"] is True
    deepspeed = object.__new__(DeepSpeedStrategy)  # the class, without needing deepspeed installed
    with pytest.raises(ValueError, match="DeepSpeed"):
        FineTuning("head").setup(SimpleNamespace(strategy=deepspeed, datamodule=None), tiny_model(), "fit")


def test_retune_cut_short_by_max_epochs_still_reports_its_round(image_folder, capsys):
    ft = FineTuning(Retune(round_epochs=5), monitor="val/loss", mode="min")
    train(image_folder, ft, epochs=2)
    assert [r["epochs"] for r in ft.rounds.history] == [2]
    assert "best val/loss" in capsys.readouterr().out
