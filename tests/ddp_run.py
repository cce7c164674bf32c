"""Train the tiny ViT with FineTuning on CPU processes (gloo); save the final weights, the sample indices each rank
trained on, and the start-of-fit summary line.

Run by tests/test_ddp.py and tests/test_multinode.py:

    python tests/ddp_run.py OUT_DIR DEVICES PER_DEVICE_BATCH IMAGE_FOLDER [NUM_NODES] [TAG]

With DEVICES > 1 Lightning starts the other processes by re-running this script with LOCAL_RANK set; with
NUM_NODES > 1 it must run under a launcher, one process per node (``torchrun --nnodes N --node_rank R ...``).
Outputs are named after TAG (default: the world size): ``weights_TAG.pt`` (rank 0), ``seen_TAG_RANK.json``
({epoch: [[sample indices of batch 0], ...]}) and ``summary_TAG.txt`` (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_lightning.callbacks.finetuning import FineTuning  # noqa: E402
from peft_lightning.callbacks.strategies import FreezeUnfreeze  # noqa: E402
from peft_lightning.output.summary import RunSummary  # noqa: E402

from helpers import tiny_data, tiny_model  # noqa: E402


class SeenSamples(Callback):
    """The dataset row numbers (the image data module's ``index`` column) of every training batch of this rank."""

    def __init__(self) -> None:
        self.seen: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())


def main() -> None:
    out, devices, batch, folder = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    num_nodes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    tag = sys.argv[6] if len(sys.argv) > 6 else str(devices * num_nodes)
    # SGD: Adam divides by sqrt(v), which turns float-rounding noise on zero-gradient weights (an attention key
    # bias) into visible steps; SGD keeps the comparison at rounding level.
    model = tiny_model(optimizer="sgd", lr=0.05)
    seen, summary = SeenSamples(), RunSummary()
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[FineTuning(FreezeUnfreeze(at_epoch=1, groups=3)), seen, summary],
    )
    trainer.fit(model, tiny_data(folder, batch_size=batch))
    rank = trainer.global_rank
    (out / f"seen_{tag}_{rank}.json").write_text(json.dumps(seen.seen))
    if rank == 0:
        torch.save(model.state_dict(), out / f"weights_{tag}.pt")
        (out / f"summary_{tag}.txt").write_text(summary.line)


if __name__ == "__main__":
    main()
