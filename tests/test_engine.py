"""The engine's configuration on CPU: FSDP's wrap and checkpointing policies over each domain's blocks, the global
batch and learning-rate scaling, the start-of-fit summary, and compile."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from test_recsys import synth, tiny_encoder  # noqa: F401  (fixtures)
from test_text import tiny_bert  # noqa: F401  (fixture)

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.engine.batch import lr_scale
from peft_lightning.engine.strategy import fsdp_strategy
from peft_lightning.errors import UsageError
from peft_lightning.internals import is_compiled
from peft_lightning.output.summary import RunSummary

from helpers import tiny_data, tiny_model


def wrapped(strategy, model) -> list[str]:
    """Names of the modules FSDP's auto-wrap policy would put in their own unit."""
    policy = strategy.kwargs["auto_wrap_policy"]
    targets = policy._run_policy(model, ignored_modules=set(), root_kwargs={})
    names = {id(m): n for n, m in model.named_modules()}
    return sorted(names[id(m)] for m in targets if m is not model)


def test_fsdp_wraps_and_checkpoints_each_vit_block_and_keeps_original_params():
    model = tiny_model(activation_checkpointing=True)
    from timm.models.vision_transformer import Block

    assert model.fsdp_block_classes() == {Block}
    strategy = fsdp_strategy(model)
    assert strategy.kwargs["use_orig_params"] is True  # frozen + trainable + adapters in one unit
    assert wrapped(strategy, model) == [f"model.blocks.{i}" for i in range(6)]
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    plain = fsdp_strategy(tiny_model())
    assert plain._activation_checkpointing_kwargs == {}
    assert fsdp_strategy(tiny_model(), "fsdp_cpu_offload").cpu_offload.offload_params


def test_fsdp_blocks_with_lora_adapters_are_the_same_blocks():
    from peft_lightning.adapters import AdapterConfig

    model = tiny_model(peft=AdapterConfig("lora", r=4))
    strategy = fsdp_strategy(model)
    names = wrapped(strategy, model)
    assert len(names) == 6 and all(n.endswith(f"blocks.{i}") for i, n in enumerate(names))


def test_block_classes_of_each_domain(tiny_bert, tiny_encoder):  # noqa: F811
    from peft_lightning.tasks.recsys import Recommender
    from peft_lightning.tasks.text import TextClassifier
    from peft_lightning.tasks.vision import ImageClassifier

    effnet = ImageClassifier("test_efficientnet", num_classes=3, pretrained=False)
    assert {c.__name__ for c in effnet.fsdp_block_classes()} >= {"InvertedResidual"}
    assert not any(issubclass(c, torch.nn.Sequential) for c in effnet.fsdp_block_classes())
    bert = TextClassifier(tiny_bert, num_labels=3)
    assert {c.__name__ for c in bert.fsdp_block_classes()} == {"BertLayer"}
    two_tower = Recommender("two_tower", num_users=30, num_items=40, text_encoder=tiny_encoder)
    assert {c.__name__ for c in two_tower.fsdp_block_classes()} == {"BertLayer"}
    # MF reads its ID embeddings by `.weight` to score the whole catalogue: no blocks, one root unit.
    mf = Recommender("mf", num_users=30, num_items=40)
    assert mf.fsdp_block_classes() == set()
    assert fsdp_strategy(mf).kwargs.get("auto_wrap_policy") is None
    with pytest.raises(UsageError, match="no blocks to checkpoint"):
        fsdp_strategy(Recommender("mf", num_users=30, num_items=40, activation_checkpointing=True))


def test_reference_batches_of_the_recipes():
    from peft_lightning.registry import get_recipe

    assert get_recipe("vit_cifar").reference_batch() == 512  # 128 x 4 accumulated: the paper's batch
    assert get_recipe("effnet_fashion").reference_batch() == 64
    assert lr_scale("linear", 2048, 512) == 4.0 and lr_scale("sqrt", 2048, 512) == 2.0
    assert lr_scale("none", 2048, 512) == 1.0


class Reference8(type(tiny_model())):
    reference_global_batch = 8


@pytest.mark.parametrize("rule, factor", [("linear", 2.0), ("sqrt", 2**0.5), ("none", 1.0)])
def test_lr_scales_with_the_global_batch_and_the_summary_says_so(image_folder, rule, factor, caplog):
    from lightning.pytorch import seed_everything

    seed_everything(7)
    model = Reference8("test_vit", num_classes=3, pretrained=False, lr=1e-2, scale_lr=rule)
    summary = RunSummary("because")
    trainer = Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FineTuning("full"), summary],
    )
    trainer.fit(model, tiny_data(image_folder))
    assert model.lr == pytest.approx(1e-2 * factor) and model.base_lr == 1e-2
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-2 * factor)
    assert "global batch 16 = 8 per device x 1 device x 1 node x 2 accumulated" in summary.line
    assert "precision 32-true (because)" in summary.line
    if rule != "none":
        assert f"{rule}-scaled from 0.01 at reference batch 8" in summary.line


def test_scale_lr_without_a_reference_batch_is_a_usage_error(image_folder):
    model = tiny_model(scale_lr="linear")
    trainer = Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(UsageError, match="reference_global_batch"):
        trainer.fit(model, tiny_data(image_folder))


def test_compile_compiles_each_block_in_place_and_keeps_checkpoint_keys():
    model = tiny_model(compile=True)
    keys = list(model.state_dict())
    model.configure_model()
    blocks = [m for m in model.modules() if is_compiled(m)]
    assert len(blocks) == 6 and all(type(m).__name__ == "Block" for m in blocks)
    assert list(model.state_dict()) == keys
    model.configure_model()  # a second fit does not compile twice
    assert sum(is_compiled(m) for m in model.modules()) == 6
