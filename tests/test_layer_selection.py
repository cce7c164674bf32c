"""Choosing the layers that train: group selectors, the strategies as classes, a user's strategy, and `auto`'s
gradient probe (select and scale)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from test_recsys import synth  # noqa: F401  (fixture)
from test_text import datamodule, sentiment_csv, tiny_bert  # noqa: F401  (fixtures)

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.rounds import Rounds
from peft_lightning.callbacks.strategies import (
    Auto,
    FreezeUnfreeze,
    Gradual,
    Head,
    Milestone,
    Milestones,
    Phase,
    Retune,
    State,
    Strategy,
    select_groups,
)
from peft_lightning.errors import UsageError

from helpers import tiny_cli_args, tiny_data

GROUPS = ["stem", *[f"blocks.{i}" for i in range(7)], "head"]


@pytest.mark.parametrize(
    "selector, expected",
    [
        (["stem", "blocks.0", "head"], ["stem", "blocks.0", "head"]),
        ("blocks.4-6", ["blocks.4", "blocks.5", "blocks.6"]),
        ("blocks.6-4", ["blocks.4", "blocks.5", "blocks.6"]),
        ("blocks.*", [f"blocks.{i}" for i in range(7)]),
        (3, ["blocks.5", "blocks.6", "head"]),
        ("2", ["blocks.6", "head"]),
        (["head", "blocks.0-1", "head"], ["blocks.0", "blocks.1", "head"]),  # model order, no duplicates
        (None, GROUPS),
    ],
)
def test_selectors_name_any_set_of_groups(selector, expected):
    assert select_groups(selector, GROUPS) == expected


@pytest.mark.parametrize("selector", ["blocks.9", "layer.*", ["head", "neck"], "blocks.8-9"])
def test_a_selector_that_matches_nothing_names_the_groups_there_are(selector):
    with pytest.raises(UsageError, match="stem, blocks.0"):
        select_groups(selector, GROUPS)
    with pytest.raises(UsageError, match=">= 1"):
        select_groups(0, GROUPS)


def phases(strategy: Strategy, epochs: int, **state) -> list[list[str]]:
    return [strategy.phase(State(epoch=e, groups=GROUPS, **state)).groups for e in range(epochs)]


def test_builtin_strategies_work_on_sets_with_holes():
    assert phases(FreezeUnfreeze(head="head", at_epoch=1, groups=["blocks.0", "head"]), 2) == [
        ["head"],
        ["blocks.0", "head"],
    ]
    # gradual adds the target's groups from the top down, skipping what is not in the target
    assert phases(Gradual(head="head", at_epoch=1, groups=["stem", "blocks.0", "blocks.6", "head"]), 5) == [
        ["head"],
        ["blocks.6", "head"],
        ["blocks.0", "blocks.6", "head"],
        ["stem", "blocks.0", "blocks.6", "head"],
        ["stem", "blocks.0", "blocks.6", "head"],
    ]
    ms = Milestones([Milestone(1, ["blocks.0", "head"], 0.5), Milestone(2, 2)])
    assert phases(ms, 3) == [["head"], ["blocks.0", "head"], ["blocks.6", "head"]]
    assert ms.phase(State(epoch=1, groups=GROUPS)).lr_scale == 0.5


def test_retune_rounds_add_groups_top_down_or_by_gradient_norm_and_resume():
    top = Retune(head="head", per_round=2, lr_scale=0.5)
    assert [top.phase(State(0, GROUPS, round=r)).groups for r in range(3)] == [
        ["head"],
        ["blocks.5", "blocks.6", "head"],
        ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "head"],
    ]
    assert top.phase(State(0, GROUPS, round=2)).lr_scale == 0.25
    rgn = Retune(head="head", per_round=1, order="rgn")
    probe = {g: 0.1 for g in GROUPS} | {"blocks.0": 0.9, "stem": 0.5}
    assert rgn.phase(State(0, GROUPS, round=1, probe=probe)).groups == ["blocks.0", "head"]
    probe2 = probe | {"blocks.0": 0.0}  # a new probe at round 2 picks among the groups still frozen
    assert rgn.phase(State(0, GROUPS, round=2, probe=probe2)).groups == ["stem", "blocks.0", "head"]
    resumed = Retune(head="head", per_round=1, order="rgn")
    resumed.load_state_dict(rgn.state_dict())
    assert resumed.phase(State(0, GROUPS, round=2, probe=None)).groups == ["stem", "blocks.0", "head"]


def test_auto_selects_by_threshold_or_count_and_scales_by_rgn_normalised_below_the_head():
    # A fresh head's RGN dwarfs the body's: it is left out of the normalisation and always trains at full LR.
    probe = {g: 0.01 for g in GROUPS} | {"blocks.0": 0.8, "blocks.1": 0.5, "head": 20.0}
    assert Auto("select", threshold=0.5).phase(State(0, GROUPS, probe=probe)).groups == ["blocks.0", "blocks.1", "head"]
    assert Auto("select", count=1).phase(State(0, GROUPS, probe=probe)).groups == ["blocks.0", "head"]
    scaled = Auto("scale").phase(State(0, GROUPS, probe=probe))
    assert scaled.groups == GROUPS and scaled.group_lr_scales["blocks.0"] == 1.0
    assert scaled.group_lr_scales["blocks.1"] == pytest.approx(0.625) and scaled.group_lr_scales["head"] == 1.0


class FirstBlockAndHead(Strategy):
    def phase(self, state):
        return Phase(select_groups(["blocks.0", "head"], state.groups), lr_scale=0.5)


def test_a_user_strategy_is_imported_by_path_with_its_arguments():
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)  # the parser LightningCLI builds for --finetuning.*
    parser.add_class_arguments(FineTuning, "finetuning")

    def strategy(*args: str) -> Strategy:
        return parser.instantiate(parser.parse_args(["--finetuning.strategy", *args])).finetuning.strategy

    assert strategy("test_layer_selection.FirstBlockAndHead").phase(State(0, GROUPS)).groups == ["blocks.0", "head"]
    assert strategy("peft_lightning.callbacks.strategies.Auto", "--finetuning.strategy.mode", "scale").mode == "scale"
    with pytest.raises(ArgumentError, match="nowhere.Nothing"):
        strategy("nowhere.Nothing")
    with pytest.raises(ArgumentError, match="State"):
        strategy("peft_lightning.callbacks.strategies.State")
    with pytest.raises(ArgumentError, match="colour"):
        strategy("Auto", "--finetuning.strategy.colour", "red")


# --- through training: holes in the frozen set, auto, a user strategy, every domain ---
def snapshot(model) -> dict[str, list[torch.Tensor]]:
    state = model.state_dict()  # parameters and BatchNorm statistics, by group
    out: dict[str, list[torch.Tensor]] = {}
    for group, names in model.layer_groups():
        prefixes = {n.rsplit(".", 1)[0] for n in names}
        out[group] = [v.clone() for k, v in state.items() if k.rsplit(".", 1)[0] in prefixes]
    return out


def moved(before, model) -> list[str]:
    after = snapshot(model)
    return [g for g in before if any(not torch.equal(a, b) for a, b in zip(before[g], after[g]))]


def tiny_effnet(**kw):
    from lightning.pytorch import seed_everything

    from peft_lightning.tasks.vision import ImageClassifier

    seed_everything(7)
    return ImageClassifier("test_efficientnet", num_classes=3, pretrained=False, lr=1e-2, **kw)


def fit_tiny(model, folder, callback, epochs=1, **kw):
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
        **kw,
    )
    trainer.fit(model, tiny_data(folder, model, image_size=32))
    return trainer


def test_a_set_with_holes_trains_only_its_groups_and_their_batchnorm(image_folder, one_thread):
    model = tiny_effnet()
    before = snapshot(model)
    fit_tiny(model, image_folder, FineTuning(Head(["blocks.0", "head"])))
    assert moved(before, model) == ["blocks.0", "head"]  # BatchNorm statistics of the frozen groups did not move


def test_auto_select_probes_chooses_and_freezes_the_rest(image_folder, one_thread, capsys):
    model = tiny_effnet()
    before = snapshot(model)
    ft = FineTuning(Auto("select", count=2, probe_batches=2))
    fit_tiny(model, image_folder, ft)
    rgn = ft.probe["rgn"]
    assert set(rgn) == {g for g, _ in model.layer_groups()} and all(v >= 0 for v in rgn.values())
    body = [g for g, _ in model.layer_groups()][:-1]
    chosen = sorted(body, key=lambda g: -rgn[g])[:2]
    expected = [g for g, _ in model.layer_groups() if g in {*chosen, "head"}]
    assert moved(before, model) == expected
    table = capsys.readouterr().out
    assert "gradient probe: 2 batches" in table and "rgn/max" in table


def test_auto_scale_trains_everything_at_lr_times_normalised_rgn(image_folder, one_thread):
    model = tiny_effnet(scheduler="constant")
    ft = FineTuning(Auto("scale", probe_batches=1, every=1))
    trainer = fit_tiny(model, image_folder, ft)
    scales = model.lr_scales.group
    assert scales["head"] == 1.0 and min(scales.values()) < 1.0
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    low = min(scales, key=scales.get)
    assert lrs[low] / lrs["head"] == pytest.approx(scales[low], rel=1e-6)


def test_auto_in_the_other_domains(sentiment_csv, tiny_bert, synth, tmp_path, one_thread):  # noqa: F811
    from peft_lightning.data.movielens import MovieLensDataModule
    from peft_lightning.tasks.recsys import Recommender
    from peft_lightning.tasks.text import TextClassifier

    text = TextClassifier(tiny_bert, num_labels=3, lr=1e-2)
    ft2 = FineTuning(Auto(probe_batches=1))
    Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[ft2],
    ).fit(text, datamodule(sentiment_csv, tiny_bert, tmp_path))
    assert set(ft2.probe["rgn"]) == {g for g, _ in text.layer_groups()}
    rec = Recommender("mf", num_users=30, num_items=40, lr=1e-2)
    ft3 = FineTuning(Auto(probe_batches=1))
    Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[ft3],
    ).fit(rec, MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=2, batch_size=32))
    assert set(ft3.probe["rgn"]) == {g for g, _ in rec.layer_groups()}


class EveryOtherRound(Strategy):
    """A user's evaluation-driven strategy: round r trains the head and every other block from the top, r of them.

    Args:
        round_epochs: most epochs in one round.
        min_delta: the smallest change of the monitored metric that counts as an improvement.
    """

    def __init__(self, round_epochs: int = 3, min_delta: float = 0.0) -> None:
        self.rounds = Rounds(round_epochs=round_epochs, min_delta=min_delta)

    def phase(self, state):
        blocks = [g for g in reversed(state.groups) if g.startswith("blocks.")][::2]
        return Phase(select_groups(["head", *blocks[: state.round]], state.groups))

    def done(self, state):
        return state.round >= 2


def test_a_user_strategy_runs_through_the_cli_with_rounds_and_resumes(image_folder, tmp_path, cli):
    common = [
        "--finetuning.strategy",
        "test_layer_selection.EveryOtherRound",
        "--finetuning.strategy.round_epochs",
        "1",
        "--finetuning.strategy.min_delta",
        "-1",
        "--finetuning.monitor",
        "val/loss",
        "--finetuning.mode",
        "min",
        "--data.augment",
        "false",
        "--trainer.deterministic",
        "true",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]

    def fit(root: Path, epochs: int, *extra: str) -> Path:
        code, out, err = cli(*tiny_cli_args(image_folder, root, *common, "--trainer.max_epochs", str(epochs), *extra))
        assert code == 0, err[-2000:]
        (run,) = root.glob("vit_cifar/*")
        return run

    run = fit(tmp_path / "whole", 3)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {r["finetune/round"] for r in rows if r.get("finetune/round")} == {"0.0", "1.0", "2.0"}
    # Stopped after round 0, resumed: the same weights as the run that never stopped.
    stopped = fit(tmp_path / "stopped", 1)
    resumed = fit(tmp_path / "resumed", 3, "--ckpt_path", str(stopped / "checkpoints" / "last.ckpt"))
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert any("strategy_state" in v for v in a["callbacks"].values())
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k


def test_a_set_with_holes_caches_below_its_lowest_group(image_folder, one_thread):
    model = tiny_effnet()
    before = snapshot(model)
    ft = FineTuning(Head(["blocks.0", "head"]), cache_features=True)
    fit_tiny(model, image_folder, ft)
    # The frozen blocks between blocks.0 and the head run in the rest of the model, in eval mode, as uncached.
    assert moved(before, model) == ["blocks.0", "head"]
    assert any("input of blocks.0" in note for note in ft.cache_summary())


def test_show_groups_marks_what_trains_in_each_phase(tmp_path, cli):
    code, out, err = cli(
        "fit",
        "--recipe",
        "effnet_fashion",
        "--finetuning.show_groups",
        "true",
        "--finetuning.strategy",
        "Gradual",
        "--finetuning.strategy.groups",
        "[stem, blocks.5-6, head]",
        "--finetuning.strategy.at_epoch",
        "1",
        "--trainer.max_epochs",
        "4",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("group"))
    assert "epoch 0" in header and "epoch 3" in header
    marks = {line.split()[0]: line.split()[3:] for line in lines if line.split() and line.split()[0] in GROUPS}
    assert marks["head"] == ["x", "x", "x", "x"] and marks["blocks.6"] == [".", "x", "x", "x"]
    assert marks["stem"] == [".", ".", ".", "x"] and marks["blocks.0"] == [".", ".", ".", "."]


def test_a_selector_that_names_no_group_stops_before_training(image_folder, tmp_path, cli):
    code, _, err = cli(
        *tiny_cli_args(
            image_folder, tmp_path, "--finetuning.strategy", "Head", "--finetuning.strategy.groups", "[blocks.0, neck]"
        )
    )
    assert code == 2 and "'neck' matches none of the model's groups" in err and err.strip().count("\n") == 0


def test_adapters_in_a_set_with_holes_train_only_there(image_folder, one_thread):
    from peft_lightning.adapters import AdapterConfig
    from peft_lightning.tasks.vision import ImageClassifier

    model = ImageClassifier("test_vit", num_classes=3, pretrained=False, lr=1e-2, peft=AdapterConfig("lora", r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_tiny(model, image_folder, FineTuning(Head(["blocks.0", "head"])))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    groups = dict(model.layer_groups())
    assert changed and changed <= model.trainable_parameter_names()  # never the frozen base
    assert changed <= set(groups["blocks.0"]) | set(groups["head"])
    assert changed & set(groups["blocks.0"]) and changed & set(groups["head"])


@pytest.mark.slow
def test_under_ddp_every_rank_probes_the_same_figures_and_chooses_the_same_groups(image_folder, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "ddp_auto.py"
    script.write_text(f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from lightning.pytorch import Callback, Trainer
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import Auto
from helpers import tiny_data, tiny_model
ft = FineTuning(Auto("select", count=2, probe_batches=2))
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                  limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ft])
model = tiny_model()
trainer.fit(model, tiny_data({str(image_folder)!r}, batch_size=4))
trained = [g for g, names in model.layer_groups() if any(p.requires_grad for n, p in model.named_parameters() if n in names)]
open({str(tmp_path)!r} + f"/rank{{trainer.global_rank}}.json", "w").write(json.dumps({{"rgn": ft.probe["rgn"], "trained": trained}}))
""")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and len(r0["trained"]) == 3  # the two highest below the head, and the head


