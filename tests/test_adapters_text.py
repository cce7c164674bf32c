"""peft adapters on the text task (a 2-layer BERT built here, no hub): only adapters and head train, the layer
groups schedule adapters block by block, adapter-only checkpoints resume exactly, the export round-trips through
PeftModel.from_pretrained and merges without changing outputs, and fit/export/predict run through the CLI."""

from __future__ import annotations

import csv
import re
import string
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from peft_lightning.adapters import ADAPTER_METHODS, AdapterConfig
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import FreezeUnfreeze, Retune
from peft_lightning.errors import UsageError
from peft_lightning.model_files.export import export
from peft_lightning.tasks.text import TextClassifier

from helpers import PhaseRecorder, StopAfterEpoch, run_card_snippets

METHODS = list(ADAPTER_METHODS)  # every row of the table: lora, dora, ia3, loha, lokr
WORDS = ["the", "a", "movie", "was", "good", "bad", "fine"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BertModel (no task head, like MiniLM) with a WordPiece tokenizer; no dropout, so that
    an interrupted and an uninterrupted run can be compared weight for weight."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase]
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return str(folder)


def loader(seed: int = 0, n_batches: int = 3) -> DataLoader:
    """Pre-tokenized batches of 8 (12 tokens) whose label is given by one token: something to learn."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, 12, (8, 12), generator=g)
        labels = torch.randint(0, 3, (8,), generator=g)
        ids[:, 3] = 9 + labels  # "good" / "bad" / "fine"
        ids[:, 0], ids[:, -1] = 2, 3
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return DataLoader(batches, batch_size=None)


def model_for(tiny_bert: str, method: str | None = "lora", **kw) -> TextClassifier:
    seed_everything(7)  # the new head's initialisation
    peft = AdapterConfig(method, r=4) if method else None
    return TextClassifier(tiny_bert, num_labels=3, lr=1e-2, **{"peft": peft, **kw})


def train(model, callbacks, epochs, *, root=None, ckpt_path=None, val=True) -> Trainer:
    if root is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root, save_last=True)]
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=root is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        limit_val_batches=1.0 if val else 0,
    )
    trainer.fit(model, loader(), loader(seed=1, n_batches=1) if val else None, ckpt_path=ckpt_path)
    return trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_head_change(tiny_bert, method):
    model = model_for(tiny_bert, method)
    before = snapshot(model)
    trainable = model.trainable_parameter_names()
    train(model, [FineTuning("full")], 1, val=False)
    after = snapshot(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    # the classifier and the pooler train in full; adapters moved in both blocks, on query/key/value and dense
    assert any(".classifier.modules_to_save." in n for n in changed)
    assert any(".pooler.modules_to_save." in n for n in changed)
    adapted = {n.split(".layer.")[1].split(".")[0] for n in changed if ".encoder.layer." in n}
    assert adapted == {"0", "1"}
    assert {n.split(".attention.self.")[1].split(".")[0] for n in changed if ".attention.self." in n} == {
        "query",
        "key",
        "value",
    }
    assert any(".intermediate.dense." in n for n in changed) and any(".output.dense." in n for n in changed)
    assert not any("embeddings" in n for n in trainable)


def test_layer_groups_schedule_adapters_block_by_block(tiny_bert):
    model = model_for(tiny_bert)
    groups = model.layer_groups()
    assert [n for n, _ in groups] == ["embeddings", "layer.0", "layer.1", "head"]
    assert sorted(p for _, ps in groups for p in ps) == sorted(n for n, _ in model.named_parameters())
    assert any("lora_A" in n for n in dict(groups)["layer.1"]) and not any("lora_" in n for n in dict(groups)["head"])
    rec = PhaseRecorder()
    train(model, [FineTuning(FreezeUnfreeze(at_epoch=1, groups=2)), rec], 2, val=False)
    assert rec.changed == [["head"], ["layer.1", "head"]]  # then layer.1's adapters train too
    trainable = model.trainable_parameter_names()
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= trainable


def test_adapter_only_checkpoint_resumes_exactly(tiny_bert, tmp_path):
    def callback():
        return FineTuning(Retune(round_epochs=2), monitor="val/loss", mode="min")

    full = model_for(tiny_bert)
    train(full, [callback()], 3)
    train(model_for(tiny_bert), [callback(), StopAfterEpoch(1)], 3, root=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(full.trainable_state_dict())
    assert "model.base_model.model.bert.embeddings.word_embeddings.weight" not in ckpt["state_dict"]
    assert ckpt["adapter_only"]["method"] == "lora"
    resumed = model_for(tiny_bert)
    train(resumed, [callback()], 3, root=tmp_path / "again", ckpt_path=str(tmp_path / "last.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("method", METHODS)
def test_export_round_trips_and_merge_preserves_outputs(tiny_bert, tmp_path, method):
    import transformers
    from peft import PeftModel

    model = model_for(tiny_bert, method).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start as the identity: move them so that merging has something to merge
        for name, p in model.named_parameters():
            if name in model.trainable_parameter_names():
                p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(loader(seed=2)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs)
    written = export(model, tmp_path, merge=True)
    assert {p.name for p in written} == {"adapter_config.json", "adapter_model.safetensors", "merged", "README.md"}

    def base():
        return transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).eval()

    loaded = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")  # --model.model_name can take it
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(tiny_bert).get_vocab()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)
        assert torch.allclose(merged(**inputs).logits, expected, atol=1e-4)
        assert not torch.allclose(base()(**inputs).logits, expected, atol=1e-3)  # the adapters and head matter
        # what `predict` builds from the adapter folder and from the merged folder
        from_adapter = TextClassifier(tiny_bert, num_labels=3, peft=AdapterConfig(adapter_path=str(tmp_path)))
        assert from_adapter.adapter_config.method == method
        assert torch.allclose(from_adapter.eval()(**inputs), expected, atol=1e-5)
        from_merged = TextClassifier(str(tmp_path / "merged"), num_labels=3).eval()
        assert torch.allclose(from_merged(**inputs), expected, atol=1e-4)
        # the model card's load snippets (plain transformers + peft, and the merged folder), run as written
        snippets = run_card_snippets(tmp_path / "README.md")
        assert torch.allclose(snippets["model"](**inputs).logits, expected, atol=1e-5)
        assert torch.allclose(snippets["merged"].eval()(**inputs).logits, expected, atol=1e-4)


def test_bad_targets_and_adapter_folders_stop_with_one_line(tiny_bert, tmp_path):
    cases = [
        (AdapterConfig("lora", target_modules=["nothing_here"]), "matches no module.*query"),
        (AdapterConfig("lora", target_modules=["LayerNorm"]), "cannot adapt"),
        (AdapterConfig(adapter_path=str(tmp_path / "nowhere")), "no adapter_config.json"),
    ]
    for peft, match in cases:
        with pytest.raises(UsageError, match=match) as err:
            TextClassifier(tiny_bert, num_labels=3, peft=peft)
        assert "\n" not in str(err.value)
    export(model_for(tiny_bert, "ia3"), tmp_path / "ia3")
    with pytest.raises(UsageError, match="holds a ia3 adapter, not lora"):
        TextClassifier(tiny_bert, num_labels=3, peft=AdapterConfig("lora", adapter_path=str(tmp_path / "ia3")))
    with pytest.raises(UsageError, match="cannot load the adapter.*number of classes"):  # a 3-class head
        TextClassifier(tiny_bert, num_labels=4, peft=AdapterConfig(adapter_path=str(tmp_path / "ia3")))


@pytest.mark.slow
def test_cli_fit_export_and_predict_from_checkpoint_adapter_and_merged(tiny_bert, tmp_path, cli):
    data = tmp_path / "sst2"
    data.mkdir()
    for split, n in (("train", 48), ("validation", 16)):
        with open(data / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["idx", "sentence", "label"])
            for i in range(n):
                w.writerow([i, f"the movie was {['bad', 'good'][i % 2]} {string.ascii_lowercase[i % 26]}", i % 2])
    common = [
        "--recipe",
        "bert_sst2",
        "--data.dataset",
        str(data),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "8",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    root = tmp_path / "run"
    code, out, err = cli(
        "fit",
        *common,
        "--model.model_name",
        tiny_bert,
        "--peft.method",
        "lora",
        "--peft.r",
        "4",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.dirpath",
        str(root),
    )
    assert code == 0, err[-3000:]
    assert "bert_sst2: test/acc" in out
    ckpt = root / "last.ckpt"
    assert "adapter_only" in torch.load(ckpt, map_location="cpu", weights_only=True)
    code, out, err = cli(
        "export", "--recipe", "bert_sst2", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "x"), "--merge"
    )
    assert code == 0, err[-3000:]
    predict = ["predict", *common, "--trainer.default_root_dir", str(tmp_path / "p")]
    # New, unlabelled data: a csv of sentences only (its own column name), the label names from the checkpoint.
    new = tmp_path / "new.csv"
    new.write_text("review\nthe movie was good q\nthe movie was bad r\nthe movie was good s\n")
    written = []
    for args in (
        ["--model.model_name", tiny_bert, "--ckpt_path", str(ckpt)],  # the adapters come from the ckpt
        ["--model.model_name", tiny_bert, "--peft.adapter_path", str(tmp_path / "x")],
        ["--model.model_name", str(tmp_path / "x" / "merged")],
        ["--model.model_name", tiny_bert, "--ckpt_path", str(ckpt), "--data.predict_data", str(new)],
    ):
        code, out, err = cli(*predict, *args)
        assert code == 0, (args, err[-3000:])
        path = Path(re.search(r"^predictions: (\S+) \(", out, re.M).group(1))
        written.append(pq.read_table(path).to_pylist())
    test_split = written[0]  # the recipe tests on validation (SST-2's test has no labels): its 16 rows, in order
    assert [r["id"] for r in test_split] == [str(i) for i in range(16)] and all(
        r["text"].startswith("the movie was") for r in test_split
    )
    assert {r["label"] for r in test_split} <= {"0", "1"} and {r["prediction"] for r in test_split} <= {"0", "1"}
    for other in written[1:3]:  # the adapter folder and the merged model predict what the checkpoint does
        assert [r["prediction"] for r in other] == [r["prediction"] for r in test_split]
        assert [r["probability"] for r in other] == pytest.approx([r["probability"] for r in test_split], abs=1e-4)
    unlabelled = written[3]
    assert [r["text"] for r in unlabelled] == ["the movie was good q", "the movie was bad r", "the movie was good s"]
    assert [r["id"] for r in unlabelled] == ["0", "1", "2"] and "label" not in unlabelled[0]
