"""The numbered-block vocabulary (peft_lightning/engine/blocks.py) that layer groups, adapter targets and FSDP units share."""

from __future__ import annotations

import re

import pytest

from peft_lightning.engine.blocks import BLOCK_IN_NAME, BLOCK_MODULES, BLOCK_PREFIX, block_classes


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "layer.3"),  # BERT
        ("model.layers.0.self_attn.q_proj.weight", "layers.0"),  # LLaMA
        ("transformer.h.11.attn.c_attn.weight", "h.11"),  # GPT-2
        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "block.2"),  # T5: the outer block wins
        ("bert.embeddings.LayerNorm.weight", None),
        ("classifier.weight", None),
    ],
)
def test_block_in_a_parameter_name(name, block):
    m = BLOCK_IN_NAME.search("." + name)
    assert (f"{m.group(1)}.{m.group(2)}" if m else None) == block


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("blocks.3.attn.qkv.weight", "blocks.3"),  # timm ViT
        ("stages.1.blocks.0.conv_dw.weight", "stages.1"),  # ConvNeXt: the outer container
        ("layer1.0.conv1.weight", None),  # ResNet: a coarse group is a whole stage, not its block 0
        ("patch_embed.proj.weight", None),
    ],
)
def test_timm_group_names(name, group):
    m = BLOCK_PREFIX.match(name)
    assert (m.group(1) if m else None) == group


@pytest.mark.parametrize(
    ("module", "targeted"),
    [
        ("blocks.0.attn.qkv", True),
        ("blocks.2.1.conv_pw", True),  # EfficientNet
        ("layer2.1.conv1", True),  # ResNet
        ("encoder.layer.5.output.dense", True),
        ("conv_stem", False),
        ("head", False),
        ("blocks", False),
    ],
)
def test_block_modules_as_adapter_targets(module, targeted):
    assert bool(re.fullmatch(BLOCK_MODULES, module)) is targeted


def test_block_classes_of_timm_models():
    import timm

    vit = timm.create_model("test_vit", pretrained=False)
    assert {c.__name__ for c in block_classes(vit)} == {"Block"}
    resnet = timm.create_model("resnet10t", pretrained=False)
    assert {c.__name__ for c in block_classes(resnet)} == {"BasicBlock"}