@pytest.mark.parametrize("mode", ["select", "scale", "depth"])
def test_a_resumed_auto_run_restores_its_choice_instead_of_probing_again(
    image_folder, tmp_path, monkeypatch, mode, one_thread
):
    from peft_lightning.callbacks import probe as probe_module

    from helpers import StopAfterEpoch, train

    kw = {"mode": mode, "count": 2, "probe_batches": 2, "every": 2}
    full, _ = train(image_folder, FineTuning(Auto(**kw)), 3)
    train(image_folder, FineTuning(Auto(**kw)), 3, root=tmp_path, extra=[StopAfterEpoch(0)])
    calls = []
    real = probe_module.probe
    monkeypatch.setattr(probe_module, "probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed, _ = train(
        image_folder, FineTuning(Auto(**kw)), 3, root=tmp_path / "again", ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert calls == []
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_the_probe_is_refused_under_fsdp_with_one_line():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from helpers import tiny_model

    with pytest.raises(UsageError, match="does not run under FSDP"):
        FineTuning("auto").setup(SimpleNamespace(strategy=FSDPStrategy(), datamodule=None), tiny_model(), "fit")
    FineTuning(Head(["blocks.0", "head"])).setup(
        SimpleNamespace(strategy=(fsdp := FSDPStrategy()), datamodule=None), tiny_model(), "fit"
    )
    assert fsdp.kwargs["use_orig_params"] is True  # a set with holes under FSDP


def test_auto_can_probe_after_the_head_has_trained_a_few_steps(image_folder, one_thread):
    model = tiny_effnet()
    seen = []

    class Trains(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(
                [
                    g
                    for g, names in pl_module.layer_groups()
                    if any(p.requires_grad for n, p in pl_module.named_parameters() if n in names)
                ]
            )

    ft = FineTuning(Auto("select", probe_after=1, count=1, probe_batches=1))
    Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ft, Trains()],
    ).fit(model, tiny_data(image_folder, model, image_size=32))
    assert seen[0] == ["head"] and len(seen[1]) == 2 and seen[1][-1] == "head"  # step 0 the head, then the probe's
    assert ft.probe is not None


