"""Object detection: torchvision's FCOS head and feature pyramid over any timm backbone.

Why FCOS from torchvision (docs/detection.md says more): torchvision ships with torch and is maintained with it,
its FCOS is anchor-free (one point per location: no anchor shapes to tune per dataset) and its pieces (FPN, head,
loss, decoding, NMS) are separate modules, so the task can run them itself, cut the model at the neck for the prefix
cache and give any timm backbone (``forward_intermediates``) the pyramid. ``effdet`` 0.4.1 also works with timm
1.0.31 here, but is unmaintained since 2023, scripts its anchors with the deprecated ``torch.jit.script`` and
pulls in ``omegaconf``.

The model: ``model.backbone.body`` (the timm network, cut after its last pyramid level), ``model.backbone.fpn``
(torchvision's ``FeaturePyramidNetwork``, P6/P7 added when ``extra_levels``) and ``model.head`` (``FCOSHead``). Its
layer groups, input side first: ``stem``, ``blocks.N`` (timm's), ``neck``, ``head``. ``forward(images)`` gives the
raw head outputs, one row per location of every level: ``[batch, locations, classes + 4 box + 1 centerness]``; the
loss and the boxes are computed from them.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_lightning import adapters
from peft_lightning.data.checks import check_sizes, data_spec
from peft_lightning.engine.blocks import BLOCK_MODULES
from peft_lightning.errors import UsageError
from peft_lightning.tasks.base import FineTuneTask, LayerGroups, Snippet
from peft_lightning.tasks.vision import load_state_dict, name_groups

if TYPE_CHECKING:
    from peft_lightning.prefix import Split

LEVELS = (-3, -2, -1)
"""The backbone's last three feature levels (strides 8, 16 and 32 in most networks) feed the pyramid."""


