#!/usr/bin/env python
"""The GPU check of the parallel and mixed-precision engine: one call, at most ~8 minutes on one GPU, no network.

    python scripts/gpu_check.py                      # on a GPU machine: writes gpu_check.json
    python scripts/gpu_check.py --out results.json --budget 420 --only vit,fsdp
    python scripts/gpu_check.py --dry                # on a CPU: tiny models, a few steps (what the tests run)

Which Python: any interpreter that has torch, lightning, timm, transformers and peft with this repository on its
path (the script puts the repository first on ``sys.path``): ``.venv/bin/python`` after ``scripts/setup.sh``, or
the machine's own Python. Nothing is downloaded: ViT-B/16 is random-init with synthetic images; the recipe checks
need the offline assets of ``scripts/setup.sh`` (Fashion-MNIST, EfficientNet-Lite0, MiniLM, the Austen novels) and
record an error where they are missing.

Each group of checks runs in its own child process under the remaining time budget, and each check inside it in
its own ``try``: an error, a CUDA failure or a timeout is recorded in the JSON and the other checks go on. The JSON
is rewritten after every group, so a run cut short keeps what it measured. Fields (docs/parallel.md):

- ``machine``: python, torch, lightning, CUDA, GPU name, compute capability, bf16 support;
- ``checks.<name>``: ``ok`` (bool), ``error`` (one line, when not ok), ``seconds`` (wall time of the check) and,
  for training checks, ``precision``, ``steps``, ``batch``, ``samples_per_s`` (after ``warmup`` steps),
  ``peak_mem_gib`` (``torch.cuda.max_memory_allocated``), ``loss_first``/``loss_last``; recipe checks add
  ``val_acc``; ``speedup_vs_32`` where a 32-true twin ran; FSDP checks add ``frozen_unchanged`` /
  ``trained_changed`` (bool), ``fsdp_units``, ``block_classes`` and ``params_compared`` of ``params``; compile
  checks ``compiled_modules`` and ``first_steps_s`` (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("recipes", "vit", "fsdp", "compile")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


# --- shared pieces (imported lazily: the parent process needs only the standard library) ---
def machine() -> dict:
    info: dict = {"python": platform.python_version(), "host_cpu": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["bf16"] = torch.cuda.is_bf16_supported()
        import lightning

        info["lightning"] = lightning.__version__
        from peft_lightning.engine.precision import auto_precision, detect_hardware

        hw = detect_hardware()
        info["auto_precision"] = auto_precision(hw)[0]
    except Exception as err:  # recorded: the checks say what is missing
        info["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return info


class Meter:
    """A Lightning callback timing the training steps after ``warmup`` and recording the loss."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch import Callback

        class _Meter(Callback):
            def __init__(self, warmup: int, batch: int) -> None:
                self.warmup, self.batch = warmup, batch
                self.t0: float | None = None
                self.t1 = 0.0
                self.steps = 0
                self.losses: list[float] = []

            def _sync(self) -> None:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == self.warmup and self.t0 is None:
                    self._sync()
                    self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))
                if self.t0 is not None:
                    self._sync()
                    self.t1 = time.perf_counter()
                    self.steps += 1

            def figures(self) -> dict:
                timed = self.t1 - self.t0 if self.t0 is not None else 0.0
                return {
                    "steps": len(self.losses),
                    "timed_steps": self.steps,
                    "samples_per_s": round(self.steps * self.batch / timed, 2) if timed > 0 else None,
                    "loss_first": round(self.losses[0], 4) if self.losses else None,
                    "loss_last": round(self.losses[-1], 4) if self.losses else None,
                }

        return _Meter(*args, **kwargs)


def peak_mem(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def trainer_for(
    precision: str, steps: int, meter, model, strategy=None, callbacks=(), val_batches: int | float = 0, **kw
):
    from lightning.pytorch import Trainer

    from peft_lightning.engine.strategy import trainer_overrides

    args = {"precision": precision, "accelerator": "auto"}
    over = trainer_overrides(args, model)
    return Trainer(
        devices=1,
        max_steps=steps,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter, *callbacks],
        **({"strategy": strategy} if strategy is not None else {}),
        **{"precision": precision, **over},
        **kw,
    )


