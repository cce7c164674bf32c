"""The text task and data module on a 2-layer BERT built here (no download) and tiny csv files; the Austen
recipe's passages and splits; the recipes through the CLI."""

from __future__ import annotations

import csv
import random
import string
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

import peft_lightning.data.text as text_data
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.data.source import load_source
from peft_lightning.data.text import TextDataModule
from peft_lightning.data.text_columns import multi_hot_encoder, text_columns
from peft_lightning.errors import UsageError
from peft_lightning.tasks.text import TextClassifier
from recipes.minilm_austen import MinilmAusten, make_passages, split_blocks

from conftest import run_cli

WORDS = ["the", "a", "movie", "film", "plot", "was", "is", "and", "very", "not", "quite"]
CLASS_WORDS = {"pos": ["good", "great"], "neg": ["bad", "awful"], "meh": ["fine", "okay"]}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a 2-class head and a WordPiece tokenizer, saved as `save_pretrained` does."""
    import transformers

    words = WORDS + [w for ws in CLASS_WORDS.values() for w in ws]
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *words,
        *string.ascii_lowercase,
        *(f"##{c}" for c in string.ascii_lowercase),
    ]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def spell(i: int) -> str:
    """A unique word for row i (letters only, so the tokenizer spells it out): makes every text distinct."""
    return "".join(string.ascii_lowercase[int(d)] for d in str(i)) + "x"


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """90 distinct sentences whose class word gives the label; a multi-label `tags` column; lengths 3-14 words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("csv") / "reviews.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "tags"])
        for i in range(90):
            label = ["pos", "neg", "meh"][i % 3]
            body = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
            body.insert(rng.randint(0, len(body)), rng.choice(CLASS_WORDS[label]))
            tags = [t for t in ("x", "y", "z") if rng.random() < 0.4]
            w.writerow([" ".join([spell(i), *body]), label, ",".join(tags)])
    return path


def datamodule(path, tiny_bert, tmp_path, **kw) -> TextDataModule:
    kw = {
        "tokenizer": tiny_bert,
        "batch_size": 8,
        "num_workers": 0,
        "max_length": 32,
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 0.2,
        **kw,
    }
    return TextDataModule(str(path), **kw)


def fit(model, dm, **trainer_kw) -> Trainer:
    kw = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer_kw,
    }
    trainer = Trainer(**kw)
    dm.connect(**model.data_needs())  # the model's tokenizer, as the CLI hands it over (`tokenizer` wins if given)
    trainer.fit(model, dm)
    return trainer


# --- the task ---
def test_layer_groups_run_from_embeddings_to_head_and_cover_every_parameter(tiny_bert):
    model = TextClassifier(tiny_bert, num_labels=3)
    groups = model.layer_groups()
    assert [n for n, _ in groups] == ["embeddings", "layer.0", "layer.1", "head"]
    head = dict(groups)["head"]
    assert "model.classifier.weight" in head and "model.bert.pooler.dense.weight" in head
    assert all(".layer.1." in n for n in dict(groups)["layer.1"])
    grouped = [p for _, ps in groups for p in ps]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # every parameter, once


@pytest.mark.parametrize(
    "arch, blocks, head_has",
    [
        ("gpt2", ["h.0", "h.1"], ["model.transformer.ln_f.weight", "model.score.weight"]),
        ("distilbert", ["layer.0", "layer.1"], ["model.pre_classifier.weight", "model.classifier.weight"]),
        ("roberta", ["layer.0", "layer.1"], ["model.classifier.dense.weight", "model.classifier.out_proj.weight"]),
    ],
)
def test_layer_groups_of_other_architectures(arch, blocks, head_has, tmp_path):
    import transformers

    sizes = {
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "pad_token_id": 0},
        "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 37},
        "roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37},
    }[arch]
    config = transformers.AutoConfig.for_model(arch, vocab_size=99, **sizes)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    model = TextClassifier(str(tmp_path), num_labels=3)
    groups = dict(model.layer_groups())
    assert list(groups) == ["embeddings", *blocks, "head"]
    assert set(head_has) <= set(groups["head"])
    assert sorted(p for ps in groups.values() for p in ps) == sorted(n for n, _ in model.named_parameters())


