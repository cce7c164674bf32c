"""Image classification data on Hugging Face ``datasets``: a hub name, a local image folder, or parquet/arrow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from peft_lightning.data.checks import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    DataSpec,
    check_options,
    increasing_pair,
    within,
)
from peft_lightning.data.sampling import RowNumbers, train_loader
from peft_lightning.data.source import find_column, load_source
from peft_lightning.data.splits import carve
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


def is_image(feature: Any) -> bool:
    """Whether a column can hold images: a ``datasets.Image``, or ``{bytes, path}`` structs (parquet files written
    by other tools than ``datasets``); ``open_image`` reads both."""
    import datasets

    return isinstance(feature, datasets.Image) or (isinstance(feature, dict) and "bytes" in feature)


def find_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
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


class ImageDataModule(LightningDataModule):
    """Train/val/test image data with timm preprocessing for the model being tuned.

    Args:
        dataset: a hub name (``uoft-cs/cifar10``), a local image folder (class subfolders, optionally under
            ``train/`` ``validation/`` ``test/``), a parquet/arrow file (the train split) or a folder of them, or a
            ``save_to_disk`` folder; relative paths are local (``data/source.py``).
        config_name: the hub dataset's configuration, if it has several.
        train_split: name of the training split.
        val_split: name of the validation split; when the dataset has none, ``val_fraction`` of train is carved
            out, stratified by label and seeded.
        test_split: name of the test split; carved from train like ``val_split`` when missing.
        val_fraction: fraction of train used for a missing val (and test) split.
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
        eval_batch_size: per-device batch size for val/test/predict (default: 2 × batch_size).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (speeds up copies to a GPU).
        persistent_workers: keep workers alive between epochs.
        max_train_samples: use a seeded random subset of this many training images.
        max_val_samples: cap on validation images.
        max_test_samples: cap on test images.
        seed: seed of the splits and subsets, and of the training order (epoch e: seed + e).
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        predict_data: what ``predict`` runs on: an image file, a folder of images (class subfolders, if any, give
            the true labels), or a parquet/arrow file or folder with an image column; default: the test split.
            The class names come from the checkpoint, so the training data need not be here.
    """

    def __init__(
        self,
        dataset: str = "",
        config_name: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        val_fraction: float = 0.1,
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
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
        predict_data: str | None = None,
    ) -> None:
        super().__init__()
        # Checked here: a bad value would otherwise fail later, inside a DataLoader worker.
        check_options(
            val_fraction=(val_fraction, within(0, 0.5)),
            image_size=(image_size, POSITIVE),
            crop_pct=(crop_pct, within(0, 1, closed_high=True)),
            train_crop_scale=(train_crop_scale, increasing_pair(within(0, 1, closed_high=True))),
            train_crop_ratio=(train_crop_ratio, increasing_pair(within(0, float("inf")))),
            hflip=(hflip, PROBABILITY),
            batch_size=(batch_size, POSITIVE),
            eval_batch_size=(eval_batch_size, POSITIVE),
            num_workers=(num_workers, NON_NEGATIVE),
            max_train_samples=(max_train_samples, POSITIVE),
            max_val_samples=(max_val_samples, POSITIVE),
            max_test_samples=(max_test_samples, POSITIVE),
            seed=(seed, NON_NEGATIVE),
        )
        self.save_hyperparameters()
        self.splits: dict[str, Any] = {}
        self.class_names: list[str] = []
        self.data_config: dict[str, Any] | None = None
        self.predict_set: Any = None

    # --- loading ---
    def load_splits(self) -> datasets.DatasetDict:
        """Return the raw splits. Subclasses override this for sources ``datasets`` cannot read."""
        return load_source(
            self.hparams.dataset,
            self.hparams.config_name,
            self.hparams.cache_dir,
            "an image folder with class subfolders, parquet/arrow files or a save_to_disk folder",
        )

    def prepare_data(self) -> None:
        if self.hparams.predict_data and self.trainer is not None and self.trainer.predicting:
            return  # predict on new data: the training data is not needed
        self.load_splits()  # downloads once, on one process; `setup` then reads the cache

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_data:  # new data: the training splits are not needed
            self.data_config = self.data_config or self.resolve_data_config()
            self.predict_set = self.predict_set or self._new_predict_set(self.hparams.predict_data)
            return
        if self.splits:
            return
        import datasets

        hp = self.hparams
        ds = self.load_splits()
        if hp.train_split not in ds:
            raise UsageError(
                f"the dataset has no split {hp.train_split!r} (splits: {', '.join(ds)}): pass --data.train_split NAME"
            )
        image_col, label_col = find_columns(ds[hp.train_split].features, hp.image_column, hp.label_column)
        for split in (hp.test_split, hp.val_split):  # carve test first so val never overlaps it
            if split not in ds:
                carve(ds, hp.train_split, split, hp.val_fraction, hp.seed, label_col)
        self.label_column = label_col
        feature = ds[hp.train_split].features[label_col]
        if hasattr(feature, "names"):
            self.class_names = list(feature.names)
        else:
            self.class_names = [str(v) for v in sorted(set(ds[hp.train_split][label_col]))]
        caps = {
            hp.train_split: hp.max_train_samples,
            hp.val_split: hp.max_val_samples,
            hp.test_split: hp.max_test_samples,
        }
        self.data_config = self.resolve_data_config()
        for split, cap in caps.items():
            d = ds[split].select_columns([image_col, label_col])
            if isinstance(d.features[image_col], datasets.Image):  # decoded in `_transform`, naming a bad file
                d = d.cast_column(image_col, datasets.Image(decode=False))
            if len(d) == 0:
                raise UsageError(f"split {split!r} is empty: check --data.dataset and the split names")
            if cap is not None and cap < len(d):
                d = d.shuffle(seed=hp.seed).select(range(cap))
            self.splits[split] = d.with_transform(self._transform(split == hp.train_split, image_col, label_col))
            if split == hp.test_split:  # predict on the test split: ids and the true class names beside each image
                self.predict_set = d.with_transform(self._predict_transform(image_col, label_col, self.class_names))

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

    # --- preprocessing ---
    def resolve_data_config(self) -> dict[str, Any]:
        """timm's preprocessing of the attached model (or ImageNet defaults), with ``image_size``/``crop_pct``."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        from peft_lightning.tasks.vision import ImageClassifier

        cfg = dict(module.data_config()) if isinstance(module, ImageClassifier) else dict(IMAGENET_DEFAULT)
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

    def _new_predict_set(self, source: str) -> Any:
        """The images ``predict_data`` names, with their ids (file paths) and true labels when it has them."""
        import datasets
        from PIL import Image

        from peft_lightning.data.source import load_predict_table, local_path

        path = local_path(source)
        if path is not None and path.is_file() and path.suffix.lower() in Image.registered_extensions():
            table = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
        else:
            what = "an image file, a folder of images, or parquet/arrow files with an image column"
            table = load_predict_table(source, self.hparams.test_split, self.hparams.cache_dir, what)
        features = table.features
        image_col = find_column(features, self.hparams.image_column, "image", is_image, "images")
        label_col = self.hparams.label_column if self.hparams.label_column in features else None
        label_col = label_col or next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
        label_col = label_col or next((k for k in ("label", "labels") if k in features), None)
        if label_col is not None and hasattr(features[label_col], "names"):
            names = list(features[label_col].names)
        else:
            names = None  # labels written as names already (or no labels)
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

    # --- loaders ---
    def _loader(self, split: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        if not self.splits:
            self.setup()
        workers = hp.num_workers
        kwargs = {
            "num_workers": workers,
            "pin_memory": hp.pin_memory and torch.cuda.is_available(),
            "persistent_workers": hp.persistent_workers and workers > 0,
        }
        if train:  # an epoch-seeded order, resumed mid-epoch where it stopped (data/sampling.py)
            return train_loader(
                self, RowNumbers(self.splits[split], label_column=self.label_column), hp.batch_size, hp.seed, **kwargs
            )
        return DataLoader(self.splits[split], batch_size=hp.eval_batch_size or 2 * hp.batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split)

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.predict_set is None:
            self.setup("predict")
        workers = hp.num_workers
        return DataLoader(
            self.predict_set,
            batch_size=hp.eval_batch_size or 2 * hp.batch_size,
            num_workers=workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
        )
