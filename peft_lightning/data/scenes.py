"""Synthetic detection scenes from a classification set: small images pasted onto a larger canvas.

Each scene is a canvas of faint noise with a few items pasted at random positions and sizes; an item's box is the
tight box of its bright pixels where it was pasted, so the labels are exact. Everything is drawn from one seed:
the same arguments write the same files. The scenes are written as a COCO annotation file and PNG images, which
``DetectionDataModule`` reads like any COCO data.

Example:
    >>> write_scenes(Path("scenes"), "train", images, labels, names, count=100, seed=0)  # doctest: +SKIP
    PosixPath('scenes/train.json')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

BRIGHT = 32
"""An item's pixels above this (of 255) are the item; the box is their extent."""


def _overlap(a: list[int], b: list[int]) -> float:
    """The area of ``a`` that ``b`` covers, as a fraction of the smaller box (boxes ``[x1, y1, x2, y2]``)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def write_scenes(
    folder: Path,
    split: str,
    images: Any,
    labels: Any,
    class_names: list[str],
    count: int,
    canvas: int = 128,
    items: tuple[int, int] = (1, 4),
    sizes: tuple[int, int] = (20, 64),
    max_overlap: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write ``count`` scenes as ``folder/images/<split>/<n>.png`` and ``folder/<split>.json`` (COCO, ``xywh``).

    Args:
        images: grey items, ``[n, h, w]`` uint8 (bright on black, as Fashion-MNIST's).
        labels: each item's class index into ``class_names``.
        canvas: the scenes' side in pixels.
        items: the fewest and most items in a scene.
        sizes: the smallest and largest side an item is scaled to.
        max_overlap: the most of an item that another may cover (a placement overlapping more is drawn again).
        seed: what every random choice is drawn from.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = folder / "images" / split
    out.mkdir(parents=True, exist_ok=True)
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i, "name": n} for i, n in enumerate(class_names)]
    for n in range(count):
        scene = rng.integers(0, 24, (canvas, canvas), dtype=np.uint8)
        boxes: list[list[int]] = []
        for _ in range(int(rng.integers(items[0], items[1] + 1))):
            pick = int(rng.integers(len(images)))
            side = int(rng.integers(sizes[0], sizes[1] + 1))
            item = np.asarray(Image.fromarray(images[pick]).resize((side, side), Image.BILINEAR))
            ys, xs = np.nonzero(item > BRIGHT)
            if len(xs) == 0:
                continue
            for _ in range(20):  # a few tries at a place that does not hide much of the others
                x, y = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
                box = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
                if all(_overlap(box, other) <= max_overlap for other in boxes):
                    break
            else:
                continue
            region = scene[y : y + side, x : x + side]
            np.maximum(region, item, out=region)
            boxes.append(box)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": n,
                    "category_id": int(labels[pick]),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": (box[2] - box[0]) * (box[3] - box[1]),
                    "iscrowd": 0,
                }
            )
        name = f"images/{split}/{n:05d}.png"
        Image.fromarray(scene).save(folder / name)
        coco["images"].append({"id": n, "file_name": name, "width": canvas, "height": canvas})
    path = folder / f"{split}.json"
    path.write_text(json.dumps(coco))
    return path
