"""The prefix cache: exact (cached and uncached runs end with the same weights, through unfreezes, resumed or not),
cached epochs read no raw data, memory or disk, refusals, and a cut that does not reproduce the model is not used."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from test_text import datamodule, sentiment_csv, tiny_bert  # noqa: F401  (fixtures)

import peft_lightning.data.vision as vision_data
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import FreezeUnfreeze, Gradual
from peft_lightning.errors import UsageError
from peft_lightning.tasks.text import TextClassifier

from helpers import StopAfterEpoch, tiny_data, tiny_model, train


def same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> list[str]:
    """Names of the tensors that differ."""
    other = b.state_dict()
    return [
        n for n, v in a.state_dict().items() if v.is_floating_point() and not torch.allclose(v, other[n], atol=atol)
    ]


class Decodes(Callback):
    """How many images each training epoch decoded (validation is off in these runs)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        self.per_epoch: list[int] = []
        original = vision_data.open_image

        def counting(value):
            self.count += 1
            return original(value)

        monkeypatch.setattr(vision_data, "open_image", counting)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = self.count

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(self.count - self._start)


def test_a_cached_run_ends_with_the_weights_of_an_uncached_one_through_unfreezes(image_folder, monkeypatch):
    # gradual: head (epochs 0-1), blocks.5 + head (2-3), blocks.4 up (4): three cuts, each cached, dropped, rebuilt.
    plain, _ = train(
        image_folder,
        FineTuning(Gradual(at_epoch=2, every=2), cache_features=False),
        epochs=5,
        limit_val_batches=0,
    )
    ft = FineTuning(Gradual(at_epoch=2, every=2), cache_features=True)
    decodes = Decodes(monkeypatch)
    cached, _ = train(image_folder, ft, epochs=5, extra=[decodes], limit_val_batches=0)
    assert same_weights(plain, cached) == []
    # 28 training images: each phase's first epoch decodes them (and fills the cache), its second reads the cache.
    assert decodes.per_epoch == [28, 0, 28, 0, 28]
    notes = ft.cache_summary()
    assert "dropped the cache of the input of head: 28/28 examples" in notes[0] and "50%" in notes[0]
    assert "dropped the cache of the input of blocks.5" in notes[1]
    assert cached.prefix_cache is None  # released at the end of fit


def test_cached_epochs_are_made_in_the_main_process_with_the_batches_the_loader_made_before(image_folder):
    # Worker processes (persistent, as the recipes run) hand over the raw first epoch; the cached epochs' batches are
    # made in this process (never through shared memory), and the run ends with the uncached run's weights.
    handed_over: list[bool] = []

    class Where(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                handed_over.append(batch["labels"].is_shared())

    def run(cache: bool) -> torch.nn.Module:
        model = tiny_model()
        trainer = Trainer(
            max_epochs=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            deterministic=True,
            callbacks=[FineTuning("head", cache_features=cache), Where()],
        )
        trainer.fit(model, tiny_data(image_folder, num_workers=1, persistent_workers=True))
        return model

    plain = run(False)
    assert handed_over == [True, True, True]
    handed_over.clear()
    cached = run(True)
    assert handed_over == [True, False, False]
    assert same_weights(plain, cached) == []


def test_a_cached_epoch_resumed_mid_epoch_continues_at_the_same_batch(image_folder):
    from torch.utils.data import DataLoader

    data = tiny_data(image_folder)
    data.setup("fit")
    loader = data.train_dataloader()
    rows = data.index_dataset()
    assert loader.dataset is rows  # the data module hands the cache the dataset its training loader reads
    rows.serve_cached(True)

    def epoch(made_here: bool, epoch: int, resume_at: int | None = None) -> list[dict[str, torch.Tensor]]:
        loader.sampler.set_epoch(epoch)
        if resume_at is not None:  # a checkpoint saved after `resume_at` batches of `epoch`
            loader.load_state_dict({"epoch": epoch, "batches": resume_at})
        return list(iter(loader) if made_here else DataLoader.__iter__(loader))  # else torch's iterator, as before

    def same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> bool:
        return [b.keys() for b in got] == [b.keys() for b in want] and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in b
        )

    whole = epoch(False, 1)
    assert len(whole) == 4 and same(epoch(True, 1), whole)
    assert same(epoch(True, 1, resume_at=2), whole[2:])
    assert not same(epoch(True, 2), whole)  # each epoch its own order


