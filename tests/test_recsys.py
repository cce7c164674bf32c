"""The recommendation domain: MovieLens loading and split protocols, negative sampling, ranking metrics, the MF and
two-tower models, layer groups with the FineTuning callback, init_from, pretrain -> fine-tune, and the CLI."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from peft_lightning.assets import recbole_ml100k_dir
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import Head
from peft_lightning.data import movielens_files
from peft_lightning.data.interaction_batches import sample_negatives
from peft_lightning.data.movielens import MovieLensDataModule
from peft_lightning.data.movielens_files import load_movielens
from peft_lightning.errors import UsageError
from peft_lightning.tasks.recsys import Recommender

from conftest import run_cli

HAVE_ML100K = recbole_ml100k_dir() is not None
needs_ml100k = pytest.mark.skipif(not HAVE_ML100K, reason="ml-100k missing: run scripts/setup.sh")


# --------------------------------------------------------------------------- fixtures
def write_ml100k_format(
    folder: Path, users: int = 30, items: int = 40, per_user: tuple[int, int] = (8, 20), seed: int = 0
) -> Path:
    """Synthetic interactions in the GroupLens ml-100k format (u.data, u.item): users prefer one of four item
    clusters, so a model can learn something; timestamps spread over 100 days."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(1, users + 1):
        cluster = u % 4
        pool = [i for i in range(1, items + 1) if i % 4 == cluster]
        others = [i for i in range(1, items + 1) if i % 4 != cluster]
        n = int(rng.integers(*per_user))
        chosen = list(rng.choice(pool, size=min(n - 2, len(pool)), replace=False)) + list(rng.choice(others, 2))
        for i in dict.fromkeys(chosen):
            rows.append(f"{u}\t{i}\t{int(rng.integers(1, 6))}\t{880000000 + int(rng.integers(0, 100 * 86400))}")
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    genres = ["0"] * 19
    lines = []
    for i in range(1, items + 1):
        g = list(genres)
        g[1 + i % 4] = "1"
        lines.append(f"{i}|Movie {i} ({1990 + i % 8})|01-Jan-{1990 + i % 8}||http://x|" + "|".join(g))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return folder


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_ml100k_format(tmp_path_factory.mktemp("ml-synth"))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's real tokenizer: the two-tower code path at test speed."""
    import transformers

    from peft_lightning.tasks.item_text_tower import default_text_encoder

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(default_text_encoder())
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def dm_for(folder: Path | str, **kw) -> MovieLensDataModule:
    dm = MovieLensDataModule(str(folder), **{"val_fraction": 0.2, **kw})
    dm.setup()
    return dm


def user_sets(dm: MovieLensDataModule, part: int) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    mask = dm.part == part
    for u, i in zip(dm.data.user[mask], dm.data.item[mask]):
        out.setdefault(int(u), set()).add(int(i))
    return out


def fit(model, dm, epochs=1, callbacks=(), **kw) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(model, dm)
    return trainer


# --------------------------------------------------------------------------- loading
def test_grouplens_100k_format_is_read_with_item_texts(synth):
    data = load_movielens(str(synth))
    assert data.num_users == 30 and data.num_items == 40
    assert data.item_text[0] == "Movie 1 (1991). Genres: Adventure"
    assert data.user.max() == 29 and data.item.max() == 39 and len(data.user) == len(data.timestamp)


def test_grouplens_1m_format(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (tmp_path / "movies.dat").write_text(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Heat (1995)::Action|Crime|Thriller\n",
        encoding="latin-1",
    )
    data = load_movielens(str(tmp_path))
    assert (data.num_users, data.num_items, len(data.user)) == (2, 2, 3)
    assert data.item_text == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Heat (1995). Genres: Action, Crime, Thriller",
    ]


