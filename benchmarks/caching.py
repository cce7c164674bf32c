"""Epochs over a frozen prefix with and without the prefix cache, interleaved.

Three scenarios, each run cached (``FineTuning(cache_features=True)``) and uncached (``False``) on the same data
with deterministic inputs (``augment false``), the recipe's precision (``auto`` resolved on this machine), no
validation:

- ``effnet_head``: effnet_fashion, only the classifier trains (the cache holds the pooled 1280 features);
- ``effnet_top``: effnet_fashion's own groups (blocks.5, blocks.6 with conv_head, the classifier: the cache holds
  blocks.5's input);
- ``minilm_top``: minilm_austen's own groups (blocks 3-5 and the head: the cache holds block 3's input).

The figure is the median time of the epochs after the first (the first fills the cache), the ratio uncached /
cached, and the largest difference between the two runs' mean training loss per epoch (the same curve).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from peft_lightning.callbacks.finetuning import FineTuning


class EpochTimer(Callback):
    """Wall time and mean training loss of every epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._sum = 0.0
        self._n = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._sum, self._n = 0.0, 0
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sum += float(outputs["loss"])
        self._n += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t)
        self.losses.append(self._sum / max(1, self._n))


def precision() -> str:
    from peft_lightning.engine.precision import auto_precision, detect_hardware

    return auto_precision(detect_hardware(), "cpu")[0]


def scenario(name: str, samples: int) -> tuple[Any, Any, dict[str, Any]]:
    """A fresh model, its data module and the FineTuning arguments of one scenario."""
    if name.startswith("effnet"):
        from recipes.effnet_fashion import EffnetFashion as Recipe

        data = {**Recipe.data_defaults, "max_train_samples": samples, "augment": False}
        groups = {"strategy": "head"} if name == "effnet_head" else dict(Recipe.finetuning_defaults)
        model = Recipe()
    else:
        from recipes.minilm_austen import MinilmAusten as Recipe

        data = {**Recipe.data_defaults, "max_train_samples": samples}
        groups = dict(Recipe.finetuning_defaults)
        model = Recipe()
    datamodule = Recipe.datamodule_class(**data)
    datamodule.connect(**model.data_needs())  # the model's preprocessing or tokenizer, as the CLI hands it over
    return model, datamodule, groups


def one_run(name: str, cache: bool, samples: int, epochs: int) -> dict[str, Any]:
    seed_everything(0)
    model, data, groups = scenario(name, samples)
    timer = EpochTimer()
    ft = FineTuning(**groups, cache_features=cache)
    trainer = Trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision=precision(),
        accelerator="cpu",
        callbacks=[ft, timer],
    )
    trainer.fit(model, data)
    return {"epoch_s": [round(t, 3) for t in timer.times], "epoch_loss": timer.losses, "cache": ft.cache_summary(model)}


SCENARIOS = {"effnet_head": 10_000, "effnet_top": 10_000, "minilm_top": 1_500}


def run(quick: bool = False, smoke: bool = False) -> dict:
    epochs, repeats = (2, 1) if smoke else (3, 1) if quick else (3, 2)
    scale = 0.01 if smoke else 0.2 if quick else 1.0
    sizes = {name: max(32, int(n * scale)) for name, n in SCENARIOS.items()}
    if not smoke:
        one_run("effnet_head", False, 256, 1)  # warm-up: imports, allocator, the Arrow caches of both datasets
        one_run("minilm_top", False, 64, 1)
    runs: dict[str, dict[str, list[dict]]] = {name: {"uncached": [], "cached": []} for name in sizes}
    for _ in range(repeats):  # A B A B ... within each scenario
        for name, n in sizes.items():
            for kind in ("uncached", "cached"):
                runs[name][kind].append(one_run(name, kind == "cached", n, epochs))
    headline: dict[str, Any] = {}
    for name, kinds in runs.items():
        later = {k: statistics.median(t for r in rs for t in r["epoch_s"][1:]) for k, rs in kinds.items()}
        first = {k: statistics.median(r["epoch_s"][0] for r in rs) for k, rs in kinds.items()}
        curve = max(
            abs(a - b)
            for u, c in zip(kinds["uncached"], kinds["cached"])
            for a, b in zip(u["epoch_loss"], c["epoch_loss"])
        )
        headline[name] = {
            "speedup_later_epochs": round(later["uncached"] / later["cached"], 2),
            "uncached_epoch_s": round(later["uncached"], 2),
            "cached_epoch_s": round(later["cached"], 3),
            "first_epoch_s": {k: round(v, 2) for k, v in first.items()},
            "max_epoch_loss_diff": float(f"{curve:.2g}"),
        }
    return {
        "setup": {
            "samples": sizes,
            "epochs": epochs,
            "repeats": repeats,
            "precision": precision(),
            "threads": torch.get_num_threads(),
            "validation": "off",
            "scenarios": {
                "effnet_head": "effnet_fashion, classifier only, 48 px",
                "effnet_top": "effnet_fashion's groups: blocks.5, blocks.6 (+conv_head), classifier",
                "minilm_top": "minilm_austen's groups: layer.3-5 and the head",
            },
        },
        "runs": runs,
        "headline": headline,
    }
