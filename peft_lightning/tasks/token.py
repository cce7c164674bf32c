"""Token classification (named entities, part of speech, punctuation ...) on any ``AutoModelForTokenClassification``.

Metrics, per word (its first sub-word, ``data/token.py``):

- tags that mark **spans** (``B-PER I-PER O``, IOB2 or IOBES): entity-level precision, recall and F1 with seqeval's
  definition (micro over entities: an entity counts when its type, first and last word all match), logged as
  ``precision``/``recall``/``f1``, beside the token accuracy ``acc``. ``span_scheme`` ``auto`` is seqeval's default
  mode (conlleval's chunking, which reads IOB2 and IOBES tags); ``IOB2``/``IOBES`` its strict mode for that scheme
  (an entity that breaks the scheme, such as a lone ``I-``, does not count).
- tags **without spans** (``span_scheme`` ``none``, or tags without ``B-``/``I-``... prefixes): token accuracy
  ``acc`` and macro ``f1`` over the tags.

The test stage adds the F1 of each entity type (spans) or tag (``test/f1_<name>``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from peft_lightning.data.token import IGNORE
from peft_lightning.errors import UsageError
from peft_lightning.model_files.onnx_export import OnnxSpec
from peft_lightning.tasks.base import Snippet
from peft_lightning.tasks.text import TextClassifier

SpanScheme = Literal["auto", "IOB2", "IOBES", "none"]
PREFIXES = ("B", "I", "E", "S")


def parse_tag(name: str) -> tuple[str, str]:
    """seqeval's reading of a tag: its prefix and its type (``B-PER`` -> ``("B", "PER")``, ``O`` -> ``("O", "_")``)."""
    return name[0], name[1:].split("-", maxsplit=1)[-1] or "_"