@needs_ml100k
def test_ml100k_offline_from_the_recbole_wheel():
    data = load_movielens("ml-100k", cache_dir="/nonexistent-cache")
    assert (data.num_users, data.num_items, len(data.user)) == (943, 1682, 100_000)
    assert data.source.startswith("recbole:")
    assert data.item_text[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_bad_sources_stop_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="unknown dataset name"):
        load_movielens("ml-5k")
    with pytest.raises(UsageError, match="'/no/such/folder' does not exist"):
        load_movielens("/no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no MovieLens files"):
        load_movielens(str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(movielens_files.urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"cannot download ml-1m from https://files.grouplens.org.*offline") as err:
        load_movielens("ml-1m", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


def test_download_unpacks_the_grouplens_zip_once(tmp_path, monkeypatch, synth):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in synth.iterdir():
            zf.write(f, f"ml-100k/{f.name}")
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(buf.getvalue())

    monkeypatch.setattr(movielens_files.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(movielens_files, "recbole_ml100k_dir", lambda: None)  # as on a machine without recbole
    for _ in range(2):
        data = load_movielens("ml-100k", cache_dir=str(tmp_path))
        assert data.num_users == 30
    assert calls == [movielens_files.GROUPLENS_URLS["ml-100k"]]  # the second load reads the cache


# --------------------------------------------------------------------------- split protocols
def test_stratified_split_is_75_25_per_user_without_leakage(synth):
    dm = dm_for(synth, split="stratified", val_fraction=0.1, seed=1)
    data, part = dm.data, dm.part
    for u in range(data.num_users):
        n = int((data.user == u).sum())
        n_train = int(((data.user == u) & (part < 2)).sum())
        assert n_train == math.floor(0.75 * n)  # train + val: the reference's rank/n <= 0.75 rule
        assert int(((data.user == u) & (part == 1)).sum()) == math.floor(0.1 * n_train + 0.5)
    train, val, test = user_sets(dm, 0), user_sets(dm, 1), user_sets(dm, 2)
    for u in test:
        assert not test[u] & train.get(u, set()) and not test[u] & val.get(u, set())
    # Seeded: the same seed gives the same split, another seed another one.
    assert np.array_equal(dm_for(synth, split="stratified", val_fraction=0.1, seed=1).part, part)
    assert not np.array_equal(dm_for(synth, split="stratified", val_fraction=0.1, seed=2).part, part)


@needs_ml100k
def test_stratified_split_on_ml100k_matches_the_reference_counts():
    dm = dm_for("ml-100k", split="stratified", val_fraction=0.05)
    counts = np.bincount(dm.data.user)
    expected_test = int((counts - np.floor(0.75 * counts)).sum())
    assert int((dm.part == 2).sum()) == expected_test == 25_354  # 74,646 train+val / 25,354 test
    assert len(dm.datasets["test"]) == 943  # every user is evaluated


def test_chrono_split_tests_each_users_latest_interactions(synth):
    dm = dm_for(synth, split="chrono")
    data, part = dm.data, dm.part
    for u in range(data.num_users):
        mine = data.user == u
        assert data.timestamp[mine & (part == 2)].min() >= data.timestamp[mine & (part < 2)].max()
        assert data.timestamp[mine & (part == 1)].min() >= data.timestamp[mine & (part == 0)].max()


def test_temporal_split_pretrains_before_the_cut_and_both_phases_test_the_same_period(synth):
    pre = dm_for(synth, split="temporal", time_cut=0.5, phase="pretrain")
    fine = dm_for(synth, split="temporal", time_cut=0.5, phase="finetune")
    data, part = pre.data, pre.part
    cut = np.quantile(data.timestamp, 0.5)
    assert (data.timestamp[part <= 1] < cut).all() and (data.timestamp[part >= 2] >= cut).all()
    assert np.array_equal(part, fine.part)
    assert pre.stage_parts == {"train": 0, "val": 1, "test": 4}
    assert fine.stage_parts == {"train": 2, "val": 3, "test": 4}
    assert len(pre.datasets["train"]) == int((part == 0).sum()) and len(fine.datasets["train"]) == int(
        (part == 2).sum()
    )
    # The test users and what is excluded for them are identical in both phases: all but the held-out period.
    a, b = pre.datasets["test"], fine.datasets["test"]
    assert np.array_equal(a.users, b.users)
    ba, bb = a.__getitems__(list(range(len(a)))), b.__getitems__(list(range(len(b))))
    assert torch.equal(ba["history"], bb["history"]) and torch.equal(ba["target"], bb["target"])
    assert not (ba["history"] & ba["target"]).any()


def test_bad_split_settings_are_usage_errors(synth):
    for kw in ({"train_ratio": 1.0}, {"val_fraction": 0.0}, {"time_cut": 1.5}, {"split": "random"}, {"batch_size": 0}):
        with pytest.raises(UsageError):
            MovieLensDataModule(str(synth), **kw)


# --------------------------------------------------------------------------- negative sampling
def test_negative_sampling_never_samples_a_known_item():
    torch.manual_seed(0)
    known = torch.rand(64, 50) < 0.9  # 90% known: rejection has to work hard
    known[:, 7] = False  # at least one negative per row
    neg = sample_negatives(known, 32)
    assert neg.shape == (64, 32) and not known.gather(1, neg).any()


def test_training_batches_carry_negatives_outside_the_users_positives(synth):
    dm = dm_for(synth, split="stratified", num_negatives=5, batch_size=16)
    positives = {u: s | user_sets(dm, 1).get(u, set()) for u, s in user_sets(dm, 0).items()}
    batch = next(iter(dm.train_dataloader()))
    assert batch["negatives"].shape == (16, 5)
    for u, negs, hist in zip(batch["users"].tolist(), batch["negatives"].tolist(), batch["history"]):
        assert not set(negs) & user_sets(dm, 0)[u]  # never one of the user's training positives
        assert set(hist.nonzero().flatten().tolist()) == user_sets(dm, 0)[u]
    assert positives


# --------------------------------------------------------------------------- metrics
def test_ranking_metrics_match_a_hand_computed_case():
    """Two users, six items, k = 3.

    user 0: item 0 known; held out {1, 4}; scores [9, 5, 8, 1, 3, 7] -> ranking 2, 5, 1 | 4, 3: one hit at rank 3.
        P@3 = 1/3, R@3 = 1/2, hit = 1, NDCG = (1/log2 4) / (1 + 1/log2 3), AP = (1/3) / 1.
    user 1: items 1, 2 known; held out {0}; scores [6, 9, 9, 2, 1, 0] -> ranking 0, 3, 4: one hit at rank 1.
        P@3 = 1/3, R@3 = 1, hit = 1, NDCG = 1, AP = 1.
    """
    model = Recommender("mf", num_users=2, num_items=6, top_k=3)
    scores = torch.tensor([[9.0, 5, 8, 1, 3, 7], [6.0, 9, 9, 2, 1, 0]])
    history = torch.zeros(2, 6, dtype=torch.bool)
    history[0, 0] = history[1, 1] = history[1, 2] = True
    target = torch.zeros(2, 6, dtype=torch.bool)
    target[0, 1] = target[0, 4] = target[1, 0] = True
    preds, tgt, idx = model.ranking_inputs(scores, history, target, torch.tensor([0, 1]))
    assert len(preds) == 3 + 1 + 3  # user 0: its top 3 + the held-out item below; user 1: its top 3
    model.test_metrics.update(preds, tgt, indexes=idx)
    got = {k.split("/")[1]: float(v) for k, v in model.test_metrics.compute().items()}
    ndcg0 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    expected = {
        "precision@3": 1 / 3,
        "recall@3": (0.5 + 1) / 2,
        "hitrate@3": 1.0,
        "ndcg@3": (ndcg0 + 1) / 2,
        "map@3": (1 / 3 + 1) / 2,
    }
    assert got == pytest.approx(expected, abs=1e-6)


def test_top_k_reduction_equals_ranking_every_unknown_item():
    """Feeding torchmetrics only each user's top k and held-out items gives the same numbers as feeding it every
    item the user does not know."""
    from torchmetrics.retrieval import (
        RetrievalMAP,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    torch.manual_seed(0)
    users, items = 40, 200
    model = Recommender("mf", num_users=users, num_items=items, top_k=10)
    scores = torch.randn(users, items)
    history = torch.rand(users, items) < 0.3
    target = (torch.rand(users, items) < 0.05) & ~history
    target[:, 0] |= ~target.any(1) & ~history[:, 0]
    ids = torch.arange(users)
    preds, tgt, idx = model.ranking_inputs(scores, history, target, ids)
    model.test_metrics.update(preds, tgt, indexes=idx)
    got = {k.split("/")[1]: float(v) for k, v in model.test_metrics.compute().items()}
    row, col = (~history).nonzero(as_tuple=True)
    full_preds = scores[row, col] + 100  # positive, order kept (torchmetrics' MAP drops preds <= 0)
    for name, metric in {
        "ndcg@10": RetrievalNormalizedDCG(top_k=10),
        "precision@10": RetrievalPrecision(top_k=10),
        "recall@10": RetrievalRecall(top_k=10),
        "map@10": RetrievalMAP(top_k=10),
    }.items():
        expected = float(metric(full_preds, target[row, col], indexes=ids[row]))
        assert got[name] == pytest.approx(expected, abs=1e-6), name
    assert len(preds) < len(full_preds) / 3


# --------------------------------------------------------------------------- models
def params_of(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def changed(before, model):
    now = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, now[n])}


@pytest.mark.parametrize("loss", ["bpr", "softmax", "sampled_softmax"])
def test_one_training_step_changes_the_weights(synth, loss):
    seed_everything(0)
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=3, batch_size=32)
    model = Recommender("mf", num_users=30, num_items=40, loss=loss, l2=1e-3, user_history=True, lr=1e-2)
    before = params_of(model, "")
    fit(model, dm, max_steps=1, limit_val_batches=0)
    assert changed(before, model) == set(before)  # users, items, biases and history embeddings all moved


def test_two_tower_layer_groups_and_one_step(synth, tiny_encoder):
    seed_everything(0)
    model = Recommender("two_tower", num_users=30, num_items=40, user_history=True, text_encoder=tiny_encoder)
    groups = model.layer_groups()
    assert [n for n, _ in groups] == ["text.embeddings", "text.layer.0", "text.layer.1", "item_tower", "user_tower"]
    grouped = [p for _, ps in groups for p in ps]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # every parameter, once
    assert "item_text.projection.weight" in dict(groups)["item_tower"]
    assert set(dict(groups)["user_tower"]) == {
        "user_embedding.weight",
        "history_projection.weight",
        "history_projection.bias",
    }
    # Adapter targets (relative to the text encoder) are its blocks' linears.
    from peft_lightning.adapters import AdapterConfig, resolve_targets

    targets = resolve_targets(model.item_text.encoder, AdapterConfig("lora"), model.default_adapter_targets, [])
    assert {n.split(".")[-1] for n in targets} == {"query", "key", "value", "dense"} and len(targets) == 2 * 6
    before = params_of(model, "")
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=3, batch_size=32)
    fit(model, dm, max_steps=1, limit_val_batches=0)
    moved = changed(before, model)
    assert "item_text.encoder.encoder.layer.1.attention.self.query.weight" in moved  # fully trainable here
    assert {"user_embedding.weight", "item_text.projection.weight"} <= moved


def test_head_strategy_trains_only_the_user_tower_and_freezes_items(synth):
    seed_everything(0)
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=2, batch_size=32)
    model = Recommender("mf", num_users=30, num_items=40, lr=1e-2)
    before = params_of(model, "")
    fit(model, dm, epochs=1, callbacks=[FineTuning("head")], limit_train_batches=3, limit_val_batches=0)
    assert changed(before, model) == {"user_embedding.weight"}


