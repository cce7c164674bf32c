"""Numbered blocks: how the networks tuned here name their repeated layers, in one place.

timm and transformers keep a model's repeated blocks in containers indexed by number: timm's ViT ``blocks.N``,
EfficientNet ``blocks.S.N``, ConvNeXt ``stages.N``, ResNet ``layerK.N``; BERT ``encoder.layer.N``, LLaMA/BART
``layers.N``, GPT-2 ``h.N``, T5 ``block.N``. Layer groups, adapter targets, FSDP units and ``--model.compile`` all
find the blocks by these names; the patterns below are the one vocabulary they share.
"""

from __future__ import annotations

import re

from torch import nn

CONTAINER = r"(?:blocks?|stages?|layers?|h)"
"""A container of numbered blocks (``NAME.N``)."""
RESNET_STAGE = r"layer\d+"
"""ResNet's numbered stages ``layer1`` ... ``layer4``, each a container of numbered blocks (``layer1.0``)."""

BLOCK_IN_NAME = re.compile(rf"\.({CONTAINER})\.(\d+)\.")
"""The first numbered block inside a parameter name written with a leading dot (``.encoder.layer.3.``): groups
``(container, number)``. The first match wins, so T5's ``block.N.layer.M`` is block N."""

BLOCK_PREFIX = re.compile(rf"^((?:[a-z_]+\.)*?{CONTAINER}\.\d+)")
"""A parameter name up to its first numbered block (``blocks.3`` of ``blocks.3.attn.qkv.weight``): the name of a
timm layer group. ResNet's ``layerK`` stages are left out: a coarse timm group holds a whole stage, not block 0."""

BLOCK_MODULES = rf"(.*\.)?({CONTAINER}|{RESNET_STAGE})\.\d+\..*"
"""Every module inside a numbered block, as a full-match regex on module names (peft's ``target_modules``)."""

_BLOCK_MODULE = re.compile(rf"(^|\.)({CONTAINER}\.\d+|{RESNET_STAGE}\.\d+)(\.\d+)?$")
"""A module that is a numbered block, or one level below one (timm EfficientNet's ``blocks.S.N``)."""


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The classes of a network's repeated blocks: the outermost non-container modules named like a numbered block
    (``CONTAINER.N``, ``layerK.N``) or one level below such a container (timm EfficientNet's ``blocks.S.N``).

    timm ViT -> ``Block``, EfficientNet -> ``DepthwiseSeparableConv`` and ``InvertedResidual``, ResNet ->
    ``BasicBlock``/``Bottleneck``, BERT -> ``BertLayer``, GPT-2 -> ``GPT2Block``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential()
        >>> net.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        >>> block_classes(net)
        {<class 'torch.nn.modules.linear.Linear'>}
    """
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    found: set[type[nn.Module]] = set()
    taken: list[str] = []
    for name, child in module.named_modules():
        if not _BLOCK_MODULE.search(name) or isinstance(child, containers):
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # inside a block already found (T5's block.N.layer.M)
        taken.append(name)
        found.add(type(child))
    return found