def synthetic_images(n_batches: int, batch: int, size: int, classes: int = 10):
    """A map-style dataset of ``n_batches * batch`` fixed random images (no files, no network)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch * 2, 3, size, size, generator=g)
    labels = torch.randint(0, classes, (batch * 2,), generator=g)

    class Images(Dataset):
        def __len__(self) -> int:
            return n_batches * batch

        def __getitem__(self, i: int) -> dict:
            return {"pixel_values": images[i % len(images)], "labels": labels[i % len(labels)]}

    return DataLoader(Images(), batch_size=batch, shuffle=False, num_workers=0, drop_last=True)


# --- the checks: each returns a dict of figures or raises ---
def vit_setup(dry: bool) -> dict:
    # ViT-B/16 at 224 px (86M parameters) on a GPU; timm's 6-block, 64-wide test_vit at 160 px on a CPU.
    if dry:
        return {"model": "test_vit", "batch": 4, "size": 160, "steps": 3, "warmup": 1}
    return {"model": "vit_base_patch16_224", "batch": 64, "size": 224, "steps": 40, "warmup": 10}


def vit_model(cfg: dict, **kw):
    from lightning.pytorch import seed_everything

    from peft_lightning.tasks.vision import ImageClassifier

    seed_everything(0)
    return ImageClassifier(cfg["model"], num_classes=10, pretrained=False, lr=1e-4, **kw)


def check_vit(precision: str, dry: bool) -> dict:
    cfg = vit_setup(dry)
    model = vit_model(cfg)
    meter = Meter(cfg["warmup"], cfg["batch"])
    peak_mem(reset=True)
    trainer = trainer_for(precision, cfg["steps"], meter, model)
    trainer.fit(model, train_dataloaders=synthetic_images(cfg["steps"], cfg["batch"], cfg["size"]))
    return {
        "model": cfg["model"],
        "precision": str(trainer.precision),
        "batch": cfg["batch"],
        **meter.figures(),
        "peak_mem_gib": peak_mem(),
    }


def check_plain_loop(dry: bool) -> dict:
    """The same model in a hand-written bf16-autocast PyTorch loop: what Lightning's overhead is measured against."""
    import timm
    import torch
    import torch.nn.functional as F

    cfg = vit_setup(dry)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(cfg["model"], pretrained=False, num_classes=10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = synthetic_images(cfg["steps"], cfg["batch"], cfg["size"])
    peak_mem(reset=True)
    t0, losses = None, []
    for step, batch in enumerate(loader):
        if step == cfg["warmup"]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = batch["pixel_values"].to(device), batch["labels"].to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if device == "cuda":
        torch.cuda.synchronize()
    timed = time.perf_counter() - t0
    steps = cfg["steps"] - cfg["warmup"]
    return {
        "model": cfg["model"],
        "precision": "bf16 autocast (plain loop)",
        "batch": cfg["batch"],
        "steps": cfg["steps"],
        "samples_per_s": round(steps * cfg["batch"] / timed, 2),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "peak_mem_gib": peak_mem(),
    }


def check_fsdp(kind: str, dry: bool) -> dict:
    """FSDP on one device: ``frozen`` (the top 4 layer groups train, the rest frozen inside the same FSDP units),
    ``lora`` (peft LoRA adapters + the head) or ``checkpointing`` (full fine-tune with activation checkpointing)."""
    import torch

    from peft_lightning.adapters import AdapterConfig
    from peft_lightning.callbacks.finetuning import FineTuning
    from peft_lightning.callbacks.strategies import FreezeUnfreeze
    from peft_lightning.engine.strategy import fsdp_strategy

    cfg = vit_setup(dry)
    kw: dict = {}
    if kind == "lora":
        kw["peft"] = AdapterConfig("lora", r=8)
    if kind == "checkpointing":
        kw["activation_checkpointing"] = True
    model = vit_model(cfg, **kw)
    ft = FineTuning("full") if kind != "frozen" else FineTuning(FreezeUnfreeze(at_epoch=0, groups=4))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainable = model.trainable_parameter_names() if kind == "lora" else None
    if kind == "frozen":
        trainable = {n for _, names in model.layer_groups()[-4:] for n in names}
    blocks = sorted(c.__name__ for c in model.fsdp_block_classes())
    strategy = fsdp_strategy(model)
    meter = Meter(cfg["warmup"], cfg["batch"])
    peak_mem(reset=True)
    trainer = trainer_for("bf16-mixed", cfg["steps"], meter, model, strategy=strategy, callbacks=[ft])
    trainer.fit(model, train_dataloaders=synthetic_images(cfg["steps"], cfg["batch"], cfg["size"]))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = sum(isinstance(m, FSDP) for m in trainer.strategy.model.modules())

    def plain(name: str) -> str:  # the name before FSDP / checkpoint wrapping
        return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

    try:
        with FSDP.summon_full_params(trainer.strategy.model):
            now = {plain(n): p.detach().float().cpu() for n, p in model.named_parameters()}
    except Exception:  # one process holds whole shards: the parameters are the full tensors
        now = {plain(n): p.detach().float().cpu() for n, p in model.named_parameters()}
    changed = {
        n for n, p in before.items() if n in now and p.shape == now[n].shape and not torch.equal(p.cpu(), now[n])
    }
    out = {
        "model": cfg["model"],
        "precision": "bf16-mixed",
        "batch": cfg["batch"],
        **meter.figures(),
        "peak_mem_gib": peak_mem(),
        "fsdp_units": units,
        "block_classes": blocks,
        "params_compared": sum(n in now for n in before),
        "params": len(before),
    }
    if trainable is not None:
        out["frozen_unchanged"] = not (changed - trainable)
        out["trained_changed"] = bool(changed & trainable)
    else:
        out["trained_changed"] = bool(changed)
    return out


def check_compile(dry: bool) -> dict:
    """bf16-mixed ViT with ``compile=True`` (each block compiled in place) against eager: steady-state throughput,
    and the first steps' time, compilation included."""
    cfg = vit_setup(dry)
    if dry:  # no C++ toolchain run on a test machine: dynamo with the eager backend exercises the same path
        import torch._dynamo

        torch._dynamo.reset()
    model = vit_model(cfg, compile=True)
    if dry:
        from peft_lightning.engine.compile import compile_modules

        blocks = tuple(model.fsdp_block_classes())
        compile_modules([m for m in model.modules() if isinstance(m, blocks)], backend="eager")
    meter = Meter(cfg["warmup"], cfg["batch"])
    peak_mem(reset=True)
    t0 = time.perf_counter()
    trainer = trainer_for("bf16-mixed", cfg["steps"], meter, model)
    trainer.fit(model, train_dataloaders=synthetic_images(cfg["steps"], cfg["batch"], cfg["size"]))
    from peft_lightning.internals import is_compiled

    compiled = sum(is_compiled(m) for m in model.modules())
    return {
        "model": cfg["model"],
        "precision": "bf16-mixed",
        "batch": cfg["batch"],
        **meter.figures(),
        "peak_mem_gib": peak_mem(),
        "compiled_modules": compiled,
        "first_steps_s": round(time.perf_counter() - t0, 1),
    }


def check_recipe(name: str, precision: str, dry: bool) -> dict:
    """A recipe's own model, data and frozen layers for a fixed number of steps, then its validation accuracy."""
    from lightning.pytorch import seed_everything

    from peft_lightning.callbacks.finetuning import FineTuning
    from peft_lightning.registry import get_recipe

    recipe = get_recipe(name)
    ok, why = recipe.availability()
    if not ok:
        raise RuntimeError(f"{name}: {why}")
    batch = {"effnet_fashion": 256, "minilm_austen": 64}[name] if not dry else 8
    steps, warmup = (60, 10) if not dry else (3, 1)
    data = {
        **recipe.data_defaults,
        "batch_size": batch,
        "max_val_samples": 1000 if not dry else 16,
        "max_train_samples": batch * steps,
    }
    if not dry:
        data["num_workers"] = min(8, os.cpu_count() or 1)
    seed_everything(0)
    model = recipe()
    dm = recipe.datamodule_class(**data)
    meter = Meter(warmup, batch)
    peak_mem(reset=True)
    trainer = trainer_for(
        precision,
        steps,
        meter,
        model,
        callbacks=[FineTuning(**recipe.finetuning_defaults)],
        val_batches=1.0,
        max_epochs=1,
    )
    trainer.fit(model, dm)
    metrics = trainer.validate(model, dm, verbose=False)[0]
    return {
        "recipe": name,
        "precision": str(trainer.precision),
        "batch": batch,
        **meter.figures(),
        "peak_mem_gib": peak_mem(),
        "val_acc": round(float(metrics.get("val/acc", float("nan"))), 4),
    }


def group_checks(group: str, dry: bool) -> list[tuple[str, object]]:
    if group == "recipes":
        return [
            (f"recipe_{r}_{p}", lambda r=r, p=p: check_recipe(r, p, dry))
            for r in ("effnet_fashion", "minilm_austen")
            for p in PRECISIONS
        ]
    if group == "vit":
        return [
            *((f"vit_{p}", lambda p=p: check_vit(p, dry)) for p in PRECISIONS),
            ("vit_plain_loop_bf16", lambda: check_plain_loop(dry)),
        ]
    if group == "fsdp":
        return [(f"fsdp_{k}", lambda k=k: check_fsdp(k, dry)) for k in ("frozen", "lora", "checkpointing")]
    if group == "compile":
        return [("compile_vit_bf16", lambda: check_compile(dry))]
    raise ValueError(group)


def run_group(group: str, dry: bool, out: Path) -> None:
    """In the child process: run each check of ``group``, one JSON line each to ``out``."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for name, fn in group_checks(group, dry):
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **fn()}
        except BaseException as err:  # recorded, never fatal: the next check runs
            if isinstance(err, KeyboardInterrupt):
                raise
            first = (str(err).strip().splitlines() or [""])[0][:300]
            result = {
                "ok": False,
                "error": f"{type(err).__name__}: {first}",
                "where": traceback.format_exc().strip().splitlines()[-3:],
            }
        result["seconds"] = round(time.perf_counter() - t0, 1)
        with open(out, "a") as f:
            f.write(json.dumps({name: result}) + "\n")


def add_ratios(checks: dict) -> None:
    for name, res in checks.items():
        for suffix in ("_bf16-mixed", "_16-mixed"):
            twin = checks.get(name.removesuffix(suffix) + "_32-true", {}) if name.endswith(suffix) else {}
            if res.get("samples_per_s") and twin.get("samples_per_s"):
                res["speedup_vs_32"] = round(res["samples_per_s"] / twin["samples_per_s"], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON result file")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all checks (default 450)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--dry", action="store_true", help="CPU dry run: tiny models, a few steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_group(args.child, args.dry, Path(args.out))
        return 0
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"error: unknown group(s) {', '.join(unknown)}: use {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    deadline = time.monotonic() + args.budget
    result: dict = {
        "dry": args.dry,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "checks": {},
    }
    for group in groups:
        left = deadline - time.monotonic()
        if left < 15:
            result["checks"][group] = {"ok": False, "error": "skipped: the time budget is spent"}
            continue
        lines = out.with_suffix(f".{group}.jsonl")
        lines.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", group, "--out", str(lines)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            done = subprocess.run(
                [*cmd, *(["--dry"] if args.dry else [])], env=env, capture_output=True, text=True, timeout=left
            )
            tail = (done.stderr or "").strip().splitlines()[-1:] if done.returncode else []
        except subprocess.TimeoutExpired:
            tail = [f"timeout: the group ran past the budget ({left:.0f} s left when it started)"]
        got = {}
        if lines.exists():
            for line in lines.read_text().splitlines():
                got.update(json.loads(line))
            lines.unlink()
        expected = [name for name, _ in group_checks(group, args.dry)]
        for name in expected:
            result["checks"][name] = got.get(name, {"ok": False, "error": (tail or ["the child process died"])[0]})
        add_ratios(result["checks"])
        result["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
        out.write_text(json.dumps(result, indent=1))
    ok = sum(1 for r in result["checks"].values() if r.get("ok"))
    print(f"gpu_check: {ok}/{len(result['checks'])} checks ok -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
