"""Token classification on a 2-layer BERT built here (no download) and tiny CoNLL files: the metrics against
seqeval, the CoNLL reader, sub-word alignment, training, LoRA (TOKEN_CLS), the prefix cache, export with its card,
ONNX, predict, bad input, resume after SIGKILL; the punctuation recipe's tags."""

from __future__ import annotations

import random
import signal
import string
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import Trainer

from peft_lightning.adapters import AdapterConfig
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.data.conll import load_conll, read_conll
from peft_lightning.data.token import TokenDataModule, align_labels, continuation_tags
from peft_lightning.errors import UsageError
from peft_lightning.model_files.export import export
from peft_lightning.tasks.token import TagMetrics, TokenClassifier, marks_spans
from recipes.minilm_punctuation import MinilmPunctuation, tag_words

from helpers import forked_cli, run_card_snippets, save_tiny_bert

FILLER = ["the", "a", "went", "to", "and", "saw", "in", "met", "city", "today"]
PEOPLE = ["alice", "bob", "zed"]  # zed is spelled out in pieces: z ##e ##d
PLACES = ["paris", "rome"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    """Filler words, a person (one or two words) and a place (``new york`` is two), tagged IOB2."""
    words = [(rng.choice(FILLER), "O") for _ in range(rng.randint(1, 5))]
    person = [(rng.choice(PEOPLE), "B-PER")] + ([(rng.choice(PEOPLE), "I-PER")] if rng.random() < 0.3 else [])
    place = [("new", "B-LOC"), ("york", "I-LOC")] if rng.random() < 0.3 else [(rng.choice(PLACES), "B-LOC")]
    words[rng.randrange(len(words) + 1) : 0] = person
    return [*words, ("went", "O"), ("to", "O"), *place]


def write_conll(path: Path, n: int, seed: int, docstart: bool = True) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for _ in range(n):
        lines += [f"{w} NN I-NP {t}" for w, t in sentence(rng)] + [""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, "alice", "bob", *PLACES, "new", "york"]
    vocab += [*string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase)]
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), vocab))


@pytest.fixture(scope="module")
def conll(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("conll")
    for split, n, seed in (("train", 48, 0), ("dev", 12, 1), ("test", 12, 2)):
        write_conll(folder / f"{split}.conll", n, seed)
    return folder


def datamodule(source, tiny_bert, **kw) -> TokenDataModule:
    return TokenDataModule(str(source), **{"tokenizer": tiny_bert, "batch_size": 8, "num_workers": 0, **kw})


def fit(model, dm, callbacks=(), **kw) -> Trainer:
    trainer = Trainer(
        **{
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": list(callbacks),
            **kw,
        }
    )
    dm.connect(**model.data_needs())
    trainer.fit(model, dm)
    return trainer


# --- metrics ---
@pytest.mark.parametrize(
    "names, scheme, mode",
    [
        (TAGS, "auto", None),
        (["O", *(f"{p}-{t}" for t in ("PER", "LOC") for p in "BIES")], "auto", None),
        (TAGS, "IOB2", "IOB2"),
        (["O", *(f"{p}-{t}" for t in ("PER", "LOC") for p in "BIES")], "IOBES", "IOBES"),
    ],
)
def test_entity_scores_are_seqevals(names, scheme, mode):
    seqeval = pytest.importorskip("seqeval.metrics")
    kw = {} if mode is None else {"mode": "strict", "scheme": getattr(pytest.importorskip("seqeval.scheme"), mode)}
    rng = random.Random(0)
    for _ in range(20):  # random sequences: broken spans, lone I-/E-, type changes, empty predictions ...
        gold = [[rng.randrange(len(names)) for _ in range(rng.randint(1, 10))] for _ in range(12)]
        pred = [[g if rng.random() < 0.6 else rng.randrange(len(names)) for g in row] for row in gold]
        labels = torch.full((12, 10), -100)
        preds = torch.zeros((12, 10), dtype=torch.long)
        for i, (g, p) in enumerate(zip(gold, pred)):
            labels[i, : len(g)], preds[i, : len(p)] = torch.tensor(g), torch.tensor(p)
        metric = TagMetrics(names, scheme)
        metric.update(preds[:5], labels[:5])
        metric.update(preds[5:], labels[5:])
        got = metric.compute()
        y_true, y_pred = [[names[t] for t in r] for r in gold], [[names[t] for t in r] for r in pred]
        for key, fn in (("precision", "precision_score"), ("recall", "recall_score"), ("f1", "f1_score")):
            assert float(got[key]) == pytest.approx(getattr(seqeval, fn)(y_true, y_pred, **kw), abs=1e-6), key


def test_plain_tags_score_accuracy_and_macro_f1_over_labelled_positions():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    names = ["O", "COMMA", "PERIOD", "Cap"]
    assert not marks_spans(names) and marks_spans(TAGS)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 9), generator=g)
    labels[:, -3:] = -100
    preds = torch.where(torch.rand(6, 9, generator=g) < 0.5, labels.clamp(min=0), torch.randint(0, 4, (6, 9)))
    got = TagMetrics(names, "none", per_class=True)
    got.update(preds, labels)
    out = got.compute()
    assert float(out["acc"]) == pytest.approx(
        float(MulticlassAccuracy(4, average="micro", ignore_index=-100)(preds, labels))
    )
    assert float(out["f1"]) == pytest.approx(float(MulticlassF1Score(4, ignore_index=-100)(preds, labels)))
    per = MulticlassF1Score(4, average=None, ignore_index=-100)(preds, labels)
    assert [float(out[f"f1_{n}"]) for n in names] == pytest.approx(per.tolist())


