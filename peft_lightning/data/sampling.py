"""A shuffling sampler that is a pure function of (seed, epoch), so a resumed run sees the same batches, and the
training loader that saves the fit's position in every checkpoint. (The random generators a checkpoint also holds
are ``peft_lightning/rng.py``'s; the workaround that gives the position back is ``internals.resume_loader_position``.)

The prefix cache's side of the data: a data module numbers its training rows (``IndexedData.index_dataset``, a
``RowNumbers``), the cache keys its rows by that number, and once it holds every row it switches the dataset to
``{index, labels}``; the training loader (``RowLoader``) then makes those batches in the main process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Sampler

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class EpochShuffle(Sampler[int]):
    """Random order, re-drawn each epoch from ``seed + epoch``.

    ``torch``'s ``RandomSampler`` (and transformers' ``LengthGroupedSampler``) draw from a generator whose state
    is not in any checkpoint, so a run resumed at epoch 3 would see another order than an uninterrupted one.
    Lightning calls ``set_epoch`` before each epoch, as it does for ``DistributedSampler`` (which it substitutes
    for this one under DDP).

    Args:
        length: number of samples.
        seed: the order of epoch ``e`` is drawn from ``seed + e``.
        lengths, batch_size: when given, the order groups samples of similar length into batches
            (transformers' ``get_length_grouped_indices``, what its ``LengthGroupedSampler`` draws): less padding.
    """

    def __init__(
        self, length: int, seed: int = 0, lengths: list[int] | None = None, batch_size: int | None = None
    ) -> None:
        if lengths is not None and (len(lengths) != length or not batch_size):
            raise ValueError("EpochShuffle: lengths needs one entry per sample and a batch_size")
        self.length = length
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples) already trained on before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples: int) -> None:
        """Continue ``epoch`` after its first ``samples`` indices, which a checkpoint saved mid-epoch has trained on.

        Lightning restores its loop counters mid-epoch but restarts the loader's iterator; without this, the
        resumed epoch would train on its first batches again and never see its last ones.
        """
        if samples >= self.length:  # saved at the epoch's end: the next epoch starts whole
            epoch, samples = epoch + 1, 0
        self.epoch = epoch  # the iterator may draw indices before Lightning's `set_epoch` call
        self._skip = (epoch, samples) if samples > 0 else None

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is not None:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = list(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))
        else:
            order = torch.randperm(self.length, generator=g).tolist()
        if self._skip is not None:
            epoch, samples = self._skip
            self._skip = None
            if epoch == self.epoch:
                order = order[samples:]
        return iter(order)

    def __len__(self) -> int:
        return self.length


class RowNumbers(torch.utils.data.Dataset):
    """A training dataset whose rows carry their row number as ``index``: the prefix cache's key.

    ``add_column`` would do the same but rewrites a shuffled subset's whole Arrow table first (~10 s for 40k
    Fashion-MNIST images, a twentieth of ``effnet_fashion``'s budget); this adds the numbers as rows are read.
    Once the prefix cache holds every row, ``serve_cached(True)`` makes rows ``{index, labels}`` only: no image is
    decoded, no text collated, and ``RowLoader`` makes those batches in the main process (``batch``). The switch is
    a shared-memory flag, so worker processes (persistent or not, forked or spawned) of any other loader over it see
    it from their next batch on.

    Args:
        data: a ``datasets.Dataset`` (with its transform) or any map-style dataset of dicts.
        label_column: the column ``labels`` come from when rows are served from the cache (read once, from Arrow).
    """

    def __init__(self, data: Any, label_column: str = "labels") -> None:
        self.data = data
        self.label_column = label_column
        self._cached = torch.zeros((), dtype=torch.bool).share_memory_()
        # Read now (one Arrow column, milliseconds), so that worker processes started from here have them too.
        try:
            self._labels: torch.Tensor | None = torch.as_tensor(list(data.with_format(None)[label_column]))
        except (AttributeError, KeyError, TypeError, ValueError):
            self._labels = None  # not a `datasets.Dataset` with that column: every epoch reads raw rows

    def __len__(self) -> int:
        return len(self.data)

    @property
    def can_serve_cached(self) -> bool:
        return self._labels is not None

    def serve_cached(self, on: bool) -> None:
        self._cached.fill_(on and self.can_serve_cached)

    @property
    def cached(self) -> bool:
        return bool(self._cached)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cached:
            return {"index": i, "labels": self._labels[i]}
        return {**self.data[i], "index": i}

    def __getitems__(self, keys: list[int]) -> list[dict[str, Any]]:
        if self.cached:
            return [{"index": i, "labels": self._labels[i]} for i in keys]
        rows = self.data.__getitems__(keys)  # one batched read and transform, as DataLoader does for a Dataset
        return [{**row, "index": i} for row, i in zip(rows, keys)]

    def batch(self, keys: list[int]) -> dict[str, torch.Tensor]:
        """The batch of a cached epoch for ``keys``, collated: the tensors ``default_collate`` makes of
        ``__getitems__(keys)`` (int64 ``index``; ``labels`` as read from Arrow), without a dict per row."""
        index = torch.tensor(keys, dtype=torch.long)
        return {"index": index, "labels": self._labels[index]}


@runtime_checkable
class IndexedData(Protocol):
    """What a data module declares so that ``FineTuning`` can cache the frozen prefix (``callbacks/caching.py``).

    The cache keys its rows by the ``index`` of each training example; once it holds every row it switches the
    dataset with ``RowNumbers.serve_cached`` (and back when it is dropped), and the training loader serves cached
    epochs from it. A data module without this method trains uncached; the run summary says why.

    Example:
        >>> from lightning.pytorch import LightningDataModule
        >>> class Numbers(LightningDataModule):
        ...     def index_dataset(self) -> RowNumbers | None:
        ...         return None  # no numbered rows: nothing is cached
        >>> isinstance(Numbers(), IndexedData)
        True
    """

    def index_dataset(self) -> RowNumbers | None:
        """The dataset the training loader reads, as the same ``RowNumbers`` on every call; None: the training
        rows carry no ``index``."""
        ...


def cache_aware(collate: Callable[[list[dict[str, Any]]], Any]) -> Callable[[list[dict[str, Any]]], Any]:
    """``collate`` for rows with raw inputs; torch's default for the ``{index, labels}`` rows of a cached epoch."""
    from torch.utils.data import default_collate

    def apply(rows: list[dict[str, Any]]) -> Any:
        return default_collate(rows) if rows and rows[0].keys() == {"index", "labels"} else collate(rows)

    return apply


def train_progress(trainer: Trainer | None) -> dict[str, int]:
    """Where a fit stands: the epoch and how many of its training batches have run, for a data module's
    ``state_dict`` (Lightning saves it in every checkpoint). Empty outside ``fit``."""
    if trainer is None or trainer.state.fn != "fit":
        return {}
    processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return {"epoch": int(trainer.current_epoch), "batches": int(processed)}


class RowLoader(DataLoader):
    """A training ``DataLoader`` that makes the batches of a cached epoch in this process.

    Once the prefix cache holds every row, the dataset (``RowNumbers``) serves ``{index, labels}`` only, and handing
    such a batch over from a worker process (two tensors pickled into shared memory) costs more than the step that
    trains on it (~1.5 ms against ~1 ms for effnet_fashion's head). Then ``iter`` starts no worker: it reads the same
    batch sampler in the same order (an ``EpochShuffle``'s, resumed mid-epoch where it stopped, or Lightning's
    distributed sampler) and gathers the same tensors (``RowNumbers.batch``). Other epochs go through torch's loader.
    """

    _iterated = False  # whether torch's iterator was made (persistent workers draw their seed only then)

    def __iter__(self) -> Iterator[Any]:
        rows = self.dataset
        if not (isinstance(rows, RowNumbers) and rows.cached):
            self._iterated = True
            return super().__iter__()
        # Draw what making torch's iterator draws (its workers' base seed: from the global generator when the loader
        # has none), so that the random draws after it (dropout) are those of the batches served by workers.
        if not (self.persistent_workers and self.num_workers > 0 and self._iterated):
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return map(rows.batch, self.batch_sampler)


class ResumableLoader(RowLoader):
    """A ``DataLoader`` over an ``EpochShuffle`` that a checkpoint saved mid-epoch resumes where it stopped.

    Lightning saves the ``state_dict`` of a loader that has one in every checkpoint and gives it back before the
    resumed epoch starts (its ``_Stateful`` protocol); the state is the fit's position, read from ``progress``
    (``train_progress``): the loader's own iterator runs ahead of training (worker prefetching).
    """

    def __init__(self, *args: Any, progress: Callable[[], dict[str, int]], **kwargs: Any) -> None:
        # Its own generator (seeded from the run's seed): creating an iterator draws its worker seed from it, not
        # from the global one, whose draws (dropout) a resume continues.
        kwargs.setdefault("generator", torch.Generator().manual_seed(torch.initial_seed()))
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        return self.progress()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffle) and state_dict:
            self.sampler.resume(state_dict["epoch"], state_dict["batches"] * (self.batch_size or 1))