def test_the_training_loss_reaches_the_loggers_as_when_it_was_logged_at_every_step(image_folder, tmp_path):
    # The task logs `train/loss` at the steps Lightning writes (log_every_n_steps) and at each epoch's last, not at
    # every step (a `self.log` call costs a tenth of a cached step): metrics.csv and the final value are unchanged.
    from lightning.pytorch.loggers import CSVLogger

    def fit(every_step: bool) -> tuple[str, torch.Tensor, int]:
        model = tiny_model()
        calls, log = [0], model.log

        def counted(name, *args, **kwargs):
            calls[0] += name == "train/loss"
            return log(name, *args, **kwargs)

        model.log = counted
        if every_step:  # the way before
            model.log_train_loss = lambda loss, batch_size=None: model.log(
                "train/loss", loss, prog_bar=True, batch_size=batch_size
            )
        folder = tmp_path / str(every_step)
        trainer = Trainer(
            max_epochs=3,
            log_every_n_steps=3,
            logger=CSVLogger(folder, name="", version=""),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            deterministic=True,
            callbacks=[FineTuning("head", cache_features=True)],
        )
        trainer.fit(model, tiny_data(image_folder))
        return (folder / "metrics.csv").read_text(), trainer.callback_metrics["train/loss"], calls[0]

    csv, last, calls = fit(every_step=False)
    csv_before, last_before, calls_before = fit(every_step=True)
    assert csv == csv_before and "train/loss" in csv.splitlines()[0] and torch.equal(last, last_before)
    assert (calls, calls_before) == (6, 12)  # 4 steps an epoch: steps 3, 6, 9, 12 and each epoch's last (4, 8, 12)


def test_a_text_run_caches_the_input_of_its_lowest_training_block(tiny_bert, sentiment_csv, tmp_path):  # noqa: F811
    def run(cache):
        seed_everything(0)
        model = TextClassifier(tiny_bert, num_labels=3, lr=1e-3)
        ft = FineTuning(Gradual(at_epoch=0, every=2, groups=3), cache_features=cache)
        trainer = Trainer(
            max_epochs=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[ft],
            deterministic=True,
        )
        trainer.fit(model, datamodule(sentiment_csv, tiny_bert, tmp_path))
        return model, ft

    plain, _ = run(False)
    cached, ft = run(True)
    # Dropout trains in layer.1 and the head: the same draws in both runs, so the same weights.
    assert same_weights(plain, cached) == []
    notes = ft.cache_summary()
    assert "input of layer.1: 57/57 examples" in notes[0] and "50%" in notes[0]


def test_a_resumed_cached_run_equals_an_uninterrupted_one(image_folder, tmp_path):
    ft = lambda: FineTuning(FreezeUnfreeze(at_epoch=0, groups=2), cache_features=True)  # noqa: E731
    whole, _ = train(image_folder, ft(), epochs=4, root=tmp_path / "a", limit_val_batches=0)
    train(image_folder, ft(), epochs=4, root=tmp_path / "b", limit_val_batches=0, extra=[StopAfterEpoch(1)])
    # The cache is not in the checkpoint: the resumed run fills it again in its first epoch.
    resumed, _ = train(
        image_folder,
        ft(),
        epochs=4,
        root=tmp_path / "b",
        limit_val_batches=0,
        ckpt_path=str(tmp_path / "b" / "last.ckpt"),
    )
    assert same_weights(whole, resumed) == []


def test_past_its_memory_budget_the_cache_goes_to_a_file_in_the_run_folder(image_folder, tmp_path):
    seen = {}

    class Where(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            cache = pl_module.prefix_cache
            seen[trainer.current_epoch] = (cache.path, cache.path.stat().st_size if cache.path else None)

    plain, _ = train(image_folder, FineTuning("head", cache_features=False), epochs=3, limit_val_batches=0)
    ft = FineTuning("head", cache_features=True, cache_max_gb=1e-9)
    cached = tiny_model()
    trainer = Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
        default_root_dir=tmp_path,
        callbacks=[ft, Where()],
    )
    trainer.fit(cached, tiny_data(image_folder))
    path, size = seen[2]
    assert path == tmp_path / "prefix_cache" / "prefix_cache.rank0.bin"
    assert size == 28 * cached.model.num_features * 4  # 28 rows of float32 pooled features
    assert not path.exists()  # removed at the end of fit
    assert same_weights(plain, cached) == []
    assert f"in {path}" in ft.cache_summary()[-1]


def test_by_default_the_cache_keeps_to_memory_and_to_phases_that_reuse_it(image_folder):
    over = FineTuning("head", cache_max_gb=1e-9)  # default: on where exact, in memory only
    model, _ = train(image_folder, over, epochs=2, limit_val_batches=0)
    assert any("memory budget" in note and "cache_features true" in note for note in over.cache_summary())
    one = FineTuning(FreezeUnfreeze(at_epoch=1))  # the head's phase lasts one epoch: nothing to reuse
    train(image_folder, one, epochs=2, limit_val_batches=0)
    assert one.cache_summary() == []
    reused = FineTuning("head")
    train(image_folder, reused, epochs=2, limit_val_batches=0)
    assert "input of head: 28/28 examples" in reused.cache_summary()[-1]