# --- the data ---
def test_conll_and_conllu_files_are_read_with_their_tags(tmp_path):
    plain = tmp_path / "a.conll"
    plain.write_text("-DOCSTART- O\n\nEU B-ORG\nrejects O\n\n\nPeter B-PER\n")
    assert read_conll(plain) == ([["EU", "rejects"], ["Peter"]], [["B-ORG", "O"], ["B-PER"]])
    ud = tmp_path / "b.conllu"
    ud.write_text(
        "# text = Don't go\n1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_\n1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_\n"
        "2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_\n3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_\n"
    )
    assert read_conll(ud) == ([["Do", "n't", "go"]], [["AUX", "PART", "VERB"]])
    assert read_conll(ud, tag_column=4)[1] == [["VBP", "RB", "VB"]]
    (tmp_path / "empty.conll").write_text("\n\n")
    with pytest.raises(UsageError, match="holds no sentence"):
        read_conll(tmp_path / "empty.conll")
    (tmp_path / "notag.conll").write_text("EU B-ORG\nrejects\n")
    with pytest.raises(UsageError, match="notag.conll:2.*--data.conll_tag_column"):
        read_conll(tmp_path / "notag.conll")
    (tmp_path / "split").mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (tmp_path / "split" / name).write_text("x O\n")
    assert list(load_conll(tmp_path / "split")) == ["test", "train", "validation"]


def test_word_tags_are_aligned_to_the_first_sub_word(conll, tiny_bert):
    assert align_labels([None, 0, 1, 1, None], [3, 1]) == [-100, 3, 1, -100, -100]
    assert continuation_tags(TAGS) == [0, 2, 2, 4, 4]
    dm = datamodule(conll, tiny_bert)
    dm.setup()
    assert dm.label_names == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]  # O first, then sorted
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 48, "validation": 12, "test": 12}
    tokenizer = dm.tokenizer
    rows = load_conll(conll)["train"]
    for row, encoded in zip(rows, dm.splits["train"]):
        words = tokenizer(row["tokens"], is_split_into_words=True)
        firsts = [i for i, w in enumerate(words.word_ids()) if w is not None and w != words.word_ids()[i - 1]]
        assert [i for i, label in enumerate(encoded["labels"]) if label != -100] == firsts
        assert [dm.label_names[encoded["labels"][i]] for i in firsts] == row["tags"]
    assert len(tokenizer.tokenize("zed")) == 3  # a word of three pieces is in the data
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    every = datamodule(conll, tiny_bert, label_all_subwords=True)
    every.setup()
    zed = next(i for i, r in enumerate(rows) if "zed" in r["tokens"])
    labels = [every.label_names[t] for t in every.splits["train"][zed]["labels"] if t != -100]
    assert len(labels) > len(rows[zed]["tags"]) and "I-PER" in labels  # B-PER's later pieces are I-PER
    assert every.splits["test"]["labels"] == dm.splits["test"]["labels"]  # scored per word either way