def test_frozen_text_tower_encodes_the_catalogue_once(synth, tiny_encoder, monkeypatch):
    """``head`` over two groups trains the item projection and the user tower; the frozen encoder's features are
    computed once for training and validation (not per step), and it does not move."""
    seed_everything(0)
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=2, batch_size=16)
    model = Recommender("two_tower", num_users=30, num_items=40, user_history=True, text_encoder=tiny_encoder, lr=1e-2)
    calls = []
    encode = model.item_text._encode
    monkeypatch.setattr(model.item_text, "_encode", lambda items: calls.append(len(items)) or encode(items))
    before = params_of(model, "item_text.encoder.")
    trainer = fit(model, dm, epochs=2, callbacks=[FineTuning(Head(2))], limit_train_batches=4)
    assert not changed(before, model)
    assert sum(calls) == 40  # every item once, for 8 steps and 2 validations
    assert {"val/ndcg@10", "val/map@10"} <= set(trainer.callback_metrics)
    # Restoring the same weights (as testing the best checkpoint does) keeps the cache.
    model.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        model.scores(torch.tensor([0, 1]))
    assert sum(calls) == 40


def test_data_and_model_sizes_must_agree(synth):
    dm = MovieLensDataModule(str(synth), val_fraction=0.2)
    model = Recommender("mf", num_users=943, num_items=1682)
    with pytest.raises(UsageError, match="--model.num_users 30"):
        fit(model, dm, max_steps=1)