def marks_spans(names: list[str]) -> bool:
    """Whether every tag is ``O`` or a span tag (``B-X``, ``I-X``, ``E-X``, ``S-X``), and some tag starts a span."""
    spans = [n for n in names if n != "O"]
    return bool(spans) and all(n[:2] in {f"{p}-" for p in PREFIXES} for n in spans)


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's ``end_of_chunk``: a chunk ended between the previous word and this one."""
    return (
        prev in ("E", "S")
        or (prev in ("B", "I") and tag in ("B", "S", "O"))
        or (prev not in ("O", ".") and prev_type != type_)
    )


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's ``start_of_chunk``: a chunk starts at this word."""
    return (
        tag in ("B", "S")
        or (prev in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entities(tags: list[tuple[str, str]], scheme: str = "auto") -> set[tuple[str, int, int]]:
    """The entities ``(type, first, last)`` of one sentence of parsed tags (``parse_tag``).

    ``auto`` is seqeval's default mode (``get_entities``); ``IOB2``/``IOBES`` its strict mode (``Tokens.entities``):
    an entity starts at ``B`` (or ``S``), continues with ``I`` (or ``E``) of its type, and under IOBES must end
    with ``E`` (or be one ``S``).

    Example:
        >>> tags = [parse_tag(t) for t in ["B-PER", "I-PER", "O", "I-LOC"]]
        >>> sorted(entities(tags)), sorted(entities(tags, "IOB2"))
        ([('LOC', 3, 3), ('PER', 0, 1)], [('PER', 0, 1)])
    """
    found = set()
    if scheme == "auto":
        (prev, prev_type), begin = ("O", "_"), 0
        for i, (tag, type_) in enumerate([*tags, ("O", "_")]):
            if _ends(prev, tag, prev_type, type_):
                found.add((prev_type, begin, i - 1))
            if _starts(prev, tag, prev_type, type_):
                begin = i
            prev, prev_type = tag, type_
        return found
    inside = ("I", "E") if scheme == "IOBES" else ("I",)
    i = 0
    while i < len(tags):
        tag, type_ = tags[i]
        if tag == "B" or (tag == "S" and scheme == "IOBES"):
            j = i + 1
            while tag != "S" and j < len(tags) and tags[j] == (tags[j][0], type_) and tags[j][0] in inside:
                j += 1
                if tags[j - 1][0] == "E":
                    break
            if scheme == "IOB2" or tags[j - 1][0] in ("E", "S"):
                found.add((type_, i, j - 1))
            i = j
        else:
            i += 1
    return found


def _f1(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 from counts (0 where undefined, as seqeval and torchmetrics give it)."""
    precision = tp / predicted.clamp(min=1)
    recall = tp / actual.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}


class TagMetrics(Metric):
    """Token accuracy, and entity-level (span tags) or macro (plain tags) precision/recall/F1, over the labelled
    positions (label != -100) of ``[batch, sequence]`` predictions and labels. Its states are sums (a confusion
    matrix, entity counts per type), so DDP adds them up.

    Args:
        names: the tags in id order.
        scheme: ``auto``, ``IOB2``, ``IOBES`` (entities, see ``entities``) or ``none`` (plain tags).
        per_class: add ``f1_<type>`` (spans) or ``f1_<tag>`` (plain tags) to what ``compute`` returns.
    """

    full_state_update = False

    def __init__(self, names: list[str], scheme: str = "none", per_class: bool = False) -> None:
        super().__init__()
        self.names, self.scheme, self.per_class = list(names), scheme, per_class
        self.parsed = [parse_tag(n) for n in self.names]
        self.types = sorted({t for p, t in self.parsed if p != "O"}) if scheme != "none" else []
        n = len(self.names)
        self.add_state("confusion", torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")
        for state in ("tp", "predicted", "actual"):
            self.add_state(state, torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(self.names)
        keep = labels != IGNORE
        pairs = labels[keep] * n + preds[keep]
        self.confusion += torch.bincount(pairs, minlength=n * n).view(n, n)
        if not self.types:
            return
        where = {t: i for i, t in enumerate(self.types)}
        counts = torch.zeros(3, len(self.types), dtype=torch.long)
        for gold_row, pred_row, row_keep in zip(labels.tolist(), preds.tolist(), keep.tolist()):
            gold = entities([self.parsed[g] for g, k in zip(gold_row, row_keep) if k], self.scheme)
            pred = entities([self.parsed[p] for p, k in zip(pred_row, row_keep) if k], self.scheme)
            for row, found in enumerate((gold & pred, pred, gold)):
                for type_, _, _ in found:
                    counts[row, where[type_]] += 1
        self.tp += counts[0].to(self.tp.device)
        self.predicted += counts[1].to(self.tp.device)
        self.actual += counts[2].to(self.tp.device)

    def compute(self) -> dict[str, torch.Tensor]:
        confusion = self.confusion.float()
        out = {"acc": confusion.trace() / confusion.sum().clamp(min=1)}
        if self.types:
            out |= _f1(self.tp.sum().float(), self.predicted.sum().float(), self.actual.sum().float())
            per = _f1(self.tp.float(), self.predicted.float(), self.actual.float())["f1"]
            names = self.types
        else:
            per = _f1(confusion.diagonal(), confusion.sum(0), confusion.sum(1))["f1"]
            # Macro over the tags that occur (in the labels or the predictions), as torchmetrics' macro F1 does.
            seen = (confusion.sum(0) + confusion.sum(1)) > 0
            out["f1"] = per[seen].mean() if bool(seen.any()) else per.sum()
            names = self.names
        if self.per_class:
            out |= {f"f1_{name}": value for name, value in zip(names, per)}
        return out


class TokenClassifier(TextClassifier):
    """A tag per word with a transformers encoder: pretrained body, new token-classification head of ``num_labels``.

    Everything but the head's shape and the metrics is ``TextClassifier``'s: the model and tokenizer from
    ``model_name``, the layer groups (``embeddings``, ``layer.N``, ``head``), adapters (peft's ``TOKEN_CLS``), the
    prefix cache, export and the model card (``AutoModelForTokenClassification``). ``TokenDataModule`` is handed the
    tokenizer (``data_needs``) and aligns the word tags to its sub-words.

    Args:
        model_name: a Hugging Face hub name (``google-bert/bert-base-cased``) or a ``save_pretrained`` folder.
        num_labels: tags of the new head (the data's tag set: ``O``, ``B-PER``, ``I-PER`` ...).
        span_scheme: how the metrics read the tags (module docstring): ``auto`` (spans when every tag is ``O`` or
            ``B-``/``I-``/``E-``/``S-`` prefixed, in seqeval's default mode; else plain tags), ``IOB2`` or
            ``IOBES`` (seqeval's strict mode), ``none`` (plain tags: accuracy and macro-F1).
        revision: hub revision of the checkpoint.
        trust_remote_code: run modelling code shipped with the checkpoint.
        gradient_checkpointing: recompute activations in the backward pass: less memory for ~30% more time.
        config_overrides: values set on the model config before loading, e.g. ``{"hidden_dropout_prob": 0.2}``.
        label_smoothing: cross-entropy label smoothing.
        **kwargs: optimizer, schedule and adapters (``peft``), see ``FineTuneTask``.

    Example:
        >>> model = TokenClassifier("google-bert/bert-base-cased", num_labels=9)  # doctest: +SKIP
    """

    domain = "token"
    peft_task_type = "TOKEN_CLS"
    auto_class: ClassVar[str] = "AutoModelForTokenClassification"
    monitor: ClassVar[str] = "val/f1"

    def __init__(
        self,
        model_name: str = "google-bert/bert-base-cased",
        num_labels: int = 9,
        span_scheme: SpanScheme = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        config_overrides: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name=model_name,
            num_labels=num_labels,
            revision=revision,
            trust_remote_code=trust_remote_code,
            gradient_checkpointing=gradient_checkpointing,
            config_overrides=config_overrides,
            label_smoothing=label_smoothing,
            **kwargs,
        )

    # --- metrics: the tags' names say whether they mark spans, so they are built again once the data names them ---
    def _build_metrics(self) -> None:
        names, scheme = self.class_names, self.hparams.span_scheme
        if not names:  # before the data names the tags (TextClassifier.__init__): plain tags, for now
            names, scheme = [str(i) for i in range(self.num_labels)], "none"
        elif scheme == "auto":
            scheme = "auto" if marks_spans(names) else "none"
        elif scheme != "none" and not marks_spans(names):
            raise UsageError(
                f"span_scheme {scheme} needs span tags (O, B-X, I-X ...), not {', '.join(names[:6])}: "
                "pass --model.span_scheme none"
            )
        elif scheme == "IOB2" and any(n[:2] in ("E-", "S-") for n in names):
            raise UsageError("span_scheme IOB2 has no E-/S- tags: pass --model.span_scheme IOBES")
        self.val_metrics = TagMetrics(names, scheme).to(self.device)
        self.test_metrics = TagMetrics(names, scheme, per_class=True).to(self.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # checks the tag count, names the classes
        self._build_metrics()

    # --- steps ---
    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.prefix_cache is not None and "index" in batch:
            logits = self.prefix_cache.logits(batch)  # [batch, the batch's longest row, tags], as uncached
        else:
            logits = self(**self._inputs(batch))
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, label_smoothing=self.label_smoothing
        )
        return logits, loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(batch["labels"]))
        metrics.update(logits.argmax(-1), batch["labels"])

    def _log_epoch(self, metrics: TagMetrics, stage: str) -> None:
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()}, prog_bar=stage == "val")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(**self._inputs(batch)).softmax(-1)
        confidence, pred = probs.max(-1)
        return {"pred": pred, "confidence": confidence}

    def prediction_rows(self, prediction: dict[str, torch.Tensor], batch: Any, top_k: int = 5) -> list[dict]:
        """One row per sentence: its ``id``, ``words``, the predicted ``tags`` with their ``probabilities``, one per
        word (a word cut off by ``max_length`` gets none), and the true ``labels`` when the data has them."""
        names = self.class_names or [str(i) for i in range(self.num_labels)]
        if len(names) != self.num_labels:
            id2label = getattr(self.backbone.config, "id2label", None) or {}
            names = [str(id2label.get(i, i)) for i in range(self.num_labels)]
        starts = batch["labels"] != IGNORE  # each word's first piece (data/token.py: encode_for_predict)
        rows = []
        for j, (pred, conf, first) in enumerate(zip(prediction["pred"], prediction["confidence"], starts)):
            words = batch["text"][j]
            row = {"id": batch["id"][j], "words": words}
            row["tags"] = [names[t] for t in pred[first].tolist()]
            row["probabilities"] = conf[first].tolist()
            if batch.get("target") is not None:
                row["labels"] = batch["target"][j]
            rows.append(row)
        return rows

    def base_snippet(self) -> Snippet:
        """``TextClassifier``'s, with the tag names on the model's config (its ``id2label``): what a reader of its
        predictions needs, and what the base checkpoint cannot know."""
        snippet = super().base_snippet()
        if self.class_names and snippet.code[0].startswith("base = "):
            names = dict(enumerate(self.class_names))
            snippet.code.append(f"base.config.id2label = {names!r}  # the tags, by id")
        return snippet

    def onnx_spec(self, model: nn.Module, data: dict[str, Any]) -> OnnxSpec:
        """``TextClassifier``'s inputs; the logits are ``[batch, sequence, tags]``, one row per sub-word."""
        return dataclasses.replace(super().onnx_spec(model, data), output_axes={0: "batch", 1: "sequence"})
