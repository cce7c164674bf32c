"""The frozen prefix's output, kept per training example, so that later epochs run only the layers that train.

``FineTuning`` puts a ``PrefixCache`` on the task (``task.prefix_cache``) while the lowest groups are frozen and
the task can cut its model there (``FineTuneTask.prefix_split``); the task's training step calls
``prefix_cache.logits(batch)``. The first epoch fills it as batches come (the prefix runs once per example, as
it would have anyway); once every example is in, the training loader stops reading raw data (``RowNumbers``
serves ``index`` and ``labels`` only): no decoding, resizing or tokenizing, and no worker process either (the loader
makes those batches in the main process, ``data.sampling.RowLoader``). The cache is never checkpointed: a
resumed run fills it again. Rows live in memory up to a budget, else in a memory-mapped file in the run folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peft_lightning.prefix import Features, Split, modules_run


def default_max_bytes() -> int:
    """A quarter of this machine's memory: what a cache may hold in memory by default."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class CacheTooLarge(Exception):
    """The rows would not fit in the memory budget and no folder was given to spill them to."""


class PrefixCache:
    """Rows ``[i]`` hold the frozen prefix's output for training example ``i`` (its ``index`` in the batch).

    Args:
        split: where the model is cut, from the task.
        size: training examples (rows).
        max_bytes: rows beyond this go to a memory-mapped file in ``folder`` (in memory below it).
        folder: where that file goes; None: the cache gives up (``on_fail``) instead.
        module: the model, in eval mode while the split is checked against it on the first batch.
        on_fail: called with the reason when the cache gives up; training goes on uncut.
    """

    def __init__(
        self,
        split: Split,
        size: int,
        max_bytes: int,
        folder: Path | None = None,
        module: torch.nn.Module | None = None,
        on_fail: Callable[[str], None] | None = None,
    ) -> None:
        self.split = split
        self.module = module
        self.on_fail = on_fail
        self.failed: str | None = None  # why the cache stopped serving (its split did not check out, no room)
        self.size = size
        self.max_bytes = max_bytes
        self.folder = folder
        self.values: Features = {}
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.count = 0
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self.path: Path | None = None
        self.verified = False

    @property
    def complete(self) -> bool:
        return self.count == self.size

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "memory"

    def describe(self) -> str:
        seen = self.hits + self.misses
        rate = f", {100 * self.hits / seen:.0f}% of training examples served from it" if seen else ""
        return (
            f"input of {self.split.group}: {self.count:,}/{self.size:,} examples, {_human(self.nbytes)} in "
            f"{self.where}{rate}"
        )

    # --- storage ---
    def _allocate(self, rows: Features) -> None:
        shapes = {k: (v.shape[1:], v.dtype) for k, v in rows.items()}
        sizes = {k: self.size * math.prod(s) * d.itemsize for k, (s, d) in shapes.items()}  # bytes per tensor
        self.nbytes = sum(sizes.values())
        if self.nbytes <= self.max_bytes:
            self.values = {k: torch.zeros((self.size, *s), dtype=d) for k, (s, d) in shapes.items()}
            return
        if self.folder is None:
            raise CacheTooLarge(
                f"{_human(self.nbytes)} of frozen features would exceed the cache's memory budget "
                f"({_human(self.max_bytes)})"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"prefix_cache.rank{_rank()}.bin"
        self.path.unlink(missing_ok=True)
        # One file, a region per tensor: torch maps it shared, so pages go to the file, not to swap.
        flat = torch.from_file(str(self.path), shared=True, size=self.nbytes, dtype=torch.uint8)
        offset = 0
        for k, (s, d) in shapes.items():
            self.values[k] = flat[offset : offset + sizes[k]].view(d).view(self.size, *s)
            offset += sizes[k]

    def put(self, index: torch.Tensor, rows: Features) -> None:
        if not self.values:
            self._allocate(rows)
        index = index.cpu()
        for k, v in rows.items():
            self.values[k][index] = v.detach().to("cpu", self.values[k].dtype)
        new = ~self.filled[index]
        self.count += int(new.sum())
        self.filled[index] = True

    def get(self, index: torch.Tensor, device: torch.device) -> Features | None:
        index = index.cpu()
        if not self.values or not (self.complete or bool(self.filled[index].all())):
            return None
        # `index_select`, not `v[index]`: the same rows, without advanced indexing's general kernel (64 of 10,000 rows
        # of 1280 bf16 values on 2 CPU cores: 0.05 ms against 0.4 ms, a good part of a cached head-only step).
        return {k: v.index_select(0, index).to(device, non_blocking=True) for k, v in self.values.items()}

    def release(self) -> None:
        """Drop the rows (and the file, if they were on disk)."""
        self.values = {}
        self.filled.zero_()
        self.count = 0
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def sync(self) -> None:
        """Under DDP each rank fills the rows of the examples its sampler gave it: share them, so every rank holds
        every row (and the next epoch reads no raw data anywhere). A collective: every rank calls it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or not self.values:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        counts = self.filled.to(torch.float32)
        counts = counts.to(device) if device else counts
        dist.all_reduce(counts)
        step = 4096  # rows per round: the float32 copy of one chunk is what the reduction costs in memory
        for v in self.values.values():
            for start in range(0, self.size, step):
                rows = slice(start, start + step)
                own = self.filled[rows].view(-1, *([1] * (v.dim() - 1)))
                chunk = v[rows].float() * own
                chunk = chunk.to(device) if device else chunk
                dist.all_reduce(chunk)
                n = counts[rows].clamp(min=1).view(-1, *([1] * (v.dim() - 1)))
                v[rows] = (chunk / n).cpu().to(v.dtype)
        self.filled = counts.cpu() > 0
        self.count = int(self.filled.sum())

    # --- the training forward ---
    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's training output for ``batch``, the prefix read from the cache or run (and kept)."""
        if self.failed:
            return self.split.reference(batch)
        index = batch["index"]
        rows = self.get(index, index.device)
        if rows is not None:
            self.hits += len(index)
            return self.split.logits(batch, rows)
        if not all(k in batch for k in self.split.raw_keys):
            raise RuntimeError(
                f"examples {index[:4].tolist()}... are not in the prefix cache and their batch holds no raw inputs"
            )
        # As the uncached step runs it (grad mode on): nothing before the cut trains, so autograd records nothing.
        with modules_run() as ran:
            rows = self.split.features(batch)
        if not self.verified:
            self.verified = True
            error = self._check(batch, rows, ran)
            if error is not None:
                return self._give_up(batch, error)
        try:
            self.put(index, rows)
        except CacheTooLarge as err:
            return self._give_up(
                batch,
                f"{err}: raise --finetuning.cache_max_gb, or pass "
                "--finetuning.cache_features true to keep it on disk in the run folder",
            )
        self.misses += len(index)
        return self.split.logits(batch, rows)

    def _give_up(self, batch: dict[str, Any], why: str) -> torch.Tensor:
        self.failed = why
        self.release()
        if self.on_fail is not None:
            self.on_fail(why)
        return self.split.reference(batch)

    def _check(self, batch: dict[str, Any], rows: Features, ran: list[torch.nn.Module]) -> str | None:
        """None when no trainable weight ran before the cut (in ``ran``) and the rest of the model, run from
        ``rows``, gives the whole model's output for ``batch`` (both in eval mode and without grad: no random
        draw, no BatchNorm update); else what is wrong."""
        names = {id(p): n for n, p in self.module.named_parameters()} if self.module is not None else {}
        trained = sorted({names.get(id(p), "?") for m in ran for p in m.parameters(recurse=False) if p.requires_grad})
        if trained:
            return (
                f"trainable weights run before {self.split.group} ({', '.join(trained[:3])}"
                f"{' ...' if len(trained) > 3 else ''}): the model cannot be cut there"
            )
        module = self.module
        modes = {m: m.training for m in module.modules()} if module is not None else {}
        if module is not None:
            module.eval()
        try:
            with torch.no_grad():
                got = self.split.logits(batch, rows).float()
                want = self.split.reference(batch).float()
        finally:
            for m, training in modes.items():
                m.training = training
        if got.shape != want.shape:
            return (
                f"the model run from the input of {self.split.group} gave {tuple(got.shape)}, not {tuple(want.shape)}"
            )
        low = any(v.dtype in (torch.float16, torch.bfloat16) for v in rows.values())
        error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if error <= (2e-2 if low else 1e-3):
            return None
        return (
            f"the model run from the input of {self.split.group} did not reproduce its whole forward pass "
            f"(relative difference {error:.2g}): it cannot be cut there"
        )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
