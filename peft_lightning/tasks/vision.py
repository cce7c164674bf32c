"""Image classification on any timm model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning import adapters
from peft_lightning.data.checks import check_sizes, data_spec
from peft_lightning.engine.blocks import BLOCK_MODULES, BLOCK_PREFIX
from peft_lightning.errors import UsageError
from peft_lightning.model_files.onnx_export import OnnxSpec
from peft_lightning.prefix import Split, container_item, start_at, stop_before
from peft_lightning.tasks.base import FineTuneTask, LayerGroups
from peft_lightning.tasks.export_hooks import Snippet
from peft_lightning.tasks.metrics import classification_metrics, per_stage
from peft_lightning.tasks.rows import class_names_or_ids, class_rows


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state_dict safely (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint_path {str(path)!r} does not exist: pass the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(
            f"cannot read weights from {str(path)!r} ({type(err).__name__}): it is corrupt, truncated or "
            "not a safetensors/state_dict file"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{str(path)!r} holds no state_dict of tensors: pass a safetensors file or a saved state_dict")
    return sd


def name_groups(groups: dict[int, list[str]], n_head: int = 1) -> LayerGroups:
    """Name timm's numbered parameter groups: ``stem``, ``blocks.N`` (from the parameter names), ``head``."""
    out: LayerGroups = []
    ordered = [groups[k] for k in sorted(groups)]
    for i, names in enumerate(ordered):
        if i == 0:
            label = "stem"
        elif i >= len(ordered) - n_head:
            label = "head"
        else:
            m = BLOCK_PREFIX.match(names[0])
            label = m.group(1) if m else f"group{i}"
        if out and out[-1][0] == label:
            out[-1][1].extend(names)
        else:
            out.append((label, list(names)))
    return out


def fresh_head(model: nn.Module, num_classes: int) -> list[str]:
    """Give a pretrained timm model a new ``num_classes`` head through timm's own ``reset_classifier``; returns the
    names of the modules it made anew (the model's ``classifier``: ``head``, ``classifier``, ``head.fc`` ...).

    ``create_model(num_classes=N)`` initialises the new head with the architecture's from-scratch scheme, which
    for EfficientNets draws weights ~11x larger than ``reset_classifier``'s ``nn.Linear`` default; on
    ``effnet_fashion`` that large random head cost ~1.4 points of test accuracy after one epoch (89.8% against
    91.2% for the same run with the small head), its early gradients disturbing the pretrained blocks.
    """
    model.reset_classifier(num_classes)
    classifier = model.pretrained_cfg.get("classifier", "head")
    return [classifier] if isinstance(classifier, str) else list(classifier)


