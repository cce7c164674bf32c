"""Object detection data: images with boxes and their classes, from COCO JSON files or ``datasets`` tables.

Two sources, one layout (``image``, ``objects: {bbox, category}``, as the hub's detection sets have it):

- a COCO annotation file (``instances.json``: ``images``, ``annotations``, ``categories``) as the train split, or a
  folder of them named after the splits (``train.json``, ``validation.json`` or ``val.json``, ``test.json``); image
  paths are relative to ``image_root`` (default: the file's folder);
- anything ``data/source.py`` reads (a hub name, parquet, a ``save_to_disk`` folder) with an image column and box
  and label columns (``objects.bbox`` and ``objects.category`` by default: a dotted name reads a field of a struct).

Boxes are in pixels of the original image, ``xywh`` (COCO's ``[x, y, width, height]``, the default) or ``xyxy``
(``[x1, y1, x2, y2]``): ``box_format``. Images are letterboxed to the model's square ``image_size`` (scaled so the
longer side fits, padded right and below with the mean colour), their boxes scaled with them; ``predict`` scales
the boxes it finds back to the original pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from peft_lightning.data.base import FineTuneDataModule
from peft_lightning.data.checks import POSITIVE, PROBABILITY, DataSpec, check_options
from peft_lightning.data.source import find_column, load_predict_table, local_path
from peft_lightning.data.vision import IMAGENET_DEFAULT, is_image, open_image
from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import datasets

BoxFormat = Literal["xywh", "xyxy"]
SLACK = 1.0
"""How far (pixels) a box may reach past the image border and be clipped to it: rounding in annotation tools."""


# --- COCO files ---
def coco_files(path: Path, splits: dict[str, tuple[str, ...]]) -> dict[str, Path] | None:
    """The COCO annotation file of each split ``path`` names (a ``.json`` file: train), or None when it is not COCO."""
    if path.is_file() and path.suffix == ".json":
        return {"train": path}
    if path.is_dir():
        found = {
            split: [path / f"{name}.json" for name in names if (path / f"{name}.json").is_file()]
            for split, names in splits.items()
        }
        return {split: files[0] for split, files in found.items() if files} or None
    return None


def read_coco(file: Path, image_root: Path, box_format: BoxFormat, clip: bool) -> tuple[dict[str, list], list[str]]:
    """One COCO annotation file as columns (``image`` paths, ``width``, ``height``, ``objects``: boxes in ``xyxy``
    and category indices in ``categories`` order by id) and the category names; checked as it is read."""
    try:
        coco = json.loads(file.read_text() or "null")
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot read COCO annotations {str(file)!r} ({type(err).__name__}): is it a JSON file?"
        ) from None
    if not isinstance(coco, dict) or not coco.get("images") or not coco.get("annotations"):
        raise UsageError(
            f"{str(file)!r} is an empty annotation file (no images or no annotations): pass a COCO file with "
            "`images`, `annotations` and `categories`"
        )
    categories = sorted(coco.get("categories") or [], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    objects: dict[Any, dict[str, list]] = {im["id"]: {"bbox": [], "category": []} for im in coco["images"]}
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in coco["images"]}
    for a in coco["annotations"]:
        if a.get("category_id") not in index:
            raise UsageError(
                f"annotation {a.get('id')} in {file.name} has category id {a.get('category_id')}, which its "
                f"`categories` do not list ({', '.join(str(k) for k in index) or 'none'}): fix the file"
            )
        if a.get("image_id") not in objects:
            raise UsageError(f"annotation {a.get('id')} in {file.name} names image id {a.get('image_id')}, not listed")
        width, height = sizes[a["image_id"]]
        box = checked_box(a["bbox"], box_format, width, height, clip, f"annotation {a.get('id')} in {file.name}")
        objects[a["image_id"]]["bbox"].append(box)
        objects[a["image_id"]]["category"].append(index[a["category_id"]])
    paths = []
    for im in coco["images"]:
        path = image_root / im["file_name"]
        if not path.is_file():
            raise UsageError(
                f"image {im['file_name']!r} of {file.name} is missing ({path}): add it, or pass --data.image_root "
                "with the folder the file names are relative to"
            )
        paths.append(str(path))
    columns = {
        "image": paths,
        "width": [sizes[im["id"]][0] or 0 for im in coco["images"]],
        "height": [sizes[im["id"]][1] or 0 for im in coco["images"]],
        "objects": [objects[im["id"]] for im in coco["images"]],
    }
    return columns, [str(c.get("name", c["id"])) for c in categories]


def checked_box(box: Any, box_format: BoxFormat, width: Any, height: Any, clip: bool, where: str) -> list[float]:
    """``box`` as ``[x1, y1, x2, y2]``; stops when it is not 4 numbers, is empty, or lies outside the image
    (``width`` x ``height``, when known) by more than ``SLACK`` pixels; within that, or with ``clip``, clipped."""
    try:
        x1, y1, a, b = (float(v) for v in box)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: box {box!r} is not 4 numbers ({box_format})") from None
    x2, y2 = (x1 + a, y1 + b) if box_format == "xywh" else (a, b)
    if not (x2 > x1 and y2 > y1):
        raise UsageError(
            f"{where}: box {box!r} has no area as {box_format}: fix it, or pass --data.box_format "
            f"{'xyxy' if box_format == 'xywh' else 'xywh'} if that is what the boxes are"
        )
    if width and height:
        outside = x1 < -SLACK or y1 < -SLACK or x2 > width + SLACK or y2 > height + SLACK
        if outside and not clip:
            raise UsageError(
                f"{where}: box {box!r} ({box_format}) lies outside its {width}x{height} image: fix it, pass "
                "--data.box_format if the boxes are in the other format, or --data.clip_boxes true to clip them"
            )
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if not (x2 > x1 and y2 > y1):
            raise UsageError(f"{where}: box {box!r} ({box_format}) lies wholly outside its {width}x{height} image")
    return [x1, y1, x2, y2]


def field(row: dict[str, Any], column: str) -> Any:
    """``row[column]``; a dotted name reads a field of a struct column (``objects.bbox``)."""
    head, _, rest = column.partition(".")
    value = row[head]
    return value[rest] if rest else value


def letterbox(image: Any, size: int, mean: tuple, std: tuple, flip: bool = False) -> tuple[torch.Tensor, float]:
    """``image`` (PIL) scaled so its longer side is ``size``, normalised, padded right and below with zeros (the
    mean colour) to ``size`` x ``size``, flipped left-right if asked; and the scale."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    scale = size / max(w, h)
    resized = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = pil_to_tensor(resized).float().div_(255)
    pixels = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, : pixels.shape[1], : pixels.shape[2]] = pixels
    return out, scale


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked; each image's ``boxes`` and ``labels`` a list (their counts differ); ``index`` and ``scale``
    as tensors."""
    out: dict[str, Any] = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    for key in ("boxes", "labels"):
        if key in rows[0]:
            out[key] = [r[key] for r in rows]
    for key in ("index", "scale"):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] for r in rows])
    return out


class DetectionDataModule(FineTuneDataModule):
    """Train/val/test images with boxes, letterboxed to the model's input size.

    The model hands over its input size and normalisation through ``connect`` (``DetectionTask.data_needs()``).

    Args:
        dataset: a COCO annotation file (the train split), a folder of COCO files named after the splits
            (``train.json``, ``validation.json``/``val.json``, ``test.json``), or a hub name / parquet / arrow /
            ``save_to_disk`` source with image, box and label columns (``data/source.py``).
        image_root: the folder COCO ``file_name`` paths are relative to (default: the annotation file's folder).
        image_column: the column holding images (default: the first image column).
        boxes_column: the column of each image's boxes, in pixels (a dotted name reads a struct's field).
        labels_column: the column of each box's class (ids; a ``ClassLabel`` names them).
        box_format: ``xywh`` (COCO: x, y of the top-left corner, width, height) or ``xyxy`` (x1, y1, x2, y2).
        clip_boxes: clip boxes that reach past the image border instead of stopping (a box within 1 px of the
            border is always clipped).
        hflip: probability of flipping a training image (and its boxes) left-right; 0 makes training inputs
            deterministic, which the prefix cache needs.
        batch_size: per-device batch size.
        predict_data: what ``predict`` runs on: an image file, a folder of images, a COCO file, or a table with an
            image column; default: the test split.
        **kwargs: the options every data module has (splits, caps, workers, seed ...: ``FineTuneDataModule``).

    Example:
        >>> dm = DetectionDataModule("annotations/instances_train.json", image_root="images/")  # doctest: +SKIP
        >>> dm.connect(**model.data_needs())  # doctest: +SKIP
    """

    source_kinds = (
        "a COCO annotation file, a folder of COCO files per split, parquet/arrow files or a save_to_disk folder"
    )

    def __init__(
        self,
        dataset: str = "",
        image_root: str | None = None,
        image_column: str | None = None,
        boxes_column: str = "objects.bbox",
        labels_column: str = "objects.category",
        box_format: BoxFormat = "xywh",
        clip_boxes: bool = False,
        hflip: float = 0.5,
        batch_size: int = 8,
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_options(hflip=(hflip, PROBABILITY), batch_size=(batch_size, POSITIVE))
        super().__init__(dataset, batch_size=batch_size, predict_data=predict_data, **kwargs)
        # Each image has a list of boxes, not one label: cached epochs still read them from the rows (RowNumbers
        # serves `{index, labels}` rows only where a label is one value); the images are not run again.
        self.label_column = ""
        self.class_names: list[str] = []
        self.image_size, self.mean, self.std = 512, IMAGENET_DEFAULT["mean"], IMAGENET_DEFAULT["std"]
        self.connected = False
        self._image_column = "image"
        self._from_coco = False  # the splits came from COCO files: their boxes are xyxy already, and checked
        self._boxes, self._labels = boxes_column, labels_column  # COCO files: their own layout's
        self._test_rows: Any = None

    def connect(
        self, image_size: int = 512, mean: tuple = IMAGENET_DEFAULT["mean"], std: tuple = IMAGENET_DEFAULT["std"]
    ) -> None:
        """Take the model's square input side and its normalisation (``DetectionTask.data_needs()``)."""
        self.image_size, self.mean, self.std, self.connected = int(image_size), tuple(mean), tuple(std), True

    @property
    def deterministic_train(self) -> bool:
        """Whether a training image always gives the same tensor (no flips): what the prefix cache needs."""
        return self.hparams.hflip == 0

    def spec(self) -> DataSpec:
        return DataSpec({"num_classes": len(self.class_names)} if self.class_names else {}, list(self.class_names))

    # --- the splits (FineTuneDataModule.build) ---
    def load_splits(self) -> datasets.DatasetDict:
        hp = self.hparams
        path = local_path(hp.dataset) if hp.dataset else None
        names = {
            hp.train_split: (hp.train_split,),
            hp.val_split: (hp.val_split, "val"),
            hp.test_split: (hp.test_split,),
        }
        files = coco_files(path, names) if path is not None else None
        return self.load_coco(files) if files is not None else super().load_splits()

    def load_coco(self, files: dict[str, Path]) -> datasets.DatasetDict:
        """The splits of COCO annotation files (``{split: file}``), in the hub's layout, boxes ``xyxy``."""
        import datasets

        hp = self.hparams
        splits, first = {}, None
        for split, file in files.items():
            root = Path(hp.image_root).expanduser() if hp.image_root else file.parent
            columns, class_names = read_coco(file, root, hp.box_format, hp.clip_boxes)
            first = first or (file, class_names)
            if class_names != first[1]:
                raise UsageError(f"{file.name} lists other categories than {first[0].name}: give every split one list")
            features = datasets.Features(
                {
                    "image": datasets.Image(decode=False),
                    "width": datasets.Value("int32"),
                    "height": datasets.Value("int32"),
                    "objects": {
                        "bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                        "category": datasets.List(datasets.ClassLabel(names=class_names)),
                    },
                }
            )
            splits[split] = datasets.Dataset.from_dict(columns, features)
        self._from_coco, self._boxes, self._labels = True, "objects.bbox", "objects.category"
        return datasets.DatasetDict(splits)

    def find_columns(self, ds: datasets.DatasetDict) -> tuple[datasets.DatasetDict, str | None]:
        hp = self.hparams
        features = ds[hp.train_split].features
        self._image_column = find_column(features, hp.image_column, "image", is_image, "images")
        for flag, column in (("boxes_column", self._boxes), ("labels_column", self._labels)):
            head, _, rest = column.partition(".")
            inner = features.get(head)
            if inner is None or (rest and not (isinstance(inner, dict) and rest in inner)):
                found = ", ".join(features)
                raise UsageError(f"the dataset has no column {column!r} (columns: {found}): pass --data.{flag} NAME")
        return ds, None

    def read_labels(self, ds: datasets.DatasetDict) -> None:
        hp = self.hparams
        head, _, rest = self._labels.partition(".")
        feature = ds[hp.train_split].features[head]
        feature = feature[rest] if rest else feature
        names = getattr(getattr(feature, "feature", feature), "names", None)  # a list of ClassLabel, or one
        cells = [cell for split in ds.values() for cell in split.select_columns([head])[head]]
        seen = sorted({int(c) for cell in cells for c in (cell[rest] if rest else cell)})
        if names is None:
            if seen and (seen[0] < 0):
                raise UsageError(f"labels must be class ids >= 0, found {seen[0]} in {self._labels}")
            names = [str(i) for i in range(seen[-1] + 1)] if seen else []
        elif seen and seen[-1] >= len(names):
            raise UsageError(
                f"label {seen[-1]} in {self._labels} is not one of the {len(names)} classes {names[:5]}..."
            )
        if not names:
            raise UsageError(f"no boxes in {self._labels}: the data has nothing to detect")
        self.class_names = list(names)

    def encode(self, split: str, rows: datasets.Dataset) -> Any:
        import datasets

        hp = self.hparams
        heads = list(dict.fromkeys(c.partition(".")[0] for c in (self._image_column, self._boxes, self._labels)))
        rows = rows.select_columns(heads)
        if isinstance(rows.features[self._image_column], datasets.Image):  # decoded in the transform, naming a bad file
            rows = rows.cast_column(self._image_column, datasets.Image(decode=False))
        if split == hp.test_split:
            self._test_rows = rows
        train = split == hp.train_split
        return rows.with_transform(self._transform(train, with_id=False))

    # --- preprocessing ---
    def _transform(self, train: bool, with_id: bool):
        hp = self.hparams
        if self.trainer is not None and not self.connected:
            raise UsageError(
                f"{type(self).__name__} was not connected to the model it feeds: call "
                "data.connect(**model.data_needs()) before trainer.fit (the CLI does)"
            )
        xyxy = self._from_coco or hp.box_format == "xyxy"
        size, image_col = self.image_size, self._image_column

        def apply(batch: dict[str, list]) -> dict[str, Any]:
            out: dict[str, list] = {"pixel_values": [], "boxes": [], "labels": [], "scale": []}
            for j, cell in enumerate(batch[image_col]):
                image = open_image(cell)
                row = {k: v[j] for k, v in batch.items()}
                where = f"image {cell.get('path') or j}" if isinstance(cell, dict) else f"image {j}"
                w, h = image.size
                boxes = [
                    checked_box(b, "xyxy" if xyxy else "xywh", w, h, hp.clip_boxes, where)
                    for b in field(row, self._boxes)
                ]
                flip = train and hp.hflip > 0 and bool(torch.rand(()) < hp.hflip)
                pixels, scale = letterbox(image, size, self.mean, self.std, flip)
                box = torch.tensor(boxes, dtype=torch.float32).view(-1, 4) * scale
                if flip:
                    box = torch.stack([w * scale - box[:, 2], box[:, 1], w * scale - box[:, 0], box[:, 3]], 1)
                out["pixel_values"].append(pixels)
                out["boxes"].append(box)
                out["labels"].append(torch.tensor([int(c) for c in field(row, self._labels)], dtype=torch.long))
                out["scale"].append(scale)
            if with_id:
                out["id"] = [str(c.get("path") or "") if isinstance(c, dict) else "" for c in batch[image_col]]
            return out

        return apply

    def collate_fn(self):
        return collate

    # --- what predict runs on ---
    def test_predict_set(self) -> Any:
        """The test split with each image's id (its path) and true boxes."""
        return self._test_rows.with_transform(self._transform(False, with_id=True))

    def new_predict_set(self, source: str) -> Any:
        """The images ``predict_data`` names (an image file, a folder of images, a COCO file, a table with an
        image column), with their ids (paths) and true boxes when it has them."""
        import datasets
        from PIL import Image

        path = local_path(source)
        hp = self.hparams
        if path is not None and path.is_file() and path.suffix.lower() in Image.registered_extensions():
            table = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column(
                "image", datasets.Image(decode=False)
            )
        elif path is not None and coco_files(path, {"predict": (hp.test_split,)}) and path.suffix == ".json":
            columns, _ = read_coco(path, Path(hp.image_root or path.parent), hp.box_format, hp.clip_boxes)
            table = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image(decode=False))
            self._from_coco, self._boxes, self._labels = True, "objects.bbox", "objects.category"
        else:
            what = "an image file, a folder of images, a COCO file, or parquet/arrow files with an image column"
            table = load_predict_table(source, hp.test_split, hp.cache_dir, what)
        self._image_column = find_column(table.features, hp.image_column, "image", is_image, "images")
        if isinstance(table.features[self._image_column], datasets.Image):
            table = table.cast_column(self._image_column, datasets.Image(decode=False))
        if self._boxes.partition(".")[0] not in table.features:  # no boxes: images alone
            return table.with_transform(self._images_only())
        return table.with_transform(self._transform(False, with_id=True))

    def _images_only(self):
        image_col = self._image_column

        def apply(batch: dict[str, list]) -> dict[str, Any]:
            done = [letterbox(open_image(c), self.image_size, self.mean, self.std) for c in batch[image_col]]
            return {
                "pixel_values": [p for p, _ in done],
                "scale": [s for _, s in done],
                "id": [str(c.get("path") or "") if isinstance(c, dict) else "" for c in batch[image_col]],
            }

        return apply
