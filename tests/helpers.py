"""Small training harness shared by the callback tests: a tiny timm ViT on a synthetic image folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.data.vision import ImageDataModule
from peft_lightning.tasks.vision import ImageClassifier

SEED = 7


def tiny_model(**kw) -> ImageClassifier:
    seed_everything(SEED)
    return ImageClassifier("test_vit", num_classes=3, pretrained=False, **{"lr": 1e-2, **kw})


def tiny_data(folder: Path, model: ImageClassifier | None = None, **kw) -> ImageDataModule:
    """The image folder, connected to ``model``'s preprocessing as the CLI connects them (default: tiny_model's
    test_vit, read from timm's config without building a model, which would draw random numbers)."""
    # augment=False: training batches are deterministic, so runs can be compared weight for weight.
    data = ImageDataModule(str(folder), **{"batch_size": 8, "num_workers": 0, "augment": False, "seed": SEED, **kw})
    data.connect(**(model.data_needs() if model is not None else {"data_config": tiny_vit_config()}))
    return data


def tiny_vit_config() -> dict:
    """timm's data config of ``test_vit`` (what ``tiny_model().data_config()`` gives)."""
    import timm

    return timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("test_vit").to_dict())


class PhaseRecorder(Callback):
    """Which layer groups changed during each epoch, and the LR of each named group at its start."""

    def __init__(self) -> None:
        self.changed: list[list[str]] = []
        self.lrs: list[dict[str, float]] = []

    def _snap(self, m):
        return {g: [p.detach().clone() for n, p in m.named_parameters() if n in names] for g, names in m.layer_groups()}

    def on_train_epoch_start(self, trainer, pl_module):
        self._before = self._snap(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_epoch_end(self, trainer, pl_module):
        after = self._snap(pl_module)
        self.changed.append([g for g in after if any(not torch.equal(a, b) for a, b in zip(after[g], self._before[g]))])


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def train(
    folder: Path,
    finetuning: FineTuning,
    epochs: int,
    *,
    root: Path | None = None,
    extra=(),
    ckpt_path=None,
    model_kw=None,
    limit_val_batches: int | float = 1.0,
    logger=False,
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = tiny_model(**(model_kw or {}))
    callbacks = [finetuning, *extra]
    if root is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, save_last=True))
    trainer = Trainer(
        max_epochs=epochs,
        logger=logger,
        enable_checkpointing=root is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_val_batches=limit_val_batches,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, tiny_data(folder), ckpt_path=ckpt_path)
    return model, trainer


def save_tiny_bert(folder: Path, vocab: list[str], max_position_embeddings: int = 64) -> Path:
    """A 2-layer, 32-wide BERT body (no head) and a WordPiece tokenizer over ``vocab``, saved in ``folder`` as
    ``save_pretrained`` does; the weights are seeded (0)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


def tiny_cli_args(dataset: Path, root: Path, *extra: str, recipe: str = "vit_cifar") -> list[str]:
    """``fit`` of a tiny random EfficientNet (3 classes, 32 px, batch 4, a fifth of the folder for validation, fp32,
    on the CPU whatever else the machine has, no progress bar, no test after fit) on an image folder, for tests
    that drive the CLI; ``extra`` flags go last (a later flag wins)."""
    return [
        "fit",
        "--recipe",
        recipe,
        "--model.model_name",
        "test_efficientnet",
        "--model.pretrained",
        "false",
        "--model.num_classes",
        "3",
        "--data.dataset",
        str(dataset),
        "--data.image_size",
        "32",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--data.val_fraction",
        "0.2",
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.accumulate_grad_batches",
        "1",
        "--test_after_fit",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


# Imported once by the fork server, so that each forked run starts in about a second (a fresh interpreter spends
# 5-10 s of a busy 2-core machine importing them).
_FORK_PRELOAD = [
    "lightning",
    "lightning.pytorch",
    "lightning.pytorch.cli",
    "lightning.pytorch.loggers",
    "torchmetrics",
    "torchvision",
    "timm",
    "jsonargparse",
    "datasets",
    "rich",
    "matplotlib.backends.backend_agg",
    "peft_lightning.cli",
    "peft_lightning.cli.lightning_cli",
    "peft_lightning.callbacks.checkpoint",
    "peft_lightning.model_files.checkpoints",
    "peft_lightning.output.report",
    "peft_lightning.output.summary",
    "peft_lightning.engine.precision",
    "peft_lightning.engine.launch",
    "peft_lightning.engine.strategy",
    "recipes.vit_cifar",
    "reliability_callbacks",
    "helpers",
]


def _forked_main(args: list[str], out: str, err: str) -> None:
    import os
    import sys

    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    root = Path(__file__).resolve().parents[1]
    os.chdir(root)
    sys.argv = [str(root / "peft_lightning" / "__main__.py"), *args]  # what `python -m peft_lightning ARGS` sees
    from peft_lightning.cli import main

    main()  # its SystemExit becomes the exit status, as for `python -m peft_lightning`


def forked_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m peft_lightning ARGS`` in a new process forked from a server that has imported torch, Lightning
    and this project (multiprocessing's ``forkserver``, started by the first call in this process): a fresh process
    for whatever a kill test looks at (its own memory, signal handlers and exit status: ``-9`` when
    SIGKILLed), in ~1-2 s instead of ~8. Returns what ``subprocess.run(..., capture_output=True, text=True)`` does."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_FORK_PRELOAD)  # read when the server starts; later calls change nothing
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        process = ctx.Process(target=_forked_main, args=(args, str(out), str(err)))
        process.start()
        process.join(timeout)
        timed_out = process.exitcode is None
        if timed_out:
            process.kill()
            process.join()
        # A child that failed before it took over stdout and stderr wrote its traceback to this process's.
        stdout, stderr = (path.read_text() if path.exists() else "" for path in (out, err))
        if timed_out:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        return subprocess.CompletedProcess(args, process.exitcode, stdout, stderr)


def run_card_snippets(readme: Path) -> dict:
    """Execute every ```python block of an exported model card in one namespace (what a reader would paste)."""
    import re

    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, readme.read_text()
    for code in blocks:
        exec(compile(code, str(readme), "exec"), namespace)
    return namespace