def test_string_classlabel_and_id_tags_from_datasets(tmp_path, tiny_bert):
    import datasets

    tokens = [["alice", "went", "to", "rome"], ["bob", "met", "zed"]] * 10
    tags = [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O", "B-PER"]] * 10
    datasets.Dataset.from_dict({"words": tokens, "tags": tags}).to_parquet(str(tmp_path / "s.parquet"))
    feature = datasets.List(datasets.ClassLabel(names=["O", "B-PER", "B-LOC"]))
    labelled = datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags})
    labelled.cast_column("ner_tags", feature).save_to_disk(str(tmp_path / "cl"))
    ids = [[{"O": 0, "B-PER": 1, "B-LOC": 2}[t] for t in row] for row in tags]
    datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": ids}).to_parquet(str(tmp_path / "ids.parquet"))
    kw = {"val_fraction": 0.2}
    for source, extra, names in (
        ("s.parquet", {}, ["O", "B-LOC", "B-PER"]),
        ("cl", {}, ["O", "B-PER", "B-LOC"]),
        ("cl", {"label_names": ["O", "B-LOC", "B-PER", "I-PER"]}, ["O", "B-LOC", "B-PER", "I-PER"]),
        ("ids.parquet", {"label_names": ["O", "B-PER", "B-LOC"]}, ["O", "B-PER", "B-LOC"]),
    ):
        dm = datamodule(tmp_path / source, tiny_bert, **kw, **extra)
        dm.setup()
        assert dm.label_names == names, source
        first = dm.splits["train"][0]
        assert [names[t] for t in first["labels"] if t != -100] in tags, source
    with pytest.raises(UsageError, match="holds tag ids: name them.*--data.label_names"):
        datamodule(tmp_path / "ids.parquet", tiny_bert, **kw).setup()


# --- bad input, through the CLI: one line, exit 2 ---
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    import datasets

    base = tmp_path_factory.mktemp("bad_tokens")
    good = write_conll(base / "good.conll", 20, 0, docstart=False).read_text()
    (base / "empty.conll").write_text("")
    (base / "unknown.conll").write_text(good.replace("B-LOC", "B-GPE", 1))
    rows = {"tokens": [["alice", "went"]] * 10, "tags": [["B-PER", "O"]] * 9 + [["B-PER"]]}
    datasets.Dataset.from_dict(rows).to_parquet(str(base / "lengths.parquet"))
    datasets.Dataset.from_dict({"text": ["alice went"] * 10, "tags": rows["tags"]}).to_parquet(str(base / "nt.parquet"))
    datasets.Dataset.from_dict({"tokens": rows["tokens"], "x": [1] * 10}).to_parquet(str(base / "ntag.parquet"))
    return base


@pytest.mark.parametrize(
    "file, message",
    [
        ("unknown.conll", "tag 'B-GPE' is not in the tag set"),
        ("lengths.parquet", "sentence 9: 2 words but 1 tags"),
        ("empty.conll", "holds no sentence"),
        ("nt.parquet", "no tokens column.*--data.tokens_column"),
        ("ntag.parquet", "no tags column.*--data.tags_column"),
    ],
)
def test_bad_token_data_stops_with_one_line(bad_data, tiny_bert, cli, file, message):
    import re

    labels = ["--data.label_names", '["O","B-PER","I-PER","B-LOC","I-LOC"]'] if file == "unknown.conll" else []
    code, _, err = cli(
        "fit",
        "--recipe",
        "bert_conll2003",
        "--model.model_name",
        tiny_bert,
        "--data.dataset",
        str(bad_data / file),
        "--data.val_fraction",
        "0.2",
        *labels,
        "--trainer.default_root_dir",
        str(bad_data / "runs"),
    )
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(message, lines[0]), lines[0]


# --- training ---
def test_training_moves_the_weights_and_logs_entity_scores(conll, tiny_bert):
    model = TokenClassifier(tiny_bert, num_labels=5, lr=1e-2)
    assert [n for n, _ in model.layer_groups()] == ["embeddings", "layer.0", "layer.1", "head"]
    assert "model.classifier.weight" in dict(model.layer_groups())["head"]
    before = model.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    trainer = fit(model, datamodule(conll, tiny_bert), limit_train_batches=2)
    assert not torch.equal(before, model.model.bert.encoder.layer[0].attention.self.query.weight)
    assert {"val/acc", "val/precision", "val/recall", "val/f1", "train/loss"} <= set(trainer.callback_metrics)
    assert model.model.config.id2label[2] == "B-PER"
    with pytest.raises(UsageError, match="--model.num_labels 5"):
        fit(TokenClassifier(tiny_bert, num_labels=4), datamodule(conll, tiny_bert))
    with pytest.raises(UsageError, match="span_scheme IOB2 has no E-/S- tags"):
        model = TokenClassifier(tiny_bert, num_labels=5, span_scheme="IOB2")
        model.class_names = ["O", "B-X", "I-X", "E-X", "S-X"]
        model._build_metrics()


