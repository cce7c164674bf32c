"""ViT-B/16 pretrained on ImageNet-21k (timm / Hugging Face hub) fine-tuned on CIFAR-10 at 224 px.

The setting follows the ViT and "How to train your ViT" papers' CIFAR-10 fine-tuning, which reports
~98.5-99% test accuracy: SGD with momentum 0.9, no weight decay, global batch 512, warmup then cosine decay,
bf16 mixed precision. It is meant for GPUs (one H200 or several): at 224 px a ViT-B step runs at a few images per
second on a CPU. Global batch = batch_size x devices x num_nodes x accumulate_grad_batches; the defaults give 512 on
one GPU (128 x 4); with 4 GPUs pass --trainer.accumulate_grad_batches 1.
"""

from __future__ import annotations

from peft_lightning.data.vision import ImageDataModule
from peft_lightning.tasks.vision import ImageClassifier

MODEL = "vit_base_patch16_224.augreg_in21k"
DATASET = "uoft-cs/cifar10"


class VitCifar(ImageClassifier):
    assets = (f"hub-model:timm/{MODEL}", f"hub-dataset:{DATASET}")
    description = "ViT-B/16 (ImageNet-21k) on CIFAR-10 at 224 px, hub weights and data; ~98.5-99% on a GPU"
    datamodule_class = ImageDataModule
    model_defaults = {
        "model_name": MODEL,
        "num_classes": 10,
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 0.0,
        "warmup": 0.05,
    }
    data_defaults = {
        "dataset": DATASET,
        "image_size": 224,
        "train_crop_scale": (0.25, 1.0),  # CIFAR images are 32 px: crops below a quarter lose the object
        "batch_size": 128,
        "num_workers": 8,
        "val_fraction": 0.05,  # 2,500 of the 50,000 training images: CIFAR-10 ships no validation split
    }
    trainer_defaults = {"max_epochs": 10, "precision": "auto", "accumulate_grad_batches": 4, "gradient_clip_val": 1.0}
    finetuning_defaults = {"strategy": "full"}


RECIPE = VitCifar