class ImageClassifier(FineTuneTask):
    """Image classification with a timm model: pretrained weights, head reset to ``num_classes``.

    Args:
        model_name: any ``timm.create_model`` name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        num_classes: classes of the new head (the old head is replaced).
        pretrained: load the model's pretrained weights from the Hugging Face hub / timm URL.
        checkpoint_path: local weights (safetensors or a torch state_dict, loaded with ``weights_only=True``)
            used instead of the hub; a head of another shape in the file is skipped.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate, for models that have it.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep weights and inputs channels-last (NHWC): faster convolutions on CPUs and tensor
            cores (measured ~1.3x for an EfficientNet-Lite0 training step on 2 CPU cores).
        **kwargs: optimizer and schedule, see ``FineTuneTask``.

    Example:
        >>> model = ImageClassifier("test_vit", num_classes=3, pretrained=False)  # doctest: +SKIP
    """

    domain = "vision"
    library = "timm"
    # Adapters go on the numbered blocks' linears and convolutions (a ViT's qkv/proj/fc1/fc2, an EfficientNet's
    # conv_pw/conv_pwl, a ResNet's conv1-3) and on a convnet's conv_head; the method keeps the types it supports
    # (LoRA/DoRA skip depthwise convolutions). The stem and the classifier get none: the classifier trains in full.
    default_adapter_targets = BLOCK_MODULES + "|conv_head"

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._fresh: list[str] = []  # what build_model did not load from pretrained weights (fresh_modules)
        self.model = self.add_adapters(self.build_model(), base_name=model_name).to(memory_format=self.memory_format)
        self._build_metrics()

    # --- model ---
    def _create(self, pretrained: bool, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """``timm.create_model`` with a ``num_classes`` head, or with ``weights`` (a state_dict) as its pretrained
        weights and the head size they have: timm loads them as it loads hub weights (``pretrained_cfg_overlay``:
        the architecture's checkpoint filter runs), strictly because the class counts agree."""
        import timm

        hp = self.hparams
        extra: dict[str, Any] = {"drop_rate": hp.drop_rate, "num_classes": self.num_classes}
        if hp.drop_path_rate is not None:
            extra["drop_path_rate"] = hp.drop_path_rate
        if weights is not None:
            extra["num_classes"] = self._head_size(weights)
            extra["pretrained_cfg_overlay"] = {"state_dict": weights, "num_classes": extra["num_classes"]}
        try:
            return timm.create_model(hp.model_name, pretrained=pretrained or weights is not None, **extra)
        except RuntimeError as err:
            if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
                close = timm.list_models(f"*{hp.model_name.split('.')[0][:6]}*")[:5]
                raise UsageError(
                    f"unknown timm model {hp.model_name!r}; similar: {', '.join(close) or 'none'}"
                ) from None
            if weights is None:
                raise
            raise self._misfit(err) from None
        except KeyError as err:  # a checkpoint filter looked for a tensor the weights lack
            if weights is None:
                raise
            raise self._misfit(err) from None
        except (OSError, ValueError) as err:  # hub unreachable or nothing cached
            if weights is not None:
                raise self._misfit(err) from None
            if not pretrained:
                raise
            raise UsageError(
                f"could not fetch pretrained weights for {hp.model_name!r} from the Hugging Face hub "
                f"({type(err).__name__}; offline and not cached?): pass local weights with "
                "--model.checkpoint_path FILE, set HF_HOME to a cache that has them, or --model.pretrained false"
            ) from None

    def _head_size(self, weights: dict[str, torch.Tensor]) -> int:
        """The class count of the classifier in ``weights`` (``num_classes`` if they hold none)."""
        from timm.models import get_pretrained_cfg_value

        try:
            classifier = get_pretrained_cfg_value(self.hparams.model_name, "classifier") or "head"
        except RuntimeError:  # an unknown model: `_create` says so
            classifier = "head"
        name = classifier if isinstance(classifier, str) else classifier[0]
        weight = weights.get(f"{name}.weight")
        return int(weight.shape[0]) if weight is not None else self.num_classes

    def _misfit(self, err: Exception) -> UsageError:
        """One line from torch's strict-load error (``Missing key(s) in state_dict: "a", "b" ...``) or another."""
        parts = []
        for line in (line.strip() for line in str(err).splitlines()):
            keys = re.findall(r'"([^"]+)"', line)
            if line.startswith(("Missing key(s)", "Unexpected key(s)")):
                parts.append(f"{len(keys)} {line.split()[0].lower()} (e.g. {', '.join(keys[:2])})")
            elif line.startswith("size mismatch") and len(parts) < 3:
                parts.append(line[:160])
        detail = "; ".join(parts) or (str(err).splitlines() or [type(err).__name__])[0][:160]
        return UsageError(
            f"weights do not fit {self.hparams.model_name} ({detail}): is it a checkpoint of another architecture?"
        )

    def build_model(self) -> nn.Module:
        """Create the timm model with its pretrained weights (timm's, or ``checkpoint_path``'s) and a fresh
        ``num_classes`` head. Recipes whose weights come from elsewhere override this (see ``from_weights``)."""
        hp = self.hparams
        if hp.checkpoint_path is not None:
            return self.from_weights(load_state_dict(hp.checkpoint_path))
        model = self._create(hp.pretrained)
        # timm logs the head it left out of the pretrained weights at INFO (unseen); the start of fit says it.
        self._fresh = [f"model.{n}" for n in fresh_head(model, self.num_classes)] if hp.pretrained else ["model"]
        return model

    def from_weights(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The model with ``weights`` (a timm-named state_dict) loaded, and a ``num_classes`` head: the one in
        ``weights`` if it has that size, else a fresh one.

        timm's own loading is used (``pretrained_cfg_overlay``) with one thing added by hand: timm drops the head
        whenever the model's class count differs from its registry's, and then loads *non-strictly*, only logging
        what did not fit, so a checkpoint of another architecture would leave the model random. Building the model
        with the head size the weights have keeps timm's load strict; the head is reset after.
        """
        model = self._create(pretrained=False, weights=weights)
        self._fresh = []
        if model.num_classes != self.num_classes:
            self._fresh = [f"model.{n}" for n in fresh_head(model, self.num_classes)]
        return model

    def fresh_modules(self) -> list[str]:
        """The modules that start from random weights: the new head (``model.head``, ``model.classifier`` ...),
        or ``model`` itself without pretrained weights (``pretrained=False``); empty when the weights held a head
        of ``num_classes``, or when a recipe's own ``build_model`` does not record it."""
        return list(self._fresh)

    def weights_source(self) -> str:
        """Where ``build_model`` takes the base weights from, in words (the exported model card says it)."""
        hp = self.hparams
        if hp.checkpoint_path is not None:
            return f"the local file `{hp.checkpoint_path}`"
        if not hp.pretrained:
            return "nowhere: randomly initialised (`pretrained=False`)"
        return f"timm's pretrained `{hp.model_name}` (Hugging Face hub / timm's URL)"

    def base_snippet(self) -> Snippet:
        """timm's model as ``build_model`` creates it, a file's weights loaded but a head of another size skipped (the
        adapter folder holds the trained head); a recipe's own ``build_model``: the recipe builds it."""
        if type(self).build_model is not ImageClassifier.build_model:
            return super().base_snippet()
        hp = self.hparams
        path = str(hp.checkpoint_path or "")
        code = [
            f"base = timm.create_model({hp.model_name!r}, pretrained={bool(hp.pretrained) and not path}, "
            f"num_classes={hp.num_classes})"
        ]
        if not path:
            return Snippet(["import timm"], code)
        safetensors = path.endswith(".safetensors")
        read = f"load_file({path!r})" if safetensors else f"torch.load({path!r}, map_location='cpu', weights_only=True)"
        return Snippet(
            ["import timm", "from safetensors.torch import load_file" if safetensors else "import torch"],
            [
                *code,
                f"weights = {read}  # the base the adapter was trained on",
                "own = base.state_dict()",
                "base.load_state_dict({k: v for k, v in weights.items() if v.shape == own[k].shape}, strict=False)",
            ],
        )

    def merged_option(self, whole_task: bool = False) -> str:
        """``--model.checkpoint_path``: ``model.safetensors`` is a timm state_dict."""
        return super().merged_option(whole_task) if whole_task else "--model.checkpoint_path"

    def merged_snippet(self, path: Path) -> Snippet:
        return Snippet(
            ["import timm", "from safetensors.torch import load_file"],
            [
                f"merged = timm.create_model({self.hparams.model_name!r}, pretrained=False, "
                f"num_classes={self.hparams.num_classes})",
                f"merged.load_state_dict(load_file({str(path)!r}))",
            ],
        )

    def adapter_head(self, model: nn.Module) -> list[str]:
        classifier = model.pretrained_cfg.get("classifier", "head")
        return [classifier] if isinstance(classifier, str) else list(classifier)

    @property
    def backbone(self) -> nn.Module:
        """The timm model (with its adapter layers, if any): what ``group_matcher`` and the data config read."""
        return adapters.unwrap(self.model)

    def layer_groups(self) -> LayerGroups:
        from timm.models import group_parameters

        # Adapter parameters sit under their block's name (blocks.3.attn.qkv.lora_A...): timm groups them with it.
        prefix = "model." + adapters.inner_prefix(self.model)
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [(n, [prefix + p for p in ps]) for n, ps in name_groups(groups)]

    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing for this model (input size, mean/std, interpolation, crop)."""
        import timm

        return timm.data.resolve_model_data_config(self.backbone)

    def data_needs(self) -> dict[str, Any]:
        """The data's preprocessing is the model's: ``ImageDataModule.connect(data_config=...)``."""
        return {"data_config": self.data_config()}

    # --- steps ---
    def _build_metrics(self) -> None:
        metrics = classification_metrics(self.num_classes, mcc=False, top_k=5)
        self.val_metrics, self.test_metrics = per_stage(metrics)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=self.memory_format))

    def prefix_split(self, group: str) -> Split | None:
        """Cut before ``group``: the classifier's input (``pre_logits``) when only the classifier trains, else the
        input of the numbered block (``blocks.5``, ``stages.2`` ...) where ``group`` starts."""
        groups = self.layer_groups()
        members = dict(groups)[group]
        classifier = (
            f"model.{adapters.inner_prefix(self.model)}{self.backbone.pretrained_cfg.get('classifier', 'head')}."
        )
        model = self.model
        if group == groups[-1][0] and all(n.startswith(classifier) for n in members):
            if self.hparams.drop_rate:  # timm's dropout runs before pre_logits: random, so not cacheable
                return None

            def pooled(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
                x = batch["pixel_values"].contiguous(memory_format=self.memory_format)
                return {"x": model.forward_head(model.forward_features(x), pre_logits=True)}

            return Split(
                group,
                pooled,
                lambda batch, rows: model.get_classifier()(rows["x"]),
                ("pixel_values",),
                lambda batch: self(batch["pixel_values"]),
            )
        found = container_item(self, members)
        if found is None:
            return None
        parent, attr, index = found
        shape: list[tuple[int, ...]] = []
        layout: list[torch.memory_format] = [torch.contiguous_format]

        def features(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            shape[:] = [tuple(batch["pixel_values"].shape[1:])]
            x = stop_before(getattr(parent, attr)[index], lambda: self(batch["pixel_values"]))
            # The block receives its input in the layout the model made it (NHWC after channels-last convolutions):
            # rows read back from the cache get that layout again, so the block computes exactly what it would.
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                layout[0] = torch.channels_last
            return {"x": x}

        def logits(batch: dict[str, Any], rows: dict[str, torch.Tensor]) -> torch.Tensor:
            x = rows["x"]
            if x.dim() == 4:
                x = x.contiguous(memory_format=layout[0])
            # What runs before the cut sees one blank image and is thrown away: the cached rows replace its output.
            blank = x.new_zeros((1, *shape[0]), dtype=torch.float32) if shape else None
            if blank is None:
                blank = torch.zeros((1, *self.data_config()["input_size"]), device=x.device)
            with start_at(parent, attr, index, x):
                return self(blank)

        return Split(group, features, logits, ("pixel_values",), lambda batch: self(batch["pixel_values"]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cached = self.prefix_cache is not None and "index" in batch
        logits = self.prefix_cache.logits(batch) if cached else self(batch["pixel_values"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        self.log_train_loss(loss, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: Any, stage: str) -> None:
        logits = self(batch["pixel_values"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=stage == "val")
        metrics.update(logits, batch["labels"])
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch["pixel_values"]).float().softmax(-1)
        conf, pred = probs.max(-1)
        return {"pred": pred, "confidence": conf, "probs": probs}

    def prediction_rows(self, prediction: dict[str, torch.Tensor], batch: Any, top_k: int = 5) -> list[dict]:
        """The image's id (its file), the predicted class, its probability, the top-k and the true class."""
        names = class_names_or_ids(self.class_names, prediction["probs"].shape[1])
        return class_rows(prediction["probs"], names, top_k, batch)

    def setup(self, stage: str) -> None:
        spec = data_spec(self.trainer.datamodule)
        check_sizes(spec, num_classes=self.num_classes)
        if len(spec.class_names) == self.num_classes:
            self.class_names = list(spec.class_names)

    def onnx_spec(self, model: nn.Module, data: dict[str, Any]) -> OnnxSpec:
        """``export --onnx``: ``pixel_values`` [batch, 3, H, W] in, logits out. H, W and the card's preprocessing
        are training's: timm's data config of ``model`` with the run's ``image_size``, ``crop_pct`` and
        ``interpolation`` (``data``), as ``ImageDataModule.resolve_data_config`` makes it."""
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(model))
        if data.get("image_size"):
            cfg["input_size"] = (3, int(data["image_size"]), int(data["image_size"]))
        cfg.update({k: data[k] for k in ("crop_pct", "interpolation") if data.get(k) is not None})
        keep = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}
        _, height, width = keep["input_size"]
        return OnnxSpec(
            module=model,
            inputs={"pixel_values": torch.zeros(2, *keep["input_size"])},
            dynamic={"pixel_values": {0: "batch"}},
            preprocessing=(
                f"Images are RGB, resized and cropped to {height}x{width} (crop_pct {cfg.get('crop_pct')}, crop_mode "
                f"{cfg.get('crop_mode', 'center')}, {cfg.get('interpolation')}), scaled to [0, 1] and normalised "
                f"with mean {tuple(cfg['mean'])} and std {tuple(cfg['std'])}: training's evaluation transform "
                "(timm's `create_transform`)."
            ),
            imports=["import numpy as np", "from PIL import Image", "from timm.data import create_transform"],
            snippet=[
                f"transform = create_transform({', '.join(f'{k}={v!r}' for k, v in keep.items())})",
                f"images = [Image.new('RGB', ({width}, {height}))]  # your images: Image.open(path).convert('RGB')",
                "feeds = {'pixel_values': np.stack([transform(image).numpy() for image in images])}",
            ],
        )