def test_a_cached_frozen_prefix_trains_as_the_uncached_run(conll, tiny_bert):
    from lightning.pytorch import seed_everything

    from peft_lightning.callbacks.strategies import FreezeUnfreeze

    def run(cache: bool) -> tuple[TokenClassifier, FineTuning]:
        seed_everything(0)
        model = TokenClassifier(tiny_bert, num_labels=5, lr=1e-2)
        ft = FineTuning(FreezeUnfreeze(at_epoch=0, groups=2), cache_features=cache)  # layer.1 and the head
        fit(model, datamodule(conll, tiny_bert), callbacks=[ft], max_epochs=2, limit_val_batches=0, deterministic=True)
        return model, ft

    (plain, _), (cached, ft) = run(False), run(True)
    assert "input of layer.1: 48/48 examples" in ft.cache_summary()[0] and "50%" in ft.cache_summary()[0]
    for (name, a), b in zip(plain.named_parameters(), cached.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_lora_export_card_loads_the_token_model_and_onnx_has_a_sequence_axis(conll, tiny_bert, tmp_path):
    model = TokenClassifier(tiny_bert, num_labels=5, peft=AdapterConfig("lora", r=4)).eval()
    model.class_names = TAGS
    with torch.no_grad():  # LoRA starts as the identity: move it so that merging has something to merge
        for name, p in model.named_parameters():
            if name in model.trainable_parameter_names():
                p.add_(0.05 * torch.randn_like(p))
    written = export(model, tmp_path, merge=True)
    assert {p.name for p in written} >= {"adapter_config.json", "merged", "README.md"}
    assert '"task_type": "TOKEN_CLS"' in (tmp_path / "adapter_config.json").read_text()
    snippets = run_card_snippets(tmp_path / "README.md")  # the base with its tags, the adapters, the merged model
    merged = snippets["merged"].eval()
    assert type(merged).__name__ == "BertForTokenClassification" and snippets["base"].config.id2label[1] == "B-PER"
    encoded = snippets["tokenizer"](["alice went to new york", "bob"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded)
        assert expected.shape == (2, encoded["input_ids"].shape[1], 5)  # a row of logits per sub-word
        assert torch.allclose(merged(**encoded).logits, expected, atol=1e-5)
    # export --onnx (tests/test_export_onnx.py runs it for text) names the logits' sequence axis dynamic.
    assert model.onnx_spec(model.model, {}).output_axes == {0: "batch", 1: "sequence"}


# --- the hub recipe offline, through the CLI: fit, predict, export, resume ---
def cli_args(conll: Path, tiny_bert: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--recipe",
        "bert_conll2003",
        "--model.model_name",
        tiny_bert,
        "--model.lr",
        "5e-3",
        "--data.dataset",
        str(conll),
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--trainer.precision",
        "32-true",
        "--trainer.max_epochs",
        "2",
        "--trainer.deterministic",
        "true",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(conll, tiny_bert, tmp_path_factory) -> Path:
    """The hub recipe fitted with LoRA on the CoNLL folder, in this process (``python -m peft_lightning fit``)."""
    import contextlib
    import io

    from peft_lightning.cli import main

    root, out = tmp_path_factory.mktemp("fitted"), io.StringIO()
    with contextlib.redirect_stdout(out):
        main(cli_args(conll, tiny_bert, root, "--peft.method", "lora", "--peft.r", "4"))  # SystemExit on failure
    line = next(line for line in out.getvalue().splitlines() if line.startswith("bert_conll2003: test/"))
    assert all(f"{m} " in line for m in ("test/acc", "test/precision", "test/recall", "test/f1", "test/f1_PER")), line
    return next(root.rglob("best-*.ckpt"))


def test_recipes_show_in_list_and_print_config(cli):
    code, out, _ = cli("list")
    assert code == 0 and "bert_conll2003" in out and "minilm_punctuation" in out
    code, out, _ = cli("fit", "--recipe", "bert_conll2003", "--print_config")
    assert code == 0 and "span_scheme: auto" in out and "- B-PER" in out and "lr: 5.0e-05" in out
    code, out, _ = cli("fit", "--recipe", "minilm_punctuation", "--help")
    assert code == 0 and "--data.words_per_example" in out and "--model.span_scheme" in out


def test_predict_writes_each_words_tag_and_probability(fitted, conll, cli, tmp_path):
    code, out, err = cli("predict", "--recipe", "bert_conll2003", "--ckpt_path", str(fitted), "--data.predict_data",
                         str(conll / "test.conll"), "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert code == 0, err[-2000:]
    rows = pq.read_table(next(tmp_path.rglob("predictions.parquet"))).to_pylist()
    assert len(rows) == 12 and [r["id"] for r in rows] == [str(i) for i in range(12)]
    for row in rows:
        assert len(row["words"]) == len(row["tags"]) == len(row["probabilities"]) == len(row["labels"])
        assert set(row["tags"]) <= set(TAGS) and all(0 < p <= 1 for p in row["probabilities"])
    assert rows[0]["words"][0] in FILLER + PEOPLE + ["new"]


def test_export_card_loads_the_adapters_on_the_token_classification_model(fitted, cli, tmp_path):
    code, _, err = cli("export", "--recipe", "bert_conll2003", "--ckpt_path", str(fitted), "--out", str(tmp_path))
    assert code == 0, err[-2000:]
    snippets = run_card_snippets(tmp_path / "README.md")
    model = next(v for k, v in snippets.items() if type(v).__name__ == "PeftModelForTokenClassification")
    assert model.config.id2label[1] == "B-PER"  # the recipe's tag set, in CoNLL-2003's order


@pytest.mark.slow
def test_a_sigkill_mid_run_resumes_to_the_uninterrupted_weights(conll, tiny_bert, tmp_path):
    from peft_lightning.model_files.checkpoints import find_last, read_checkpoint

    args = lambda root, *extra: cli_args(  # noqa: E731
        conll, tiny_bert, root, "--test_after_fit", "false", "--checkpoint.last_every_n_train_steps", "1", *extra
    )
    assert forked_cli(args(tmp_path / "reference")).returncode == 0
    kill = ["--trainer.callbacks+=reliability_callbacks.KillAt", "--trainer.callbacks.step", "8"]
    res = forked_cli(args(tmp_path / "run", *kill, "--trainer.callbacks.signum", str(int(signal.SIGKILL))))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = forked_cli(args(tmp_path / "run", "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = (read_checkpoint(find_last(tmp_path / r)) for r in ("reference", "run"))
    assert a["global_step"] == b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor, b["state_dict"][name], atol=1e-6), name


# --- the punctuation recipe ---
def test_punctuation_tags_are_read_off_the_printed_text():
    words, tags = tag_words('"Poor Miss Taylor!--I wish she were here again. What a pity; how sad--"')
    assert words[:4] == ["poor", "miss", "taylor", "i"] and words[-1] == "sad"
    assert tags == [
        "Cap",
        "Cap",
        "Cap_EXCLAIM",
        "Cap",
        "O",
        "O",
        "O",
        "O",
        "PERIOD",
        "Cap",
        "O",
        "SEMICOLON",
        "O",
        "DASH",
    ]
    assert tag_words("don't well-bred Mr. Weston, ok?") == (
        ["don't", "well-bred", "mr", "weston", "ok"],
        ["O", "O", "Cap_PERIOD", "Cap_COMMA", "QUESTION"],
    )


@pytest.mark.slow
@pytest.mark.skipif(not MinilmPunctuation.availability()[0], reason="offline assets missing: run scripts/setup.sh")
def test_minilm_punctuation_small_budget(tmp_path):
    res = forked_cli(
        [
            "fit",
            "--recipe",
            "minilm_punctuation",
            "--data.max_train_samples",
            "32",
            "--data.max_val_samples",
            "32",
            "--data.max_test_samples",
            "32",
            "--data.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("minilm_punctuation: test/acc"))
    assert "test/f1 " in line and "test/f1_Cap_PERIOD" in line