# --------------------------------------------------------------------------- init_from
def test_init_from_round_trips_checkpoints_and_state_dicts(synth, tmp_path, tiny_encoder):
    seed_everything(0)
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=2, batch_size=32)
    model = Recommender("mf", num_users=30, num_items=40, user_history=True)
    trainer = fit(model, dm, max_steps=2, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    for f in ("run.ckpt", "w.safetensors", "w.pth"):
        again = Recommender("mf", num_users=30, num_items=40, user_history=True, init_from=str(tmp_path / f))
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), (f, k)
    with pytest.raises(UsageError, match="another shape"):
        Recommender("mf", num_users=30, num_items=40, dim=32, user_history=True, init_from=str(tmp_path / "w.pth"))
    with pytest.raises(UsageError, match="cannot load text encoder"):
        Recommender("two_tower", num_users=30, num_items=40, text_encoder=str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="missing"):  # an MF checkpoint has no text tower
        Recommender(
            "two_tower",
            num_users=30,
            num_items=40,
            user_history=True,
            text_encoder=tiny_encoder,
            init_from=str(tmp_path / "w.pth"),
        )
    with pytest.raises(UsageError, match="does not exist"):
        Recommender("mf", num_users=30, num_items=40, init_from=str(tmp_path / "nope.ckpt"))