def test_auto_depth_trains_the_fewest_top_groups_that_hold_the_signal():
    auto = Auto(coverage=0.6, floor=0.02)
    signal = {"stem": 0.0, **{f"blocks.{i}": 0.01 for i in range(5)}, "blocks.5": 0.03, "blocks.6": 0.09}
    # body total 0.17: blocks.6 holds 53%, with blocks.5 71% >= 60%
    assert auto.cut(signal, GROUPS) == ["blocks.5", "blocks.6", "head"]
    assert Auto(coverage=1.0, floor=0).cut(signal, GROUPS) == GROUPS  # LP-FT: everything after the probe
    assert auto.cut({g: 0.01 for g in GROUPS}, GROUPS) == GROUPS  # no resolved signal: every group (LP-FT)
    before = auto.phase(State(epoch=0, groups=GROUPS))
    after = auto.phase(State(epoch=0, groups=GROUPS, probe={g: 1.0 for g in GROUPS}, signal=signal))
    assert before.groups == ["head"] and after.groups == ["blocks.5", "blocks.6", "head"]
    with pytest.raises(UsageError, match="lp must be in"):
        Auto(lp=1.0)


def test_auto_depth_probes_after_its_linear_probe_and_says_what_it_chose(image_folder, one_thread, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from peft_lightning.output.summary import summary_rows

    seen = []

    class Trains(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            params = dict(pl_module.named_parameters())
            seen.append([g for g, ns in pl_module.layer_groups() if any(params[n].requires_grad for n in ns)])
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    lrs: list[dict[str, float]] = []
    model = tiny_effnet(scheduler="constant")
    ft = FineTuning(Auto(probe_batches=2, lp=0.5))
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ft, Trains()],
    )
    trainer.fit(model, tiny_data(image_folder, model, image_size=32))
    signal, chosen = ft.probe["signal"], ft.probe["chosen"]
    assert ft.probe["step"] == 2 and all(0.0 <= v <= 1.0 for v in signal.values())
    assert chosen == Auto().cut(signal, [g for g, _ in model.layer_groups()])
    assert seen == [["head"], ["head"], chosen, chosen]  # the linear probe, then what the probe chose
    # the body warms up over as many steps as the head trained alone (2): a step after the probe it trains at 2/3
    body = [g for g in chosen if g != "head"]
    assert lrs[3]["head"] == pytest.approx(1e-2) and body
    assert all(lrs[3][g] == pytest.approx(1e-2 * 2 / 3) for g in body)
    rows = dict(summary_rows(trainer, model, recipe="tiny"))
    assert rows["auto chose"].startswith(", ".join(chosen))
    header = open(tmp_path / "metrics.csv").readline()
    assert "probe/signal/head" in header and "probe/groups_trained" in header