def test_head_is_reset_to_num_labels_and_the_body_is_loaded(tiny_bert):
    from safetensors.torch import load_file

    saved = load_file(str(Path(tiny_bert) / "model.safetensors"))
    model = TextClassifier(tiny_bert, num_labels=5)
    assert model.model.classifier.out_features == 5 and model.model.training
    assert torch.equal(
        model.model.bert.encoder.layer[1].attention.self.query.weight,
        saved["bert.encoder.layer.1.attention.self.query.weight"],
    )
    logits = model(input_ids=torch.tensor([[2, 6, 7, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert logits.shape == (1, 5) and logits.dtype == torch.float32
    with pytest.raises(UsageError, match="num_labels"):
        TextClassifier(tiny_bert, num_labels=1)


def test_missing_model_and_offline_hub_stop_with_one_line_naming_the_flag(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as err:
        TextClassifier(str(tmp_path / "nowhere"), num_labels=2)
    assert "--model.model_name" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="local directory") as err:
        TextClassifier(str(tmp_path / "empty"), num_labels=2)
    assert "\n" not in str(err.value)
    # HF_HUB_OFFLINE=1 (conftest): the hub is unreachable, as on these machines.
    with pytest.raises(UsageError, match="Hugging Face hub") as err:
        TextClassifier("peft-lightning-tests/no-such-model", num_labels=2)
    assert "--model.model_name" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--data.dataset"):
        load_source("peft-lightning-tests/no-such-dataset", cache_dir=str(tmp_path / "cache"))


def test_bert_sst2_offline_says_what_it_tried(tmp_path):
    res = run_cli(
        "fit",
        "--recipe",
        "bert_sst2",
        "--trainer.default_root_dir",
        str(tmp_path),
        env={"HF_HOME": str(tmp_path / "empty_cache")},
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # after Lightning's "Seed set"
    assert len(err) == 1 and res.stderr.strip().endswith(err[0])
    assert "google-bert/bert-base-uncased" in err[0] and "--model.model_name" in err[0]


# --- the data module ---
def test_labels_splits_and_dynamic_padding(sentiment_csv, tiny_bert, tmp_path):
    dm = datamodule(sentiment_csv, tiny_bert, tmp_path)
    dm.setup()
    assert dm.label_names == ["meh", "neg", "pos"] and dm.num_labels == 3
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 57, "validation": 15, "test": 18}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "labels",
        "index",
    }  # index: the prefix cache's key
    widths = batch["attention_mask"].sum(1)
    # Padded to the longest example of this batch, not to max_length; pads are masked out.
    assert batch["input_ids"].shape[1] == widths.max() < 32
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_carved_splits_are_disjoint_stratified_and_seeded(sentiment_csv, tiny_bert, tmp_path):
    dm = datamodule(sentiment_csv, tiny_bert, tmp_path)
    dm.setup()
    rows = {k: {tuple(ids) for ids in d["input_ids"]} for k, d in dm.splits.items()}
    assert len(rows["train"]) + len(rows["validation"]) + len(rows["test"]) == 90  # every text once
    assert not rows["train"] & rows["validation"] and not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]
    assert sorted(dm.splits["test"]["labels"]).count(0) == 6  # 20% of each class of 30
    again = datamodule(sentiment_csv, tiny_bert, tmp_path)
    again.setup()
    assert {tuple(ids) for ids in again.splits["validation"]["input_ids"]} == rows["validation"]


def test_tokenization_is_cached_on_disk_and_keyed_by_its_settings(sentiment_csv, tiny_bert, tmp_path, monkeypatch):
    calls = []
    original = text_data.encode

    def counting(batch, **kw):
        calls.append(len(batch["text"]))
        return original(batch, **kw)

    monkeypatch.setattr(text_data, "encode", counting)
    first = datamodule(sentiment_csv, tiny_bert, tmp_path)
    first.setup()
    assert sum(calls) == 90
    files = {f["filename"] for d in first.splits.values() for f in d.cache_files}
    assert all(Path(f).is_file() and str(tmp_path) in f for f in files)

    calls.clear()
    second = datamodule(sentiment_csv, tiny_bert, tmp_path)  # a new run: new objects, same settings
    second.setup()
    assert calls == []  # nothing tokenized: the Arrow files of the first run were loaded
    assert {f["filename"] for d in second.splits.values() for f in d.cache_files} == files
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]

    third = datamodule(sentiment_csv, tiny_bert, tmp_path, max_length=8)
    third.setup()
    assert sum(calls) == 90 and max(third.lengths["train"]) == 8  # another setting, another cache entry


def test_length_grouped_batches_pad_less(sentiment_csv, tiny_bert, tmp_path):
    def padded_tokens(dm) -> int:
        torch.manual_seed(0)
        return sum(b["attention_mask"].numel() for b in dm.train_dataloader())

    plain = datamodule(sentiment_csv, tiny_bert, tmp_path, batch_size=4)
    grouped = datamodule(sentiment_csv, tiny_bert, tmp_path, batch_size=4, group_by_length=True)
    plain.setup()
    grouped.setup()
    lengths = sorted(grouped.lengths["train"], reverse=True)
    assert sorted(plain.lengths["train"], reverse=True) == lengths
    least = sum(max(chunk) * len(chunk) for chunk in (lengths[i : i + 4] for i in range(0, len(lengths), 4)))
    # Same seed, same examples: sorting within shuffled chunks of batches pads less than a plain shuffle.
    assert least <= padded_tokens(grouped) < padded_tokens(plain)
    val = list(grouped.val_dataloader())
    assert [b["input_ids"].shape[1] for b in val] == sorted(b["input_ids"].shape[1] for b in val)


def test_pair_columns_are_detected_and_encoded_as_a_pair(tiny_bert, tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2", "label"])
        for i in range(40):
            w.writerow([f"{spell(i)} the movie", "a good film" if i % 2 else "not a film", i % 2])
    dm = datamodule(path, tiny_bert, tmp_path)
    dm.setup()
    assert dm.label_names == ["0", "1"]
    ids = dm.splits["train"][0]["input_ids"]
    types = dm.splits["train"][0]["token_type_ids"]
    assert ids.count(3) == 2 and 1 in types  # [CLS] a [SEP] b [SEP], second segment typed 1
    assert types.index(1) == ids.index(3) + 1


def test_label_errors_name_the_fix(tiny_bert, tmp_path):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for split, labels in (("train", ["pos", "neg"] * 10), ("test", ["pos", "neutral"] * 3)):
        with open(split_dir / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([f"{spell(i)} movie", lab] for i, lab in enumerate(labels))
    with pytest.raises(UsageError, match="label_names"):
        datamodule(split_dir, tiny_bert, tmp_path).setup()
    with pytest.raises(UsageError, match="--data.text_column"):
        datamodule(split_dir, tiny_bert, tmp_path, text_column="review").setup()
    with pytest.raises(UsageError, match="does not exist"):
        datamodule(tmp_path / "missing.csv", tiny_bert, tmp_path).setup()


def test_a_relative_parquet_file_and_a_save_to_disk_folder(sentiment_csv, tiny_bert, tmp_path, monkeypatch):
    import datasets

    table = datasets.load_dataset(
        "csv", data_files=str(sentiment_csv), split="train", cache_dir=str(tmp_path / "cache")
    )
    table.to_parquet(str(tmp_path / "reviews.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    for name in ("reviews.parquet", "./reviews.parquet", "saved"):
        dm = datamodule(name, tiny_bert, tmp_path)
        dm.setup()
        assert dm.label_names == ["meh", "neg", "pos"], name
        assert {k: len(v) for k, v in dm.splits.items()} == {"train": 57, "validation": 15, "test": 18}, name


def test_a_column_without_text_names_the_columns_and_the_text_column_needed(tiny_bert, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"tokens": [[1, 2, 3]] * 6, "label": [0, 1] * 3}).to_parquet(
        str(tmp_path / "ids.parquet")
    )
    for column in (None, "tokens"):
        with pytest.raises(UsageError) as err:
            datamodule(tmp_path / "ids.parquet", tiny_bert, tmp_path, text_column=column).setup()
        assert "columns: tokens (list of int64), label (int64); a text column holds strings" in str(err.value)
        assert str(err.value).endswith("pass --data.text_column NAME")


# --- training ---
def test_one_training_step_changes_weights_and_logs_metrics(sentiment_csv, tiny_bert, tmp_path):
    model = TextClassifier(tiny_bert, num_labels=3, lr=1e-2)
    dm = datamodule(sentiment_csv, tiny_bert, tmp_path)
    before = model.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    trainer = fit(model, dm, limit_train_batches=1)
    assert not torch.equal(before, model.model.bert.encoder.layer[0].attention.self.query.weight)
    assert {"val/acc", "val/f1", "val/mcc", "val/loss", "train/loss"} <= set(trainer.callback_metrics)
    assert model.model.config.id2label == {0: "meh", 1: "neg", 2: "pos"}


def test_tokenizer_comes_from_the_attached_model(sentiment_csv, tiny_bert, tmp_path):
    dm = datamodule(sentiment_csv, tiny_bert, tmp_path, tokenizer=None)
    fit(TextClassifier(tiny_bert, num_labels=3), dm, limit_train_batches=1, limit_val_batches=0)
    assert dm.tokenizer.name_or_path == tiny_bert
    with pytest.raises(UsageError, match="--data.tokenizer"):
        datamodule(sentiment_csv, tiny_bert, tmp_path, tokenizer=None).setup()


def test_head_strategy_trains_only_the_head(sentiment_csv, tiny_bert, tmp_path):
    model = TextClassifier(tiny_bert, num_labels=3, lr=1e-2)
    before = {
        g: [p.detach().clone() for n, p in model.named_parameters() if n in names] for g, names in model.layer_groups()
    }
    fit(model, datamodule(sentiment_csv, tiny_bert, tmp_path), callbacks=[FineTuning("head")])
    params = dict(model.named_parameters())
    changed = [
        g for g, names in model.layer_groups() if any(not torch.equal(b, params[n]) for b, n in zip(before[g], names))
    ]
    assert changed == ["head"]


def test_multi_label_from_a_separated_column(sentiment_csv, tiny_bert, tmp_path):
    dm = datamodule(sentiment_csv, tiny_bert, tmp_path, label_column="tags", multi_label=True)
    dm.setup()
    assert dm.label_names == ["x", "y", "z"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (8, 3) and batch["labels"].dtype == torch.float32
    assert set(batch["labels"].unique().tolist()) <= {0.0, 1.0}
    model = TextClassifier(tiny_bert, num_labels=3, problem_type="multi_label_classification", lr=1e-2)
    trainer = fit(model, dm)
    assert {"val/acc", "val/f1", "val/mcc", "val/exact_match"} <= set(trainer.callback_metrics)
    preds = model.predict_step(batch, 0)
    assert preds["pred"].shape == (8, 3) and ((preds["probs"] > 0) & (preds["probs"] < 1)).all()
    with pytest.raises(UsageError, match="multi_label_classification"):
        fit(
            TextClassifier(tiny_bert, num_labels=3),
            datamodule(sentiment_csv, tiny_bert, tmp_path, label_column="tags", multi_label=True),
        )


@pytest.mark.parametrize(
    ("columns", "named", "found"),
    [
        ({"sentence1": "a", "sentence2": "b", "label": 0}, (None, None), ("sentence1", "sentence2")),  # a usual pair
        ({"title": "a", "review": "b", "label": 0}, (None, None), ("review", None)),  # a usual name before the first
        ({"id": 1, "body": "a", "label": 0}, (None, None), ("body", None)),  # else the first column of strings
        ({"sentence1": "a", "sentence2": "b"}, ("sentence2", None), ("sentence2", None)),  # a named one wins
    ],
)
def test_text_columns_are_the_named_then_a_usual_pair_then_a_usual_name_then_the_first_strings(columns, named, found):
    import datasets

    features = datasets.Dataset.from_dict({k: [v] for k, v in columns.items()}).features
    assert text_columns(features, *named) == found


def test_multi_hot_labels_from_joined_names_and_from_zero_one_columns():
    import datasets

    names = datasets.Dataset.from_dict({"tags": ["b,a", "", "c"]})
    encode, labels = multi_hot_encoder(names, ["tags"], None, ",")
    assert labels == ["a", "b", "c"]
    assert encode({"tags": ["a, c", None]}) == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(UsageError, match="unknown label 'd'.*--data.label_names"):
        encode({"tags": ["d"]})
    columns = datasets.Dataset.from_dict({"x": [1, 0], "y": [0, 1]})
    encode, labels = multi_hot_encoder(columns, ["x", "y"], None, ",")
    assert labels == ["x", "y"] and encode({"x": [1, 0], "y": [1, 1]}) == [[1.0, 1.0], [0.0, 1.0]]


def test_num_labels_mismatch_is_reported(sentiment_csv, tiny_bert, tmp_path):
    with pytest.raises(UsageError, match="--model.num_labels 3"):
        fit(TextClassifier(tiny_bert, num_labels=2), datamodule(sentiment_csv, tiny_bert, tmp_path))


# --- the Austen recipe ---
def test_passages_drop_headings_and_never_share_a_line():
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", ""] + [f"line {i}" if i % 4 else "" for i in range(1, 60)]
    passages = make_passages(lines, passage_lines=3)
    body = [f"line {i}" for i in range(1, 60) if i % 4]
    assert passages[0] == "line 1 line 2 line 3" and len(passages) == len(body) // 3
    used = [line for p in passages for line in p.replace(" line", "|line").split("|")]
    assert used == body[: len(used)] and len(set(used)) == len(used)  # in order, each line once


def test_splits_are_whole_contiguous_blocks():
    where = split_blocks(1000, block=10, fractions=(0.1, 0.1), seed=3)
    assert {s: where.count(s) for s in set(where)} == {"train": 800, "validation": 100, "test": 100}
    for start in range(0, 1000, 10):
        assert len(set(where[start : start + 10])) == 1
    assert where != split_blocks(1000, block=10, fractions=(0.1, 0.1), seed=4)


@pytest.mark.skipif(not MinilmAusten.availability()[0], reason="offline assets missing: run scripts/setup.sh")
def test_austen_novels_make_a_six_class_task_with_disjoint_splits(tmp_path):
    from recipes.minilm_austen import AustenNovels

    dm = AustenNovels(dataset=MinilmAusten.data_defaults["dataset"], cache_dir=str(tmp_path))
    ds = dm.load_splits()
    assert ds["train"].features["label"].names[3] == "Emma"
    sizes = {k: len(v) for k, v in ds.items()}
    assert 9_000 < sizes["train"] < 11_000 and 1_000 < sizes["test"] < 1_500
    texts = {k: set(v["text"]) for k, v in ds.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not any("CHAPTER" in t or "Chapter 1" in t for t in texts["test"])
    assert sorted(set(ds["test"]["label"])) == list(range(6))


@pytest.mark.slow
def test_bert_sst2_runs_on_local_copies(tiny_bert, tmp_path):
    """The recipe's split plan on an SST-2-shaped local copy: GLUE's dev set is the test split, val is carved."""
    data = tmp_path / "sst2"
    data.mkdir()
    rng = random.Random(1)
    for split, n in (("train", 100), ("validation", 20)):
        with open(data / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["idx", "sentence", "label"])
            for i in range(n):
                word = rng.choice(CLASS_WORDS["pos" if i % 2 else "neg"])
                w.writerow([i, f"{spell(i)} the movie was {word}", i % 2])
    res = run_cli(
        "fit",
        "--recipe",
        "bert_sst2",
        "--model.model_name",
        tiny_bert,
        "--data.dataset",
        str(data),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "8",
        "--trainer.precision",
        "32-true",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bert_sst2: test/acc" in res.stdout
    hparams = next((tmp_path / "run").rglob("config.yaml")).read_text()
    assert "test_split: validation" in hparams and "val_split: heldout" in hparams


@pytest.mark.slow
@pytest.mark.skipif(not MinilmAusten.availability()[0], reason="offline assets missing: run scripts/setup.sh")
def test_minilm_austen_small_budget(tmp_path):
    res = run_cli(
        "fit",
        "--recipe",
        "minilm_austen",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--data.max_train_samples",
        "64",
        "--data.max_val_samples",
        "64",
        "--data.max_test_samples",
        "64",
        "--data.cache_dir",
        str(tmp_path / "cache"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = [line for line in res.stdout.splitlines() if line.startswith("minilm_austen: test/acc")]
    assert summary, res.stdout[-2000:]
    assert "test/f1" in summary[0] and "test/mcc" in summary[0]
    assert any(p.name.startswith("best-") for p in tmp_path.rglob("*.ckpt"))