@needs_ml100k
def test_fine_tuning_on_the_target_period_beats_the_pretrained_model(tmp_path, one_thread):
    """Real ml-100k: pretrain MF before the median timestamp, fine-tune from its checkpoint on the period after;
    on the same held-out part of that period the fine-tuned model ranks better (users who only appear after the
    cut-off are noise to the pretrained model)."""
    common = {"split": "temporal", "time_cut": 0.5, "num_negatives": 4, "batch_size": 2048, "eval_batch_size": 1024}
    seed_everything(0)
    pre = Recommender("mf", l2=1e-2, lr=1e-2, weight_decay=0.0, scheduler="constant")
    trainer = fit(pre, MovieLensDataModule("ml-100k", phase="pretrain", **common), epochs=3)
    pre_test = trainer.test(pre, MovieLensDataModule("ml-100k", phase="finetune", **common), verbose=False)[0]
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    seed_everything(0)
    fine = Recommender(
        "mf", l2=1e-2, lr=1e-2, weight_decay=0.0, scheduler="constant", init_from=str(tmp_path / "pre.ckpt")
    )
    fine_dm = MovieLensDataModule("ml-100k", phase="finetune", **common)
    trainer = fit(fine, fine_dm, epochs=2)
    fine_test = trainer.test(fine, fine_dm, verbose=False)[0]
    assert fine_test["test/ndcg@10"] > pre_test["test/ndcg@10"] + 0.02, (pre_test, fine_test)
    assert fine_test["test/recall@10"] > pre_test["test/recall@10"]


# --------------------------------------------------------------------------- CLI
@pytest.mark.slow
@needs_ml100k
def test_cli_fit_bpr_movielens_small_budget_prints_the_summary(tmp_path):
    res = run_cli(
        "fit",
        "--recipe",
        "bpr_movielens",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "10",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = [line for line in res.stdout.splitlines() if line.startswith("bpr_movielens: test/")]
    assert summary, res.stdout[-2000:]
    ndcg = float(summary[0].split("test/ndcg@10 ")[1].split()[0])
    assert 0.05 < ndcg < 1  # 10 BPR steps already beat random ranking (~0.01) on all 943 users
    assert "best checkpoint" in summary[0] and list(tmp_path.rglob("last.ckpt"))
    # predict: each test user's top-k items by the data's own ids, with titles and scores, and the held-out items
    best = summary[0].split("best checkpoint ")[1].rstrip(")")
    res = run_cli(
        "predict",
        "--recipe",
        "bpr_movielens",
        "--ckpt_path",
        best,
        "--trainer.default_root_dir",
        str(tmp_path / "p"),
        "--trainer.enable_progress_bar",
        "false",
        "--predictions.top_k",
        "3",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import pyarrow.parquet as pq

    path = res.stdout.split("predictions: ")[1].split(" (")[0]
    rows = pq.read_table(path).to_pylist()
    assert len(rows) > 900 and len({r["user"] for r in rows}) == len(rows)  # every test user once
    first = rows[0]
    assert set(first) == {"user", "items", "titles", "scores", "held_out"} and len(first["items"]) == 3
    assert first["scores"] == sorted(first["scores"], reverse=True) and first["held_out"]
    assert all(1 <= i <= 1682 for i in first["items"]) and "(19" in " ".join(first["titles"])  # ml-100k's ids


def test_cli_missing_data_folder_is_one_line():
    res = run_cli("fit", "--recipe", "bpr_movielens", "--data.dataset", "/no/such/dir")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --data.dataset '/no/such/dir' does not exist"), res.stderr
    assert "Traceback" not in res.stderr
