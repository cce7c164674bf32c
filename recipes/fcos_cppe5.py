"""FCOS with a ResNet-50 FPN on CPPE-5 (medical personal protective equipment, 5 classes), hub data and weights.

CPPE-5 (Dagli & Shaikh, 2021; ``rishitdagli/cppe-5`` on the hub: 1,000 training and 29 test images, COCO ``xywh``
boxes in an ``objects`` struct) trained its baselines, FCOS among them, with MMDetection's 1x schedule; these are
that schedule's settings: an ImageNet ResNet-50 (torchvision's weights, as MMDetection's), its stem and first stage
frozen (``frozen_stages=1``), 800 px images, random flips, SGD with momentum 0.9, lr 0.01 at a global batch of 16,
weight decay 1e-4, 12 epochs, gradient clipping at 35. Two things differ: the LR decays by a cosine after a
warmup instead of MMDetection's steps at epochs 8 and 11, and images are letterboxed to 800 x 800 (the longer side
800) instead of 1333 x 800. It is meant for GPUs (one, or ``--trainer.devices N`` with the per-device batch
divided). A few CPPE-5 boxes reach past their image, so boxes are clipped (``clip_boxes``).
"""

from __future__ import annotations

from peft_lightning.data.detection import DetectionDataModule
from peft_lightning.tasks.detection import DetectionTask

MODEL = "resnet50.tv_in1k"
DATASET = "rishitdagli/cppe-5"


class FcosCppe5(DetectionTask):
    assets = (f"hub-model:timm/{MODEL}", f"hub-dataset:{DATASET}")
    description = (
        "FCOS, ResNet-50 FPN (ImageNet) on CPPE-5 at 800 px, MMDetection's 1x schedule; hub weights and data, GPU"
    )
    datamodule_class = DetectionDataModule
    model_defaults = {
        "model_name": MODEL,
        "num_classes": 5,
        "image_size": 800,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup": 0.05,
    }
    data_defaults = {
        "dataset": DATASET,
        "box_format": "xywh",
        "clip_boxes": True,
        "hflip": 0.5,
        "batch_size": 16,
        "num_workers": 8,
        "val_fraction": 0.1,  # CPPE-5 has no validation split: 100 of its 1,000 training images
    }
    trainer_defaults = {"max_epochs": 12, "precision": "auto", "gradient_clip_val": 35.0}
    # The stem and layer1 stay frozen (MMDetection's frozen_stages=1): the top 5 of 7 groups train.
    finetuning_defaults = {
        "strategy": {"class_path": "peft_lightning.callbacks.strategies.Head", "init_args": {"groups": 5}}
    }


RECIPE = FcosCppe5
