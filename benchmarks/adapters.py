"""Full fine-tuning vs LoRA vs head-only, side by side: trainable parameters, peak memory, step time, checkpoint
size and the validation accuracy reached.

    python -m benchmarks.run adapters            # the measured table (~25 min on 2 quiet CPU cores, estimate)
    python -m benchmarks.run adapters --quick    # a smoke run of every cell (< 2 min)

Contenders run interleaved (full, lora, head, full, ...), each in a fresh subprocess, so that peak memory is the
process's own: ``ru_maxrss`` (peak resident set size) after training, minus the same figure measured after the
model was built and before the first step, gives the training's extra memory (activations kept for backward,
gradients, optimizer state). On a CPU that is the honest analogue of peak GPU memory; the absolute peak is reported
too. Step time is the median of the steps after a warm-up. The checkpoint is Lightning's ``last.ckpt`` (adapter-only
for LoRA: adapters, head, BatchNorm statistics and optimizer state).

Models: ``effnet_fashion`` (EfficientNet-Lite0 with real ImageNet weights on real Fashion-MNIST at 32 px), a
small timm ViT (``vit_tiny_patch16_224`` shape at 64 px, random weights: no pretrained ViT is reachable offline, so
its accuracy figures say nothing about transfer, only its costs do) and ``minilm_austen`` (all-MiniLM-L6-v2, real
weights, on the six Jane Austen novels, 96 tokens).

Each contender trains at its own learning rate: full fine-tuning at the recipe's, LoRA (r 8, alpha 16, every
linear of the blocks) and the head alone higher, as usual for them (``LR``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = {
    "full": {"strategy": "full", "peft": None},
    "lora": {"strategy": "full", "peft": {"method": "lora", "r": 8, "alpha": 16.0}},
    "head": {"strategy": "head", "peft": None},
}
# Learning rate per model and contender; None: the recipe's (effnet_fashion, minilm_austen) or the ViT's 1e-3.
# LoRA on MiniLM: 5e-4, the LoRA paper's RoBERTa-base GLUE setting (r 8), 5x the recipe's full fine-tuning LR;
# the head alone (pooler + classifier on frozen features) takes 1e-3.
LR: dict[str, dict[str, float | None]] = {
    "effnet": {"full": None, "lora": None, "head": None},
    "vit": {"full": None, "lora": None, "head": None},
    "text": {"full": None, "lora": 5e-4, "head": 1e-3},
}
MODELS = ("effnet", "vit", "text")
NOTES = {
    "effnet": "effnet_fashion: EfficientNet-Lite0, real ImageNet weights, Fashion-MNIST at 32 px",
    "vit": "vit_tiny_patch16_224 shape at 64 px with RANDOM weights (no pretrained ViT offline): its costs are "
    "real, its accuracy says nothing about transfer",
    "text": "minilm_austen: all-MiniLM-L6-v2, real weights, six Austen novels, 96 tokens",
}


def _small_vit_class():
    from peft_lightning.tasks.vision import ImageClassifier

    class SmallVit(ImageClassifier):
        """ViT-Tiny/16 built for 64 px inputs (16 patches): a ViT step a 2-core CPU can afford."""

        def build_model(self):
            import timm

            return timm.create_model(
                self.hparams.model_name, pretrained=False, num_classes=self.num_classes, img_size=64
            )

    return SmallVit


def _text_task(peft, lr: float | None, samples: int, val_samples: int):
    from recipes.minilm_austen import AustenNovels, MinilmAusten

    task = MinilmAusten(peft=peft, **({"lr": lr} if lr else {}))
    data = AustenNovels(
        **{**MinilmAusten.data_defaults, "max_train_samples": samples, "max_val_samples": val_samples, "num_workers": 0}
    )
    return task, data


def one_run(model: str, contender: str, samples: int, epochs: int, root: str, val_samples: int = 500) -> dict:
    """Runs inside a fresh subprocess (see ``main``): trains, returns the figures."""
    import resource

    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from peft_lightning.adapters import AdapterConfig
    from peft_lightning.callbacks.finetuning import FineTuning
    from recipes.effnet_fashion import EffnetFashion, FashionMNIST

    spec = CONTENDERS[contender]
    seed_everything(0)
    peft = AdapterConfig(**spec["peft"]) if spec["peft"] else None
    lr = LR[model][contender]
    if model == "text":
        task, data = _text_task(peft, lr, samples, val_samples)
    else:
        if model == "effnet":
            task = EffnetFashion(peft=peft, **({"lr": lr} if lr else {}))
            image_size = 32
        else:
            task = _small_vit_class()(
                "vit_tiny_patch16_224", num_classes=10, pretrained=False, lr=lr or 1e-3, peft=peft
            )
            image_size = 64
        data = FashionMNIST(
            **{
                **EffnetFashion.data_defaults,
                "image_size": image_size,
                "max_train_samples": samples,
                "max_val_samples": val_samples,
                "augment": False,
                "num_workers": 0,
                "batch_size": 32,
            }
        )
    data.connect(**task.data_needs())  # the model's preprocessing or tokenizer, as the CLI hands it over
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)

    class Steps(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            self._t = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self._t)

    steps = Steps()
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[FineTuning(spec["strategy"]), steps, ckpt],
    )
    trainer.fit(task, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() for p in task.parameters())
    return {
        "model": model,
        "contender": contender,
        "lr": task.lr,
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mib": round(peak, 1),
        "train_extra_rss_mib": round(peak - before, 1),
        "step_s": statistics.median(steps.times[3:] or steps.times),
        "checkpoint_mib": round(Path(root, "last.ckpt").stat().st_size / 2**20, 3),
        "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
    }


def _subprocess(model: str, contender: str, samples: int, epochs: int, root: str, val_samples: int) -> dict:
    code = (
        f"import json, benchmarks.adapters as b; print('RESULT', json.dumps(b.one_run({model!r}, {contender!r}, "
        f"{samples}, {epochs}, {root!r}, {val_samples})))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1]
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{model}/{contender} failed: {res.stderr[-1500:]}")
    return json.loads(line[len("RESULT ") :])


def run(quick: bool = False, smoke: bool = False) -> dict:
    import tempfile

    # (train samples, val samples, epochs, repeats) per model. Full: the text model trains the recipe's 3,000
    # passages once (as the recipe does) in one round, its step time the median of ~190 steps; the image models
    # two epochs of 5,000 in two interleaved rounds. Quick and smoke runs check the plumbing: their figures say
    # nothing (smoke: EfficientNet only, what the test suite runs).
    if smoke:
        sizes = {"effnet": (64, 64, 1, 1)}
    elif quick:
        sizes = {"effnet": (128, 128, 1, 1), "vit": (128, 128, 1, 1), "text": (32, 32, 1, 1)}
    else:
        sizes = {"effnet": (5_000, 500, 2, 2), "vit": (5_000, 500, 2, 2), "text": (3_000, 600, 1, 1)}
    models = tuple(sizes)
    runs: dict[str, dict[str, list[dict]]] = {m: {c: [] for c in CONTENDERS} for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            samples, val_samples, epochs, repeats = sizes[model]
            for i in range(repeats):  # A B C A B C ...
                for contender in CONTENDERS:
                    root = Path(tmp, f"{model}-{contender}-{i}")
                    # smoke: in this process (no interpreter starts; its memory figures are not the run's own)
                    measure = one_run if smoke else _subprocess
                    runs[model][contender].append(measure(model, contender, samples, epochs, str(root), val_samples))
    table = {}
    for model, by in runs.items():
        for contender, rs in by.items():
            table[f"{model}/{contender}"] = {
                key: statistics.median(r[key] for r in rs)
                for key in (
                    "trainable_params",
                    "total_params",
                    "peak_rss_mib",
                    "train_extra_rss_mib",
                    "step_s",
                    "checkpoint_mib",
                    "val_acc",
                )
            }

    def row(model: str, key: str, digits: int | None = None) -> list | None:
        if model not in models:
            return None
        values = [table[f"{model}/{c}"][key] for c in CONTENDERS]
        return [round(v, digits) for v in values] if digits is not None else values

    return {
        "setup": {
            "train_val_samples_epochs_repeats": sizes,
            "models": models,
            "torch_threads": "torch's default (the machine's cores)",
            "batch_size": {"effnet": 32, "vit": 32, "text": 16},
            "lora": CONTENDERS["lora"]["peft"],
            "lr": LR,
            "notes": NOTES,
        },
        "runs": runs,
        "table": table,
        "headline": {
            "effnet_trainable_full_lora_head": row("effnet", "trainable_params"),
            "effnet_ckpt_mib_full_lora_head": row("effnet", "checkpoint_mib"),
            "effnet_step_s_full_lora_head": row("effnet", "step_s", 4),
            "effnet_train_extra_rss_mib_full_lora_head": row("effnet", "train_extra_rss_mib"),
            "effnet_val_acc_full_lora_head": row("effnet", "val_acc", 4),
            "vit_step_s_full_lora_head": row("vit", "step_s", 4),
            "vit_train_extra_rss_mib_full_lora_head": row("vit", "train_extra_rss_mib"),
            "text_trainable_full_lora_head": row("text", "trainable_params"),
            "text_ckpt_mib_full_lora_head": row("text", "checkpoint_mib"),
            "text_step_s_full_lora_head": row("text", "step_s", 4),
            "text_train_extra_rss_mib_full_lora_head": row("text", "train_extra_rss_mib"),
            "text_val_acc_full_lora_head": row("text", "val_acc", 4),
            "vit": "random init (no pretrained ViT offline): costs only",
        },
    }
