"""BERT-base (uncased) fine-tuned on GLUE SST-2 (binary sentiment of movie-review sentences), hub weights and data.

The setting of the BERT paper and of Hugging Face's GLUE example, which reach ~92-93% accuracy on the SST-2 dev
set: AdamW (weight decay 0.01, none on biases/norms), lr 2e-5, batch 32, 3 epochs, linear warmup over the first
10% of steps then linear decay, max_length 128. GLUE hides its test labels, so the dev set (``validation``, 872
sentences) is the test split here and a seeded, stratified 2% of train (~1,350 sentences) is carved out for
validation and checkpoint selection. Meant for a GPU (~10 minutes on one); on a CPU it takes hours.

Offline: pass local copies with ``--model.model_name DIR`` (a ``save_pretrained`` folder with the tokenizer) and
``--data.dataset DIR`` (a ``save_to_disk`` folder, or csv/parquet files with ``sentence`` and ``label`` columns).
"""

from __future__ import annotations

from typing import Any, ClassVar

from peft_lightning.data.text import TextDataModule
from peft_lightning.tasks.text import TextClassifier

MODEL = "google-bert/bert-base-uncased"
DATASET = "nyu-mll/glue"


class BertSst2(TextClassifier):
    assets = (f"hub-model:{MODEL}", f"hub-dataset:{DATASET}")
    description = "BERT-base (uncased) on GLUE SST-2, hub weights and data; ~92-93% dev accuracy on a GPU"
    datamodule_class = TextDataModule
    model_defaults: ClassVar[dict[str, Any]] = {
        "model_name": MODEL,
        "num_labels": 2,
        "lr": 2e-5,
        "weight_decay": 0.01,
        "warmup": 0.1,
        "scheduler": "linear",
    }
    data_defaults: ClassVar[dict[str, Any]] = {
        "dataset": DATASET,
        "config_name": "sst2",
        "test_split": "validation",  # the GLUE dev set: its test labels are hidden (-1)
        "val_split": "heldout",  # not in GLUE: carved from train
        "val_fraction": 0.02,
        "max_length": 128,  # SST-2 sentences are short (p99 ~ 60 tokens): truncation never bites
        "batch_size": 32,
        "group_by_length": True,  # dynamic padding over length-sorted chunks: fewer pad tokens, same result
        "num_workers": 4,
    }
    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 3, "precision": "auto"}  # bf16-mixed on a GPU
    finetuning_defaults: ClassVar[dict[str, Any]] = {"strategy": "full"}


RECIPE = BertSst2