@pytest.mark.parametrize(
    "option, match",
    [
        ({}, "augmentation"),
        ({"frozen_dropout": True}, "frozen_dropout"),
        ({"train_bn": True}, "train_bn"),
    ],
)
def test_cache_features_true_refuses_what_it_cannot_do_exactly(image_folder, option, match):
    augment = not option
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FineTuning("head", cache_features=True, **option)],
    )
    with pytest.raises(UsageError, match=match):
        trainer.fit(tiny_model(), tiny_data(image_folder, augment=augment))


def test_a_cut_that_does_not_reproduce_the_model_is_not_used(image_folder, monkeypatch):
    from peft_lightning.tasks.vision import ImageClassifier

    original = ImageClassifier.prefix_split

    def wrong(self, group):
        split = original(self, group)
        good = split.logits
        split.logits = lambda batch, rows: good(batch, {k: v * 1.5 for k, v in rows.items()})
        return split

    monkeypatch.setattr(ImageClassifier, "prefix_split", wrong)
    plain, _ = train(image_folder, FineTuning("head", cache_features=False), epochs=2, limit_val_batches=0)
    ft = FineTuning("head", cache_features=True)
    cached, _ = train(image_folder, ft, epochs=2, limit_val_batches=0)
    assert any("did not reproduce" in note for note in ft.cache_summary())
    assert same_weights(plain, cached) == []


def test_frozen_groups_run_in_eval_mode_unless_frozen_dropout(image_folder):
    modes = {}

    class Modes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            blocks = pl_module.model.blocks
            modes[trainer.current_epoch] = (blocks[0].training, blocks[-1].training, pl_module.model.head.training)

    train(
        image_folder,
        FineTuning(FreezeUnfreeze(at_epoch=1, groups=2), cache_features=False),
        epochs=2,
        extra=[Modes()],
        limit_val_batches=0,
    )
    assert modes == {0: (False, False, True), 1: (False, True, True)}
    train(image_folder, FineTuning("head", frozen_dropout=True), epochs=1, extra=[Modes()], limit_val_batches=0)
    assert modes[0] == (True, True, True)


def test_under_ddp_each_rank_fills_its_rows_and_every_rank_ends_with_all_of_them(image_folder, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "ddp_cache.py"
    script.write_text(f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
from lightning.pytorch import Callback, Trainer
from peft_lightning.callbacks.finetuning import FineTuning
from helpers import tiny_data, tiny_model
cache = sys.argv[1] == "cached"
seen = []
class Complete(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        c = pl_module.prefix_cache
        seen.append(None if c is None else [c.count, c.complete])
ft = FineTuning("head", cache_features=cache)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_val_batches=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, deterministic=True, callbacks=[ft, Complete()])
model = tiny_model(optimizer="sgd", lr=0.05)
trainer.fit(model, tiny_data({str(image_folder)!r}, batch_size=4))
if trainer.global_rank == 0:
    torch.save(model.state_dict(), {str(tmp_path)!r} + f"/{{sys.argv[1]}}.pt")
open({str(tmp_path)!r} + f"/{{sys.argv[1]}}{{trainer.global_rank}}.json", "w").write(json.dumps(seen))
""")
    for kind in ("cached", "plain"):
        done = subprocess.run(
            [sys.executable, str(script), kind],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # after the first epoch every rank holds all 28 rows (14 its own, 14 from the other)
        assert json.loads((tmp_path / f"cached{rank}.json").read_text()) == [[0, False], [28, True], [28, True]]
    cached, plain = (torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in ("cached", "plain"))
    assert [k for k in plain if not torch.allclose(plain[k], cached[k], atol=1e-5)] == []


def test_the_run_summary_says_what_was_cached_its_size_and_where(image_folder, tmp_path, cli):
    from helpers import tiny_cli_args

    code, out, err = cli(
        *tiny_cli_args(
            image_folder,
            tmp_path,
            "--finetuning.strategy",
            "head",
            "--data.augment",
            "false",
            "--trainer.max_epochs",
            "2",
            "--finetuning.cache_features",
            "true",
            "--finetuning.cache_max_gb",
            "1e-9",
        )
    )
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("│ prefix cache"))
    cell = lines[first].split("│")[2].strip()
    for line in lines[first + 1 :]:  # the row wraps: its value goes on while the field column is empty
        if line.split("│")[1].strip():
            break
        cell += line.split("│")[2].strip()
    assert cell.startswith("end of fit: input of head: ") and "examples" in cell and "KB in" in cell
    assert "/prefix_cache/prefix_cache.rank0.bin," in cell  # past its budget: a file in the run folder
