"""Head-only epochs on effnet_fashion with and without frozen-feature caching, interleaved.

Both contenders train the same head on the same images (deterministic preprocessing, `--data.augment false`):
the uncached one runs the frozen EfficientNet every epoch, the cached one only in its first epoch. The figure is
the median time of the epochs after the first, and the ratio uncached / cached.
"""

from __future__ import annotations

import statistics
import time

from lightning.pytorch import Callback, Trainer, seed_everything

from peft_lightning.callbacks.finetuning import FineTuning
from recipes.effnet_fashion import EffnetFashion


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t)


def one_run(cache: bool, samples: int, epochs: int) -> dict:
    seed_everything(0)
    model = EffnetFashion()
    data = EffnetFashion.datamodule_class(**{**EffnetFashion.data_defaults, "max_train_samples": samples,
                                             "augment": False, "num_workers": 0})
    timer = EpochTimer()
    trainer = Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[FineTuning("head", cache_features=cache), timer])
    trainer.fit(model, data)
    later = timer.times[1:]
    return {"first_epoch_s": timer.times[0], "later_epoch_s": statistics.median(later),
            "train_loss": float(trainer.callback_metrics["train/loss"])}


def run(quick: bool = False, smoke: bool = False) -> dict:
    samples, epochs, repeats = (128, 2, 1) if smoke else (2_000, 3, 1) if quick else (10_000, 4, 3)
    if not smoke:
        one_run(False, 256, 2)  # warm-up: imports, allocator, the Arrow cache of the data
    runs: dict[str, list[dict]] = {"uncached": [], "cached": []}
    for _ in range(repeats):  # A B A B ...
        for name in runs:
            runs[name].append(one_run(name == "cached", samples, epochs))
    med = {name: statistics.median(r["later_epoch_s"] for r in rs) for name, rs in runs.items()}
    first = {name: statistics.median(r["first_epoch_s"] for r in rs) for name, rs in runs.items()}
    return {
        "setup": {"images": samples, "epochs": epochs, "repeats": repeats, "image_size": EffnetFashion.data_defaults["image_size"], "model": "tf_efficientnet_lite0"},
        "runs": runs,
        "median_first_epoch_s": first,
        "median_later_epoch_s": med,
        "headline": {"speedup_later_epochs": round(med["uncached"] / med["cached"], 2),
                     "uncached_epoch_s": round(med["uncached"], 2), "cached_epoch_s": round(med["cached"], 2),
                     "images_per_s_cached": round(samples / med["cached"], 1)},
    }