class TimmPyramid(nn.Module):
    """A timm network's last feature levels through torchvision's FPN: torchvision's ``BackboneWithFPN`` for timm."""

    def __init__(self, body: nn.Module, channels: int, extra_levels: bool) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        super().__init__()
        self.body = body
        info = body.feature_info
        self.in_channels = [info[i]["num_chs"] for i in LEVELS]
        self.strides = [info[i]["reduction"] for i in LEVELS]
        extra = LastLevelP6P7(channels, channels) if extra_levels else None
        if extra_levels:
            self.strides += [self.strides[-1] * 2, self.strides[-1] * 4]
        self.fpn = FeaturePyramidNetwork(self.in_channels, channels, extra_blocks=extra)
        self.out_channels = channels

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels that feed the pyramid."""
        return self.body.forward_intermediates(images, indices=list(LEVELS), intermediates_only=True)

    def pyramid(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((str(i), p) for i, p in enumerate(self.pyramid(self.features(images))))


class DetectionTask(FineTuneTask):
    """Object detection: FCOS (torchvision) with an FPN over a timm backbone, boxes in pixels (``xyxy`` inside).

    Args:
        model_name: the timm backbone (``tf_efficientnet_lite0``, ``resnet50`` ...); its classifier is dropped.
        num_classes: object classes (no background class: FCOS scores each class with a sigmoid).
        pretrained: the backbone's pretrained weights from the Hugging Face hub / timm's URL.
        checkpoint_path: local backbone weights (a timm state_dict: safetensors or torch, ``weights_only``)
            instead of the hub's; a classifier in them is skipped.
        init_from: the whole detector's weights (``model.safetensors`` that ``export --merge`` writes).
        image_size: the square input side; the data letterboxes every image to it.
        fpn_channels: the pyramid's and the head's width (torchvision's FCOS: 256).
        extra_levels: add P6 and P7 (strides 64, 128) above the backbone's levels, for objects over ~250 px.
        head_convs: 3x3 convolutions in each head branch before its prediction (torchvision's FCOS: 4).
        score_thresh: detections scoring below this are dropped.
        nms_thresh: IoU above which non-maximum suppression drops the lower-scoring box of a class.
        detections_per_img: most detections kept per image.
        **kwargs: optimizer and schedule, see ``FineTuneTask``.

    Example:
        >>> model = DetectionTask("test_efficientnet", num_classes=3, pretrained=False, image_size=64)  # doctest: +SKIP
    """

    domain = "detection"
    library = "torchvision"
    monitor = "val/map"
    monitor_mode = "max"
    # Adapters on the backbone's numbered blocks (an EfficientNet's conv_pw/conv_pwl, a ResNet's conv1-3): the
    # pyramid and the head are new, so they train in full beside them (``adapter_head``).
    default_adapter_targets = BLOCK_MODULES

    def __init__(
        self,
        model_name: str = "tf_efficientnet_lite0",
        num_classes: int = 10,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        init_from: str | None = None,
        image_size: int = 512,
        fpn_channels: int = 256,
        extra_levels: bool = True,
        head_convs: int = 4,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or image_size < 32 or fpn_channels % 32:
            raise UsageError(
                f"num_classes must be >= 1, image_size >= 32 and fpn_channels a multiple of 32 (the head's "
                f"GroupNorm), got {num_classes}, {image_size}, {fpn_channels}"
            )
        self.save_hyperparameters()
        self.num_classes = num_classes
        self._grid: list[tuple[int, int]] = []  # each level's (h, w) at the last forward: where the points lie
        detector = self.build_model()
        if init_from is not None:
            detector.load_state_dict(load_state_dict(init_from))
        self.model = self.add_adapters(detector, base_name=model_name)
        from torchmetrics.detection import MeanAveragePrecision

        self.val_map = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")

    # --- model ---
    def base_weights(self) -> dict[str, torch.Tensor] | None:
        """The backbone's weights when they come from a file (``checkpoint_path``); None: timm's (or none). A
        recipe whose weights come from elsewhere overrides it."""
        path = self.hparams.checkpoint_path
        return load_state_dict(path) if path is not None else None

    def build_model(self) -> nn.Module:
        """The timm backbone with its weights, cut after its last pyramid level, under a new FPN and FCOS head."""
        import timm
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.fcos import FCOS, FCOSHead

        hp = self.hparams
        weights = None if hp.init_from else self.base_weights()
        try:
            body = timm.create_model(hp.model_name, pretrained=hp.pretrained and weights is None and not hp.init_from)
        except RuntimeError as err:
            if "Unknown model" not in str(err):
                raise
            raise UsageError(f"unknown timm model {hp.model_name!r}: see timm.list_models()") from None
        except (OSError, ValueError):  # hub unreachable or nothing cached
            raise UsageError(
                f"could not fetch pretrained weights for {hp.model_name!r} from the Hugging Face hub (offline and "
                "not cached?): pass local weights with --model.checkpoint_path FILE, or --model.pretrained false"
            ) from None
        if weights is not None:
            own = body.state_dict()
            try:  # the classifier of the file (and its size) does not matter: it is cut off below
                body.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape})
            except RuntimeError as err:
                missing = str(err).split("Missing key(s) in state_dict:", 1)[-1].strip().split(",")[0]
                raise UsageError(
                    f"weights do not fit {hp.model_name} (missing or mis-shaped: {missing} ...): is it a checkpoint "
                    "of another architecture?"
                ) from None
        try:
            body.prune_intermediate_layers(list(LEVELS), prune_head=True, prune_norm=True)
        except (AttributeError, NotImplementedError):
            raise UsageError(
                f"timm's {hp.model_name} cannot give intermediate features: pick another backbone"
            ) from None
        pyramid = TimmPyramid(body, hp.fpn_channels, hp.extra_levels)
        self._fresh = ["model.backbone.fpn", "model.head"] + (
            [] if hp.pretrained or weights else ["model.backbone.body"]
        )
        anchors = AnchorGenerator(tuple((s,) for s in pyramid.strides), ((1.0,),) * len(pyramid.strides))
        return FCOS(
            pyramid,
            self.num_classes,
            # FCOS's own forward (a list of images in [0, 1]: what the model card's snippet calls) letterboxes and
            # normalises as the data module does, and maps boxes back to each image's pixels.
            min_size=hp.image_size,
            max_size=hp.image_size,
            image_mean=list(body.pretrained_cfg["mean"]),
            image_std=list(body.pretrained_cfg["std"]),
            anchor_generator=anchors,
            head=FCOSHead(hp.fpn_channels, 1, self.num_classes, num_convs=hp.head_convs),
            score_thresh=hp.score_thresh,
            nms_thresh=hp.nms_thresh,
            detections_per_img=hp.detections_per_img,
        )

    @property
    def detector(self) -> nn.Module:
        """torchvision's ``FCOS`` (with its adapter layers, if any)."""
        return adapters.unwrap(self.model)

    def fresh_modules(self) -> list[str]:
        """The pyramid and the head; the backbone too without pretrained weights."""
        return list(self._fresh)

    def adapter_head(self, model: nn.Module) -> list[str]:
        return ["backbone.fpn", "head"]

    def layer_groups(self) -> LayerGroups:
        from timm.models import group_parameters

        prefix = "model." + adapters.inner_prefix(self.model)
        body = self.detector.backbone.body
        groups = group_parameters(body, body.group_matcher(coarse=True))
        named = [(n, [f"{prefix}backbone.body.{p}" for p in ps]) for n, ps in name_groups(groups, n_head=0)]
        params = [n for n, _ in self.named_parameters()]
        for name, where in (("neck", f"{prefix}backbone.fpn."), ("head", f"{prefix}head.")):
            named.append((name, [n for n in params if n.startswith(where)]))
        return named

    def data_needs(self) -> dict[str, Any]:
        """The input side and the backbone's normalisation: ``DetectionDataModule.connect(...)``."""
        cfg = self.detector.backbone.body.pretrained_cfg
        return {"image_size": self.hparams.image_size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}

    # --- forward: the raw outputs, then the loss or the boxes ---
    def heads(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """The head on the pyramid's levels: ``[batch, locations, classes + 5]``."""
        self._grid = [tuple(p.shape[-2:]) for p in pyramid]
        out = self.detector.head(pyramid)
        return torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(self.detector.backbone.pyramid(self.detector.backbone.features(images)))

    def _outputs(self, raw: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[int]]:
        """The head's outputs by name, each image's points (torchvision's anchors) and the locations per level."""
        from torchvision.models.detection.image_list import ImageList

        k = self.num_classes
        heads = {"cls_logits": raw[..., :k], "bbox_regression": raw[..., k : k + 4], "bbox_ctrness": raw[..., k + 4 :]}
        size = self.hparams.image_size
        images = ImageList(raw.new_empty(len(raw), 0, size, size), [(size, size)] * len(raw))
        levels = [raw.new_empty(len(raw), 0, h, w) for h, w in self._grid]
        return heads, self.detector.anchor_generator(images, levels), [h * w for h, w in self._grid]

    def losses(self, raw: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """FCOS's focal, GIoU and centerness losses of ``raw`` against the batch's boxes."""
        heads, points, per_level = self._outputs(raw.float())
        targets = [{"boxes": b, "labels": c} for b, c in zip(batch["boxes"], batch["labels"])]
        return self.detector.compute_loss(targets, heads, points, per_level)

    def detections(self, raw: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each image's ``boxes`` (xyxy, input pixels), ``scores`` and ``labels`` after thresholding and NMS."""
        heads, points, per_level = self._outputs(raw.float())
        split = {k: list(v.split(per_level, dim=1)) for k, v in heads.items()}
        size = self.hparams.image_size
        return self.detector.postprocess_detections(
            split, [list(p.split(per_level)) for p in points], [(size, size)] * len(raw)
        )

    def prefix_split(self, group: str) -> Split | None:
        """Cut where the backbone ends (``neck``: the cached rows are its feature levels) or the pyramid does
        (``head``: the pyramid's levels). Inside the backbone the levels come from several blocks: not cut there."""
        from peft_lightning.prefix import Split

        pyramid = self.detector.backbone
        if group == "neck":
            run, rest = pyramid.features, lambda feats: self.heads(pyramid.pyramid(feats))
        elif group == "head":
            run, rest = lambda x: pyramid.pyramid(pyramid.features(x)), self.heads
        else:
            return None
        return Split(
            group,
            lambda batch: {f"level{i}": f for i, f in enumerate(run(batch["pixel_values"]))},
            lambda batch, rows: rest([rows[f"level{i}"] for i in range(len(rows))]),
            ("pixel_values",),
            lambda batch: self(batch["pixel_values"]),
        )

    # --- steps ---
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        cached = self.prefix_cache is not None and "index" in batch
        raw = self.prefix_cache.logits(batch) if cached else self(batch["pixel_values"])
        losses = self.losses(raw, batch)
        loss = sum(losses.values())
        self.log_train_loss(loss, batch_size=len(batch["boxes"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], metric: Any, stage: str) -> None:
        raw = self(batch["pixel_values"])
        self.log(f"{stage}/loss", sum(self.losses(raw, batch).values()), batch_size=len(raw))
        targets = [{"boxes": b, "labels": c} for b, c in zip(batch["boxes"], batch["labels"])]
        metric.update(self.detections(raw), targets)

    def _log_map(self, metric: Any, stage: str) -> None:
        result = metric.compute()
        self.log_dict({f"{stage}/{k}": result[k] for k in ("map", "map_50", "map_75")}, prog_bar=stage == "val")
        metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        found = self.detections(self(batch["pixel_values"]))
        for det, scale in zip(found, batch["scale"]):  # back to the original image's pixels
            det["boxes"] = det["boxes"] / scale
        return found

    def prediction_rows(self, prediction: list[dict[str, torch.Tensor]], batch: Any, top_k: int = 5) -> list[dict]:
        """Per image: its ``id`` (path), the ``boxes`` found (``[x1, y1, x2, y2]`` in the original image's pixels),
        their class names (``labels``) and ``scores``, best first; and the true ``true_boxes`` / ``true_labels``
        when the data has them. ``top_k`` does not apply: every detection over ``score_thresh`` is written."""
        names = (
            self.class_names if len(self.class_names) == self.num_classes else [str(i) for i in range(self.num_classes)]
        )
        ids = list(batch.get("id") or [""] * len(prediction))
        rows = []
        for j, det in enumerate(prediction):
            row = {"id": ids[j], "boxes": [[round(v, 2) for v in b] for b in det["boxes"].tolist()]}
            row |= {"labels": [names[c] for c in det["labels"].tolist()], "scores": det["scores"].tolist()}
            if "boxes" in batch:
                scale = float(batch["scale"][j])
                row["true_boxes"] = [[round(v / scale, 2) for v in b] for b in batch["boxes"][j].tolist()]
                row["true_labels"] = [names[c] for c in batch["labels"][j].tolist()]
            rows.append(row)
        return rows

    def setup(self, stage: str) -> None:
        spec = data_spec(self.trainer.datamodule)
        check_sizes(spec, num_classes=self.num_classes)
        if len(spec.class_names) == self.num_classes:
            self.class_names = list(spec.class_names)

    # --- export and its model card ---
    def weights_source(self) -> str:
        hp = self.hparams
        if hp.init_from:
            return f"the detector weights in `{hp.init_from}`"
        if hp.checkpoint_path:
            return f"the local backbone weights `{hp.checkpoint_path}` (pyramid and head new)"
        if not hp.pretrained:
            return "nowhere: randomly initialised (`pretrained=False`)"
        return f"timm's pretrained `{hp.model_name}` backbone (Hugging Face hub / timm's URL); pyramid and head new"

    def merged_option(self, whole_task: bool = False) -> str:
        """``--model.init_from``: ``model.safetensors`` is the detector's state_dict."""
        return "--model.init_from"

    def _recipe_call(self, **given: Any) -> str:
        keep = ("model_name", "num_classes", "pretrained", "checkpoint_path", "image_size", "fpn_channels")
        keep += ("extra_levels", "head_convs", "score_thresh", "nms_thresh", "detections_per_img")
        args = {**{k: self.hparams[k] for k in keep}, **given}
        return f"{type(self).__qualname__}({', '.join(f'{k}={v!r}' for k, v in args.items())}).model"

    def base_snippet(self) -> Snippet:
        """The recipe builds the detector without adapters: torchvision's ``FCOS``, called on a list of images."""
        cls = type(self)
        return Snippet(
            [f"from {cls.__module__} import {cls.__qualname__}"],
            [f"base = {self._recipe_call()}  # torchvision FCOS: base.eval()([image]) -> boxes, labels, scores"],
        )

    def merged_snippet(self, path: Path) -> Snippet:
        """The recipe builds the detector (no weights read) and the export is loaded into it."""
        cls = type(self)
        return Snippet(
            [f"from {cls.__module__} import {cls.__qualname__}", "from safetensors.torch import load_file"],
            [
                f"merged = {self._recipe_call(pretrained=False, checkpoint_path=None)}",
                f"merged.load_state_dict(load_file({str(path)!r}))  # merged.eval()([image in [0, 1]]) -> boxes",
            ],
        )
