"""When and where ``FineTuning`` caches the frozen prefix: the policy around ``PrefixCache``.

``--finetuning.cache_features`` None (the default) caches where the cache is exact, fits in memory and a later
epoch of the same phase reads it; ``true`` caches wherever it is exact (on disk in the run folder beyond the memory
budget) and refuses a run where it cannot be; ``false`` never caches. Exact means: the task says where its model can
be cut (``prefix_split``), the training inputs are deterministic, frozen groups run in eval mode and nothing shards
or compiles the model. Every decision is noted once for the run summary (``summary``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from peft_lightning.callbacks.prefix_cache import PrefixCache, default_max_bytes
from peft_lightning.contract import Tunable
from peft_lightning.data.sampling import IndexedData, RowNumbers
from peft_lightning.output.run_folder import log_dir


class PrefixCaching:
    """Keeps, drops or starts the task's ``prefix_cache`` for the groups that train now.

    Args:
        enabled: ``--finetuning.cache_features`` (None: where it pays, True: wherever exact, False: never).
        max_gb: the memory the cache may hold (None: a quarter of this machine's memory).
        frozen_train_mode: frozen groups run in training mode (``frozen_dropout`` / ``train_bn``): nothing is exact.
    """

    def __init__(self, enabled: bool | None, max_gb: float | None, frozen_train_mode: bool) -> None:
        self.enabled, self.max_gb, self.frozen_train_mode = enabled, max_gb, frozen_train_mode
        self.notes: list[str] = []  # what the cache did, for the run summary
        self._skips: set[tuple[str, str]] = set()  # (cut, reason) said once

    @staticmethod
    def lowest_trainable(pl_module: Tunable) -> int | None:
        """The index of the lowest layer group with a trainable parameter (None: nothing trains)."""
        params = dict(pl_module.named_parameters())
        for i, (_, members) in enumerate(pl_module.layer_groups()):
            if any(params[n].requires_grad for n in members if n in params):
                return i
        return None

    def refusal(self, trainer: Trainer, pl_module: Tunable) -> str | None:
        """Why nothing may be cached in this run at all (None: it may)."""
        from peft_lightning.tasks.base import FineTuneTask

        dm = trainer.datamodule
        if type(pl_module).prefix_split is FineTuneTask.prefix_split:
            return f"{type(pl_module).__name__} does not say where its model can be cut (prefix_split)"
        if dm is None or not getattr(dm, "deterministic_train", False):
            return "the training inputs are random (augmentation): pass --data.augment false"
        if self.frozen_train_mode:
            return "frozen groups run in training mode (--finetuning.frozen_dropout / train_bn)"
        if pl_module.compile_blocks:
            return "blocks are compiled (--model.compile)"
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            return f"{type(trainer.strategy).__name__} shards the model"
        return None

    def drop(self, trainer: Trainer, pl_module: Tunable, end: bool = False) -> None:
        """Release the cache (its notes stay for the summary) and read raw data again."""
        cache = pl_module.prefix_cache
        if cache is None:
            return
        when = "end of fit:" if end else f"epoch {trainer.current_epoch}: dropped the cache of the"
        self.notes.append(f"{when} {cache.describe()}")
        cache.release()
        pl_module.prefix_cache = None
        rows = _index_dataset(trainer)
        if rows is not None:
            rows.serve_cached(False)

    def update(self, trainer: Trainer, pl_module: Tunable, ready: bool, reused: Callable[[int, int], bool]) -> None:
        """Keep, drop or start the cache for what trains now; serve cached epochs from it once it is full.
        ``ready``: the groups that train are chosen (a probing strategy has probed); ``reused(epoch, lowest)``:
        whether a later epoch trains from the same frozen prefix (the default mode caches only then)."""
        if self.enabled is False or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if self.refusal(trainer, pl_module) is not None:  # (cache_features true refused it at setup)
            return
        groups = pl_module.layer_groups()
        names = [name for name, _ in groups]
        lowest = self.lowest_trainable(pl_module)
        target = names[lowest] if lowest else None
        cache = pl_module.prefix_cache
        if cache is not None and cache.split.group != target:
            self.drop(trainer, pl_module)
            cache = None
        rows = _index_dataset(trainer)
        if cache is None and target is not None:
            cache = self._start(trainer, pl_module, target, lowest, rows, ready, reused)
        if rows is not None:
            rows.serve_cached(cache is not None and cache.complete)

    def _start(
        self,
        trainer: Trainer,
        pl_module: Tunable,
        target: str,
        lowest: int,
        rows: RowNumbers | None,
        ready: bool,
        reused: Callable[[int, int], bool],
    ) -> PrefixCache | None:
        explicit = self.enabled is True
        epoch = trainer.current_epoch

        def skip(why: str) -> None:
            if (target, why) in self._skips:  # said once per cut and reason
                return
            self._skips.add((target, why))
            note = f"epoch {epoch}: nothing cached below {target}: {why}"
            self.notes.append(note)
            if explicit:
                rank_zero_info(f"prefix cache: {note}")

        if not ready:
            return None  # the groups that train are not chosen yet
        if any(cut == target for cut, _ in self._skips):
            return None  # this cut was tried and could not be cached (said once, in the summary)
        if not explicit and not reused(epoch, lowest):
            return None  # one epoch reads it: caching would cost memory and save nothing
        if rows is None:
            skip("the data module numbers no training rows (peft_lightning.data.sampling.IndexedData.index_dataset)")
            return None
        split = pl_module.prefix_split(target)
        if split is None:
            skip(f"{type(pl_module).__name__} cannot cut its model at {target}")
            return None
        max_bytes = int(self.max_gb * 2**30) if self.max_gb else default_max_bytes()
        folder = Path(_run_folder(trainer)) / "prefix_cache" if explicit else None
        pl_module.prefix_cache = PrefixCache(split, len(rows), max_bytes, folder, module=pl_module, on_fail=skip)
        rank_zero_info(
            f"prefix cache: epoch {epoch}: the frozen groups below {target} run once per training "
            "example; later epochs train from their output"
        )
        return pl_module.prefix_cache

    def summary(self, pl_module: Tunable | None = None) -> list[str]:
        """What the prefix cache did in this run, for the run summary."""
        cache = pl_module.prefix_cache if pl_module is not None else None
        return [*self.notes, *([f"now: {cache.describe()}"] if cache is not None else [])]


def _index_dataset(trainer: Trainer) -> RowNumbers | None:
    """The training rows the data module numbers for the cache and switches to serve cached epochs, or None."""
    dm = trainer.datamodule
    return dm.index_dataset() if isinstance(dm, IndexedData) else None


def _run_folder(trainer: Trainer) -> str:
    return log_dir(trainer) or trainer.default_root_dir
