"""peft_lightning: efficient fine-tuning of pretrained models on Lightning.

Importing the package is cheap: the domain classes (which pull in timm, transformers or datasets when used)
are resolved lazily on first attribute access.

Example:
    >>> from peft_lightning import ImageClassifier, ImageDataModule, FineTuning  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FineTuneTask": "peft_lightning.tasks.base",
    "ImageClassifier": "peft_lightning.tasks.vision",
    "ImageDataModule": "peft_lightning.data.vision",
    "TextClassifier": "peft_lightning.tasks.text",
    "TextDataModule": "peft_lightning.data.text",
    "FineTuning": "peft_lightning.callbacks.finetuning",
    "Recommender": "peft_lightning.tasks.recsys",
    "MovieLensDataModule": "peft_lightning.data.movielens",
    "TokenClassifier": "peft_lightning.tasks.token",
    "TokenDataModule": "peft_lightning.data.token",
    "DetectionTask": "peft_lightning.tasks.detection",
    "DetectionDataModule": "peft_lightning.data.detection",
    "get_recipe": "peft_lightning.registry",
    "list_recipes": "peft_lightning.registry",
    "tune": "peft_lightning.tuning",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from peft_lightning.callbacks.finetuning import FineTuning
    from peft_lightning.data.detection import DetectionDataModule
    from peft_lightning.data.movielens import MovieLensDataModule
    from peft_lightning.data.text import TextDataModule
    from peft_lightning.data.token import TokenDataModule
    from peft_lightning.data.vision import ImageDataModule
    from peft_lightning.registry import get_recipe, list_recipes
    from peft_lightning.tasks.base import FineTuneTask
    from peft_lightning.tasks.detection import DetectionTask
    from peft_lightning.tasks.recsys import Recommender
    from peft_lightning.tasks.text import TextClassifier
    from peft_lightning.tasks.token import TokenClassifier
    from peft_lightning.tasks.vision import ImageClassifier
    from peft_lightning.tuning import tune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_lightning' has no attribute {name!r}")
