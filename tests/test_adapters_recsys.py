"""peft adapters on the recommender: two_tower's text encoder takes them, everything else trains in full and is in
the adapter-only checkpoint, which resumes exactly; a full pretrained checkpoint is fine-tuned through adapters;
the merged export loads with init_from; mf refuses adapters with one line."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from peft_lightning.adapters import AdapterConfig
from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.errors import UsageError
from peft_lightning.model_files.export import export
from peft_lightning.tasks.recsys import Recommender

from helpers import StopAfterEpoch

USERS, ITEMS = 12, 20
TEXTS = [f"Movie {i} ({1990 + i % 8}). Genres: {['Drama', 'Comedy', 'Action', 'War'][i % 4]}" for i in range(ITEMS)]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BertModel with MiniLM's real tokenizer."""
    import transformers

    from peft_lightning.tasks.item_text_tower import default_text_encoder

    path = tmp_path_factory.mktemp("tiny-encoder")
    tok = transformers.AutoTokenizer.from_pretrained(default_text_encoder())
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def loader() -> DataLoader:
    """Fixed BPR batches (users prefer items of their cluster; negatives drawn once, here), so an interrupted and
    an uninterrupted run see the same data."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        users = torch.randint(0, USERS, (16,), generator=g)
        items = (users % 4 + 4 * torch.randint(0, ITEMS // 4, (16,), generator=g)) % ITEMS
        batches.append({"users": users, "items": items, "negatives": torch.randint(0, ITEMS, (16, 3), generator=g)})
    return DataLoader(batches, batch_size=None)


def two_tower(encoder: str, method: str | None = "lora", **kw) -> Recommender:
    seed_everything(3)
    peft = AdapterConfig(method, r=4) if method else None
    model = Recommender("two_tower", num_users=USERS, num_items=ITEMS, text_encoder=encoder, lr=1e-2, peft=peft, **kw)
    model.set_item_text(TEXTS)
    return model


def train(model, epochs, *, root=None, ckpt_path=None, extra=()) -> Trainer:
    callbacks = [FineTuning("full"), *extra]
    if root is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, save_last=True))
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=root is not None,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "ia3", "lokr"])
def test_adapters_on_the_text_encoder_and_the_towers_in_full(tiny_encoder, method):
    model = two_tower(tiny_encoder, method)
    groups = model.layer_groups()
    assert [n for n, _ in groups] == ["text.embeddings", "text.layer.0", "text.layer.1", "item_tower", "user_tower"]
    assert sorted(p for _, ps in groups for p in ps) == sorted(n for n, _ in model.named_parameters())
    before = snapshot(model)
    trainable = model.trainable_parameter_names()
    train(model, 1)
    changed = {n for n, p in snapshot(model).items() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert {"user_embedding.weight", "item_embedding.weight", "item_text.projection.weight"} <= changed
    adapted = {n.split(".layer.")[1].split(".")[0] for n in changed if n.startswith("item_text.encoder.")}
    assert adapted == {"0", "1"}  # adapters in both blocks moved, and nothing else of the encoder
    assert all(model.item_text.encoder.base_model.prefix in n for n in changed if n.startswith("item_text.encoder."))


def test_adapter_only_checkpoint_holds_the_towers_and_resumes_exactly(tiny_encoder, tmp_path):
    full = two_tower(tiny_encoder)
    train(full, 3)
    train(two_tower(tiny_encoder), 3, root=tmp_path, extra=[StopAfterEpoch(0)])
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert {"user_embedding.weight", "item_embedding.weight", "item_bias.weight", "item_text.projection.weight"} <= keys
    assert not any(".base_layer." in k or "word_embeddings" in k for k in keys)
    assert keys == set(full.trainable_state_dict())
    resumed = two_tower(tiny_encoder)
    train(resumed, 3, root=tmp_path / "again", ckpt_path=str(tmp_path / "last.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_pretrained_checkpoint_fine_tuned_through_adapters_and_exported_merged(tiny_encoder, tmp_path):
    pre = two_tower(tiny_encoder, None)
    train(pre, 1)
    torch.save({"state_dict": pre.state_dict()}, tmp_path / "pre.ckpt")
    model = two_tower(tiny_encoder, "lora", init_from=str(tmp_path / "pre.ckpt"))
    base = dict(model.named_parameters())
    for name, p in pre.named_parameters():  # every pretrained weight is where the adapters start from
        inner = name.replace("item_text.encoder.", "item_text.encoder.base_model.model.")
        inner = (
            inner
            if inner in base
            else inner.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(base[inner if inner in base else name], p), name
    train(model, 1)
    with pytest.raises(UsageError, match="pass --merge"):
        export(model, tmp_path / "x")
    written = export(model, tmp_path / "x", merge=True)
    assert {p.name for p in written} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
        "README.md",
    }
    assert "--model.init_from" in (tmp_path / "x" / "README.md").read_text()  # the adapter folder alone is no model
    again = two_tower(tiny_encoder, None, init_from=str(tmp_path / "x" / "model.safetensors"))
    users = torch.arange(USERS)
    with torch.no_grad():
        assert torch.allclose(again.eval().scores(users), model.eval().scores(users), atol=1e-4)
        assert not torch.allclose(pre.eval().scores(users), model.scores(users), atol=1e-3)


def test_mf_refuses_adapters_with_one_line():
    with pytest.raises(UsageError, match="only ID embeddings.*two_tower") as err:
        Recommender("mf", num_users=USERS, num_items=ITEMS, peft=AdapterConfig("lora"))
    assert "\n" not in str(err.value)
