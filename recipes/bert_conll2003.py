"""BERT-base (cased) fine-tuned for named entities on CoNLL-2003 (English): hub weights and data, for a GPU.

The setting of the BERT paper's NER experiment and of transformers' ``run_ner`` example: the cased model (case marks
names), AdamW (weight decay 0.01, none on biases/norms), lr 5e-5 (the paper's grid: 5e-5, 3e-5, 2e-5), batch 32,
3 epochs, linear warmup over the first 10% of steps then linear decay, max_length 128 sub-words (a CoNLL sentence has
~14 words; few exceed it), the first sub-word of each word tagged. Scored with seqeval's entity-level F1 (conlleval's
definition), as published: ~95% on the dev set and ~91-92% on the test set (sentence-level context, as here; the
paper's 92.4 used document context). ~10 minutes on one GPU; hours on a CPU.

The data is ``lhoestq/conll2003`` on the hub (the original ``conll2003``/``eriktks/conll2003`` is a loading script,
which ``datasets`` no longer runs): splits ``train``/``validation``/``test``, ``tokens`` and ``ner_tags`` (found before
its ``pos_tags`` and ``chunk_tags``: ``TokenDataModule``'s default), tags in the order of ``TAGS``. Offline: pass local copies with ``--model.model_name DIR`` (a ``save_pretrained`` folder with
the tokenizer) and ``--data.dataset DIR`` (CoNLL files ``train.txt``/``valid.txt``/``test.txt`` as distributed, or a
``save_to_disk`` folder).
"""

from __future__ import annotations

from typing import Any, ClassVar

from peft_lightning.data.token import TokenDataModule
from peft_lightning.tasks.token import TokenClassifier

MODEL = "google-bert/bert-base-cased"
DATASET = "lhoestq/conll2003"
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
"""CoNLL-2003's entity tags (IOB2) in the hub dataset's id order."""


class BertConll2003(TokenClassifier):
    assets = (f"hub-model:{MODEL}", f"hub-dataset:{DATASET}")
    description = "BERT-base (cased) NER on CoNLL-2003, hub weights and data; ~91-92% test entity F1 on a GPU"
    datamodule_class = TokenDataModule
    model_defaults: ClassVar[dict[str, Any]] = {
        "model_name": MODEL,
        "num_labels": len(TAGS),
        "lr": 5e-5,
        "weight_decay": 0.01,
        "warmup": 0.1,
        "scheduler": "linear",
    }
    data_defaults: ClassVar[dict[str, Any]] = {
        "dataset": DATASET,
        "label_names": TAGS,  # names the hub's ids; CoNLL files' tags must be among them
        "max_length": 128,
        "batch_size": 32,
        "group_by_length": True,  # dynamic padding over length-sorted chunks: fewer pad tokens, same result
        "num_workers": 4,
    }
    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 3, "precision": "auto"}  # bf16-mixed on a GPU
    finetuning_defaults: ClassVar[dict[str, Any]] = {"strategy": "full"}


RECIPE = BertConll2003
