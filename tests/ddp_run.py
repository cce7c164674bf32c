"""Train the tiny ViT with FineTuning under 1 or 2 CPU processes (gloo); save final weights and what each rank saw.

Run by tests/test_ddp.py: `python tests/ddp_run.py OUT_DIR DEVICES PER_DEVICE_BATCH IMAGE_FOLDER`. Lightning
starts the second process by re-running this script with LOCAL_RANK=1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_lightning.callbacks.finetuning import FineTuning  # noqa: E402

from helpers import tiny_data, tiny_model  # noqa: E402


class SeenSamples(Callback):
    """Fingerprints of the training images each rank receives."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fingerprints = batch["pixel_values"].flatten(1).sum(1).round(decimals=3).tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(fingerprints)


def main() -> None:
    out, devices, batch, folder = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    # SGD: Adam divides by sqrt(v), which turns float-rounding noise on zero-gradient weights (an attention key
    # bias) into visible steps; SGD keeps the comparison at rounding level.
    model = tiny_model(optimizer="sgd", lr=0.05)
    seen = SeenSamples()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, deterministic=True,
                      callbacks=[FineTuning("freeze_unfreeze", unfreeze_at_epoch=1, unfreeze_groups=3), seen])
    trainer.fit(model, tiny_data(folder, batch_size=batch))
    rank = trainer.global_rank
    (out / f"seen_{devices}_{rank}.json").write_text(json.dumps(seen.seen))
    if rank == 0:
        torch.save(model.state_dict(), out / f"weights_{devices}.pt")


if __name__ == "__main__":
    main()
