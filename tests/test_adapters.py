"""peft adapters on the task: only adapters and head train, adapter-only checkpoints resume exactly, export
round-trips through PeftModel.from_pretrained, merging preserves outputs, bad targets stop with one line."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch import Trainer

from peft_lightning.adapters import ADAPTER_METHODS, AdapterConfig
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import FreezeUnfreeze, Retune
from peft_lightning.errors import UsageError
from peft_lightning.model_files.export import export
from peft_lightning.tasks.vision import ImageClassifier

from conftest import make_image_folder, run_cli
from helpers import PhaseRecorder, StopAfterEpoch, run_card_snippets, tiny_cli_args, tiny_data, train

METHODS = list(ADAPTER_METHODS)  # every row of the table: lora, dora, ia3, loha, lokr


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A fixed 'pretrained' test_vit: the base an adapter-only checkpoint is re-created from."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=3).state_dict(), str(path))
    return str(path)


def vit(weights: str, method: str = "lora", **kw) -> dict:
    """model_kw for `helpers.train`: the tiny ViT on fixed base weights, with adapters."""
    return {"checkpoint_path": weights, "peft": AdapterConfig(method, r=4, **kw)}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "model_name, method",
    [
        *[("test_vit", m) for m in METHODS],
        # a convnet at 32 px: LoRA on its groups==1 convolutions, LoHa also on the depthwise ones
        ("tf_efficientnet_lite0", "lora"),
        ("tf_efficientnet_lite0", "loha"),
    ],
)
def test_only_adapters_and_head_change(image_folder, model_name, method):
    model = ImageClassifier(model_name, num_classes=3, pretrained=False, lr=1e-2, peft=AdapterConfig(method, r=4))
    before = snapshot(model)
    trainable = model.trainable_parameter_names()
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FineTuning("full")],
    )
    trainer.fit(model, tiny_data(image_folder, model, image_size=32 if model_name != "test_vit" else None))
    after = snapshot(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    assert any(".modules_to_save." in n for n in changed)  # the head trains in full
    adapter_blocks = {n.split(".base_model.model.")[1].split(".")[1] for n in changed if "modules_to_save" not in n}
    assert len(adapter_blocks) >= 2  # adapters in several blocks moved
    n_trainable = sum(after[n].numel() for n in trainable)
    assert n_trainable < 0.35 * sum(p.numel() for p in after.values())


def test_callback_schedules_adapters_by_layer_group_and_never_unfreezes_base(image_folder, vit_weights):
    rec = PhaseRecorder()
    model, _ = train(
        image_folder,
        FineTuning(FreezeUnfreeze(at_epoch=1, groups=2)),
        epochs=2,
        extra=[rec],
        model_kw=vit(vit_weights),
    )
    # Adapter parameters are grouped with their block: epoch 0 trains the head, epoch 1 blocks.5's adapters too.
    assert rec.changed == [["head"], ["blocks.5", "head"]]
    groups = dict(model.layer_groups())
    assert any("lora_A" in n for n in groups["blocks.5"])
    trainable = model.trainable_parameter_names()
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= trainable


def test_adapter_only_checkpoint_resumes_exactly(image_folder, vit_weights, tmp_path):
    # retune: a resume mid-run must bring back the round, its optimizer and the (adapter-sized) best weights
    stop_after, epochs = 1, 3
    mkw = vit(vit_weights)

    def ft() -> FineTuning:  # a fresh strategy each run: retune's keeps its rounds
        return FineTuning(Retune(round_epochs=2), monitor="val/loss", mode="min")

    full, _ = train(image_folder, ft(), epochs, model_kw=mkw)
    train(
        image_folder,
        ft(),
        epochs,
        root=tmp_path,
        extra=[StopAfterEpoch(stop_after)],
        model_kw=mkw,
    )
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)  # plain types only
    assert set(ckpt["state_dict"]) == set(full.trainable_state_dict())
    assert not any(".base_layer." in k or ".original_module." in k for k in ckpt["state_dict"])
    for state in ckpt["callbacks"].values():  # retune's best weights are adapter-sized too
        assert state.get("best_state") is None or set(state["best_state"]) == set(ckpt["state_dict"])
    resumed, _ = train(
        image_folder,
        ft(),
        epochs,
        root=tmp_path / "again",
        ckpt_path=str(tmp_path / "last.ckpt"),
        model_kw=mkw,
    )
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_adapter_checkpoint_refuses_another_base_or_no_adapters(image_folder, vit_weights, tmp_path):
    train(image_folder, FineTuning("full"), 1, root=tmp_path, model_kw=vit(vit_weights))
    ckpt = str(tmp_path / "last.ckpt")
    trainer = Trainer(logger=False, enable_progress_bar=False)
    data = tiny_data(image_folder)
    with pytest.raises(UsageError, match="--peft.method lora"):
        trainer.validate(ImageClassifier("test_vit", num_classes=3, checkpoint_path=vit_weights), data, ckpt_path=ckpt)
    other = ImageClassifier("test_vit", num_classes=3, pretrained=False, peft=AdapterConfig("lora", r=4))
    with pytest.raises(UsageError, match="other base weights"):
        trainer.validate(other, data, ckpt_path=ckpt)
    restored = ImageClassifier.load_from_checkpoint(ckpt)  # the base comes back from checkpoint_path
    assert restored.adapter_config == AdapterConfig("lora", r=4)


@pytest.mark.parametrize("method", METHODS)
def test_export_round_trips_and_merge_preserves_outputs(vit_weights, tmp_path, method):
    import timm
    from peft import PeftModel
    from safetensors.torch import load_file

    model = ImageClassifier(
        "test_vit", num_classes=3, checkpoint_path=vit_weights, peft=AdapterConfig(method, r=4)
    ).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start as the identity: move them so that merging has something to merge
        for name, p in model.named_parameters():
            if name in model.trainable_parameter_names():
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = model(x)
    written = export(model, tmp_path, merge=True)
    assert {p.name for p in written} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
        "README.md",
    }
    card = (tmp_path / "README.md").read_text()  # ours, not peft's template
    assert "[More Information Needed]" not in card and f"({'`peft`'} {method})" in card

    def base():
        m = timm.create_model("test_vit", pretrained=False, num_classes=3)
        m.load_state_dict(load_file(vit_weights))
        return m

    loaded = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    merged = timm.create_model("test_vit", pretrained=False, num_classes=3)
    merged.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        assert torch.allclose(merged.eval()(x), expected, atol=1e-4)
        assert not torch.allclose(base().eval()(x), expected, atol=1e-3)  # the adapters and head do matter
        # what `predict` builds from the adapter folder (--peft.adapter_path) and the merged file
        from_adapter = ImageClassifier(
            "test_vit", num_classes=3, checkpoint_path=vit_weights, peft=AdapterConfig(adapter_path=str(tmp_path))
        ).eval()
        assert from_adapter.adapter_config.method == method
        assert torch.allclose(from_adapter(x), expected, atol=1e-5)
        from_merged = ImageClassifier("test_vit", num_classes=3, checkpoint_path=str(tmp_path / "model.safetensors"))
        assert torch.allclose(from_merged.eval()(x), expected, atol=1e-4)
        # the model card's load snippets, run as written: plain timm + peft, and the merged file
        snippets = run_card_snippets(tmp_path / "README.md")
        assert torch.allclose(snippets["model"](x), expected, atol=1e-5)
        assert torch.allclose(snippets["merged"].eval()(x), expected, atol=1e-4)


def test_cli_export_writes_a_model_card_from_the_checkpoint_and_its_run(tmp_path, cli):
    """A LoRA run of the CLI, exported by the CLI: README.md names the recipe, base, data, adapter options and the
    checkpoint's own validation score and the run's test metrics, and its load snippets give the checkpoint's
    outputs."""
    import timm
    from safetensors.torch import save_file

    from peft_lightning.model_files.checkpoints import read_checkpoint
    from peft_lightning.model_files.export import load_task
    from recipes.vit_cifar import VitCifar

    torch.manual_seed(0)
    weights = tmp_path / "base.safetensors"  # a fixed base: the adapters are only valid on it
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(), str(weights))
    images = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=32, splits=True)
    code, _, err = cli(
        *tiny_cli_args(
            images,
            tmp_path / "runs",
            "--model.checkpoint_path",
            str(weights),
            "--peft.method",
            "lora",
            "--peft.r",
            "4",
            "--trainer.max_epochs",
            "1",
            "--test_after_fit",
            "true",
            "--quiet",
        )
    )
    assert code == 0, err
    (run,) = (tmp_path / "runs" / "vit_cifar").iterdir()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "export"
    code, printed, err = cli("export", "--recipe", "vit_cifar", "--ckpt_path", str(best), "--out", str(out), "--merge")
    assert code == 0, err
    assert str(out / "README.md") in printed
    card = (out / "README.md").read_text()
    assert "[More Information Needed]" not in card
    ckpt = read_checkpoint(best)
    score = next(float(s["best_model_score"]) for s in ckpt["callbacks"].values() if "best_model_score" in s)
    with open(run / "metrics.csv", newline="") as f:
        test_acc = next(float(r["test/acc"]) for r in csv.DictReader(f) if r.get("test/acc"))
    for needle in (
        "recipe `vit_cifar`",
        "LoRA (`peft` lora)",
        "| r | 4 |",
        "| alpha | 16 ",
        "timm `test_efficientnet`",
        f"the local file `{weights}`",
        f"`{images}`",
        "`class_0`, `class_1`, `class_2`",
        f"`val/acc` (higher is better): **{score:.4f}**",
        "this checkpoint holds those weights",
        f"`test/acc` {test_acc:.4f}",
        f"epoch {ckpt['epoch']}, global step {ckpt['global_step']}",
        "| trainable parameters | ",
        "PeftModel.from_pretrained(base, ",
        f"predict --recipe vit_cifar --peft.adapter_path {out}",
    ):
        assert needle in card, f"{needle!r} not in\n{card}"
    snippets = run_card_snippets(out / "README.md")
    task = load_task(VitCifar, best)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = task(x)
        assert torch.allclose(snippets["model"](x), expected, atol=1e-5)
        assert torch.allclose(snippets["merged"].eval()(x), expected, atol=1e-4)


@pytest.mark.parametrize(
    "peft, match",
    [
        (AdapterConfig("lora", target_modules=["nothing_here"]), "matches no module.*qkv"),
        (AdapterConfig("lora", target_modules=["conv_dw"]), "cannot adapt"),  # depthwise: LoRA refuses
    ],
)
def test_bad_targets_stop_with_one_line(peft, match):
    name = "tf_efficientnet_lite0" if "conv_dw" in peft.target_modules else "test_vit"
    with pytest.raises(UsageError, match=match) as err:
        ImageClassifier(name, num_classes=3, pretrained=False, peft=peft)
    assert "\n" not in str(err.value)


def test_each_method_is_one_row_peft_builds_and_reads_back(tmp_path):
    """A row of ADAPTER_METHODS gives peft's config class for its peft_type (PEFT_TYPE_TO_CONFIG_MAPPING) with the
    method's options; the adapter_config.json peft writes from it reads back as the same method (DoRA: LORA with
    use_dora); and the row says which module types the method wraps."""
    import peft
    from torch import nn

    from peft_lightning.adapters import peft_config, read_adapter_config, saved_method, supports

    for method in METHODS:
        config = peft_config(AdapterConfig(method, r=4, alpha=8.0, dropout=0.1), ["fc"], ["head"])
        assert isinstance(config, peft.PEFT_TYPE_TO_CONFIG_MAPPING[ADAPTER_METHODS[method].peft_type])
        assert (getattr(config, "r", None) == 4) == ADAPTER_METHODS[method].ranked
        config.save_pretrained(str(tmp_path / method))
        assert saved_method(read_adapter_config(tmp_path / method)) == method
    assert saved_method({"peft_type": "PREFIX_TUNING"}) is None
    depthwise, linear = nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 4)
    assert [supports(m, depthwise) for m in METHODS] == [False, False, True, True, True]  # lora dora ia3 loha lokr
    assert all(supports(m, linear) for m in METHODS) and not supports("none", linear)
    assert not any(supports(m, nn.LayerNorm(4)) for m in METHODS)


def test_cli_export_and_predict_from_an_adapter_checkpoint_of_a_recipe(tmp_path, capsys):
    from recipes.effnet_fashion import EffnetFashion

    if not EffnetFashion.availability()[0]:
        pytest.skip(EffnetFashion.availability()[1])
    folder = make_image_folder(tmp_path / "images", classes=10, per_class=4, size=32, splits=True)
    model = EffnetFashion(peft=AdapterConfig("lora", r=4))
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = tiny_data(folder, model, image_size=32, val_fraction=0.4)
    trainer.fit(model, data)
    ckpt = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": model.state_dict()}, full)
    # adapters + head + BatchNorm statistics + their Adam state: a seventh of the bare full weights here
    assert ckpt.stat().st_size < 0.15 * full.stat().st_size

    out = tmp_path / "export"
    res = run_cli("export", "--recipe", "effnet_fashion", "--ckpt_path", str(ckpt), "--out", str(out), "--merge")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    # predict from the adapter checkpoint: the base comes back from the recipe's pretrained source
    preds = trainer.predict(EffnetFashion(peft=AdapterConfig("lora", r=4)), data, ckpt_path=str(ckpt))
    with torch.no_grad():
        model.eval()
        first = next(iter(trainer.predict_dataloaders))
        assert torch.equal(preds[0]["pred"], model(first["pixel_values"]).argmax(-1))

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    from peft_lightning.cli import main

    for args, match in [
        (["--recipe", "nope"], "unknown recipe"),
        (["--recipe", "effnet_fashion", "--ckpt_path", str(tmp_path / "missing.ckpt")], "does not exist"),
        (["--recipe", "effnet_fashion", "--ckpt_path", str(garbage)], "cannot load"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    "export",
                    *args,
                    *(["--ckpt_path", str(ckpt)] if "--ckpt_path" not in args else []),
                    "--out",
                    str(tmp_path / "bad"),
                ]
            )
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and match in err and len(err.strip().splitlines()) == 1, err