def train_loader(
    datamodule: Any, data: Any, batch_size: int, seed: int, lengths: list[int] | None = None, **kwargs: Any
) -> DataLoader:
    """A data module's training ``DataLoader``.

    In one process: an ``EpochShuffle`` order (grouped by ``lengths`` when given) in a ``ResumableLoader``, so every
    checkpoint saves the fit's position and a resume is exact. Under DDP: ``shuffle=True`` (or a
    ``LengthGroupedSampler``), for which Lightning substitutes its distributed sampler, seeded per epoch too.
    ``kwargs`` go to the ``DataLoader`` (workers, collate_fn, pin_memory ...). Either serves the cached epochs of a
    ``RowNumbers`` dataset in this process (``RowLoader``); a new loader reads whole rows until the cache, full,
    switches them (a fit that stopped with them switched leaves no trace in the next).
    """
    if isinstance(data, RowNumbers):
        data.serve_cached(False)
    trainer = datamodule.trainer
    if trainer is not None and trainer.world_size > 1:
        if lengths is None:
            return RowLoader(data, batch_size=batch_size, shuffle=True, **kwargs)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return RowLoader(
            data, batch_size=batch_size, sampler=LengthGroupedSampler(batch_size, lengths=lengths), **kwargs
        )
    return ResumableLoader(
        data,
        progress=lambda: train_progress(datamodule.trainer),
        batch_size=batch_size,
        sampler=EpochShuffle(len(data), seed, lengths=lengths, batch_size=batch_size),
        **kwargs,
    )
