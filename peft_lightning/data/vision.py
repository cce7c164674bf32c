"""Image classification data on Hugging Face ``datasets``: a hub name, a local image folder, or parquet/arrow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_lightning.data.base import FineTuneDataModule
from peft_lightning.data.checks import POSITIVE, PROBABILITY, DataSpec, check_options, increasing_pair, within
from peft_lightning.data.source import find_column, label_column_if_any, load_predict_table, local_path
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

IMAGENET_DEFAULT = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
"""timm's defaults (``timm.data.constants``): the preprocessing of data connected to no model's config."""


def is_image(feature: Any) -> bool:
    """Whether a column can hold images: a ``datasets.Image``, or ``{bytes, path}`` structs (parquet files written
    by other tools than ``datasets``); ``open_image`` reads both."""
    import datasets

    return isinstance(feature, datasets.Image) or (isinstance(feature, dict) and "bytes" in feature)


def image_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image and label columns: the named ones, else the first image column and the first ``ClassLabel``
    (else ``label``/``labels``)."""
    import datasets

    if label_column is None:
        label_column = next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
        label_column = label_column or next((k for k in ("label", "labels") if k in features), None)
    image = find_column(features, image_column, "image", is_image, "images: datasets.Image or {bytes, path} structs")
    return image, find_column(features, label_column, "label")


def open_image(value: Any) -> Any:
    """A PIL image from a ``datasets`` image cell (decoded or ``{"bytes", "path"}``); an unreadable, truncated or
    corrupt file stops with one line naming it."""
    if not isinstance(value, dict):
        return value
    import io

    from PIL import Image

    where = value.get("path") or "an embedded image"
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
    except Exception as err:
        raise UsageError(
            f"cannot read image {where} ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            "remove or replace the file"
        ) from None
    return image


