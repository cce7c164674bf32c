"""The fine-tuning contract (peft_lightning/contract.py): what a task offers the callback, checked once at setup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.contract import MEMBERS, LRScales, Tunable, check_task
from peft_lightning.errors import UsageError
from peft_lightning.tasks.base import FineTuneTask


class Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


class TwoGroups(FineTuneTask):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def layer_groups(self):
        return [("body", ["body.weight", "body.bias"]), ("head", ["head.weight", "head.bias"])]


def test_every_task_keeps_the_contract_and_the_callback_sets_its_lr_scales():
    task = TwoGroups()
    assert isinstance(task, Tunable) and check_task(task) is task
    assert all(hasattr(task, name) for name in MEMBERS)
    FineTuning("head", lr_decay=0.5).setup(SimpleNamespace(strategy=None, datamodule=None), task, "fit")
    assert task.lr_scales.layer == {"head": 1.0, "body": 0.5}
    task.lr_scales.phase, task.lr_scales.group = 0.1, {"body": 0.5}
    assert task.lr_scales.factor("body") == pytest.approx(0.025) and task.lr_scales.factor("head") == 0.1


def test_a_module_without_the_contract_stops_with_one_line_naming_what_it_lacks():
    with pytest.raises(UsageError, match="Plain lacks .*layer_groups.*subclass peft_lightning.FineTuneTask") as err:
        FineTuning("head").setup(SimpleNamespace(strategy=None, datamodule=None), Plain(), "fit")
    assert "\n" not in str(err.value)


def test_layer_groups_must_name_each_group_once():
    task = TwoGroups()
    task.layer_groups = lambda: [("body", ["body.weight"]), ("body", ["head.weight"])]
    with pytest.raises(UsageError, match="each once"):
        check_task(task)


def test_lr_scales_default_to_one():
    assert LRScales().factor("anything") == 1.0