class ImageDataModule(FineTuneDataModule):
    """Train/val/test image data with timm preprocessing for the model being tuned.

    The preprocessing (input size, mean/std, interpolation, crop) is the model's: ``connect(data_config=...)``
    hands it over (the CLI does, from ``ImageClassifier.data_config()``); ``image_size``, ``crop_pct`` and
    ``interpolation`` change it.

    Args:
        dataset: a hub name (``uoft-cs/cifar10``), a local image folder (class subfolders, optionally under
            ``train/`` ``validation/`` ``test/``), a parquet/arrow file (the train split) or a folder of them, or a
            ``save_to_disk`` folder; relative paths are local (``data/source.py``).
        image_column: column holding images (default: the first ``Image`` feature).
        label_column: column holding labels (default: the first ``ClassLabel``, else ``label``).
        image_size: square input side; default: the model's pretrained input size.
        crop_pct: eval centre-crop fraction; default: the model's (1.0 keeps small images whole).
        interpolation: resize filter (``bilinear``, ``bicubic``, ...); default: the model's.
        train_crop_scale: area range of the training random-resized-crop.
        train_crop_ratio: aspect-ratio range of that crop; with ``train_crop_scale`` (1, 1) and this (1, 1) the
            crop is a plain resize (only flips remain random).
        hflip: probability of a horizontal flip in training.
        auto_augment: timm auto-augment policy, e.g. ``rand-m9-mstd0.5``; None for none.
        augment: random crops/flips in training; False preprocesses training images like eval images
            (deterministic: what frozen-feature caching and exact-resume tests need).
        batch_size: per-device batch size.
        predict_data: what ``predict`` runs on: an image file, a folder of images (class subfolders, if any, give
            the true labels), or a parquet/arrow file or folder with an image column; default: the test split.
            The class names come from the checkpoint, so the training data need not be here.
        **kwargs: the options every data module has (splits, caps, workers, seed ...: ``FineTuneDataModule``).

    Example:
        >>> dm = ImageDataModule("my_images/", batch_size=32)  # doctest: +SKIP
        >>> dm.connect(data_config=model.data_config())  # doctest: +SKIP
    """

    source_kinds = "an image folder with class subfolders, parquet/arrow files or a save_to_disk folder"

    def __init__(
        self,
        dataset: str = "",
        image_column: str | None = None,
        label_column: str | None = None,
        image_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        train_crop_scale: tuple[float, float] = (0.08, 1.0),
        train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        augment: bool = True,
        batch_size: int = 64,  # the base's is 32 (text); images have always been batched by 64 here
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_options(
            image_size=(image_size, POSITIVE),
            crop_pct=(crop_pct, within(0, 1, closed_high=True)),
            train_crop_scale=(train_crop_scale, increasing_pair(within(0, 1, closed_high=True))),
            train_crop_ratio=(train_crop_ratio, increasing_pair(within(0, float("inf")))),
            hflip=(hflip, PROBABILITY),
        )
        super().__init__(dataset, batch_size=batch_size, predict_data=predict_data, **kwargs)
        self.class_names: list[str] = []
        self.model_data_config: dict[str, Any] | None = None  # what `connect` was given; None: not connected
        self.data_config: dict[str, Any] | None = None  # the preprocessing in use (resolve_data_config)
        self._test_rows: tuple[Any, str, str] | None = None  # the test split as read, its image and label columns

    def connect(self, data_config: dict[str, Any] | None = None) -> None:
        """Take the preprocessing of the model this data feeds: timm's data config (``ImageClassifier.data_config()``:
        input size, mean/std, interpolation, crop), to which ``image_size``, ``crop_pct`` and ``interpolation``
        apply. None: timm's ImageNet defaults (``IMAGENET_DEFAULT``), for a model without a config of its own.
        Call it before the data is set up; the CLI does."""
        self.model_data_config = dict(data_config if data_config is not None else IMAGENET_DEFAULT)

    @property
    def deterministic_train(self) -> bool:
        """Whether a training image always preprocesses to the same tensor (no random augmentation)."""
        return not self.hparams.augment

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) or None

    def spec(self) -> DataSpec:
        """The class count and names, once set up: what ``ImageClassifier`` checks its head against."""
        return DataSpec({"num_classes": len(self.class_names)} if self.class_names else {}, list(self.class_names))

    # --- the splits (FineTuneDataModule.build) ---
    def find_columns(self, ds: datasets.DatasetDict) -> tuple[datasets.DatasetDict, str | None]:
        hp = self.hparams
        features = ds[hp.train_split].features
        self._image_column, self.label_column = image_columns(features, hp.image_column, hp.label_column)
        return ds, self.label_column

    def read_labels(self, ds: datasets.DatasetDict) -> None:
        train, label = ds[self.hparams.train_split], self.label_column
        feature = train.features[label]
        if hasattr(feature, "names"):
            self.class_names = list(feature.names)
        else:
            self.class_names = [str(v) for v in sorted(set(train[label]))]
        self.data_config = self.resolve_data_config()

    def encode(self, split: str, rows: datasets.Dataset) -> Any:
        import datasets

        image_col, label_col = self._image_column, self.label_column
        rows = rows.select_columns([image_col, label_col])
        if isinstance(rows.features[image_col], datasets.Image):  # decoded in `_transform`, naming a bad file
            rows = rows.cast_column(image_col, datasets.Image(decode=False))
        if split == self.hparams.test_split:  # what predict runs on by default
            self._test_rows = (rows, image_col, label_col)
        return rows.with_transform(self._transform(split == self.hparams.train_split, image_col, label_col))

    # --- preprocessing ---
    def resolve_data_config(self) -> dict[str, Any]:
        """The connected model's preprocessing (``connect``) with ``image_size``/``crop_pct``/``interpolation``.
        Data never connected: ImageNet defaults when looked at on its own, an error when it feeds a ``Trainer``
        (the model's preprocessing, which this data cannot know, is what it should get)."""
        if self.model_data_config is None and self.trainer is not None:
            raise UsageError(
                f"{type(self).__name__} was not connected to the model it feeds: call "
                "data.connect(**model.data_needs()) before trainer.fit (the CLI does; data.connect() preprocesses "
                "for ImageNet)"
            )
        cfg = dict(self.model_data_config or IMAGENET_DEFAULT)
        if self.hparams.image_size is not None:
            cfg["input_size"] = (3, self.hparams.image_size, self.hparams.image_size)
        if self.hparams.crop_pct is not None:
            cfg["crop_pct"] = self.hparams.crop_pct
        if self.hparams.interpolation is not None:
            cfg["interpolation"] = self.hparams.interpolation
        return cfg

    def _transform(self, train: bool, image_col: str, label_col: str):
        from timm.data import create_transform

        hp = self.hparams
        cfg = self.data_config or IMAGENET_DEFAULT
        common = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std")}
        if train and hp.augment:
            tf = create_transform(
                **common,
                is_training=True,
                scale=hp.train_crop_scale,
                ratio=hp.train_crop_ratio,
                hflip=hp.hflip,
                auto_augment=hp.auto_augment,
                color_jitter=None,
            )
        else:
            tf = create_transform(**common, crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))

        def apply(batch: dict[str, list]) -> dict[str, Any]:
            # Grey, palette and RGBA images all become RGB: pretrained models expect three channels.
            images = [tf(img.convert("RGB") if img.mode != "RGB" else img) for img in map(open_image, batch[image_col])]
            return {"pixel_values": images, "labels": batch[label_col]}

        return apply

    # --- what predict runs on ---
    def test_predict_set(self) -> Any:
        """The test split with ids and the true class names beside each image."""
        rows, image_col, label_col = self._test_rows
        return rows.with_transform(self._predict_transform(image_col, label_col, self.class_names))

    def new_predict_set(self, source: str) -> Any:
        """The images ``predict_data`` names, with their ids (file paths) and true labels when it has them."""
        import datasets
        from PIL import Image

        self.data_config = self.data_config or self.resolve_data_config()
        path = local_path(source)
        if path is not None and path.is_file() and path.suffix.lower() in Image.registered_extensions():
            table = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
        else:
            what = "an image file, a folder of images, or parquet/arrow files with an image column"
            table = load_predict_table(source, self.hparams.test_split, self.hparams.cache_dir, what)
        features = table.features
        image_col = find_column(features, self.hparams.image_column, "image", is_image, "images")
        label_col, names = label_column_if_any(features, self.hparams.label_column)
        table = table.select_columns([c for c in (image_col, label_col) if c])
        if isinstance(table.features[image_col], datasets.Image):
            table = table.cast_column(image_col, datasets.Image(decode=False))
        return table.with_transform(self._predict_transform(image_col, label_col, names))

    def _predict_transform(self, image_col: str, label_col: str | None, names: list[str] | None):
        """Eval preprocessing plus each image's ``id`` (its file path; empty for an embedded image) and ``target``
        (the true class name) when there is a label column."""
        evaluate = self._transform(False, image_col, label_col or image_col)

        def apply(batch: dict[str, list]) -> dict[str, Any]:
            out = {"pixel_values": evaluate(batch)["pixel_values"]}
            # An embedded image has no path: its id is left empty, and the writer fills in its row.
            out["id"] = [str(cell.get("path") or "") if isinstance(cell, dict) else "" for cell in batch[image_col]]
            if label_col is not None:
                out["target"] = [str(names[v] if names is not None and v is not None else v) for v in batch[label_col]]
            return out

        return apply
