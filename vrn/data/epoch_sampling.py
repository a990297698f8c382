"""Training order and augmentation that depend only on (seed, epoch, place in the epoch), so a
resumed run replays exactly what an uninterrupted run would have drawn.

PyTorch's default shuffling draws a fresh seed from the global torch RNG every epoch, whose
state a checkpoint does not keep, so a resumed run would see its next epochs in another order.
:class:`EpochShuffleSampler` instead permutes with ``seed + epoch`` (as Lightning's
``DistributedSampler`` does under DDP) and tells the dataset the epoch (:class:`EpochClock`),
which seeds its augmentation draws with ``(seed, epoch, index)``.

Within an epoch, :class:`ResumableLoader` keeps in the checkpoint how many batches the epoch
had consumed, and the resumed run skips them (Lightning restarts a plain loader's epoch from its
first batch), so a run resumed mid-epoch also matches an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["EpochClock", "EpochShuffleSampler", "ResumableLoader", "trainer_progress"]


class EpochClock:
    """The current training epoch, shared with DataLoader worker processes.

    The value lives in a shared-memory int64 tensor, so worker copies of a dataset (also
    ``persistent_workers``) see :meth:`set` of the main process at the next epoch.
    """

    def __init__(self) -> None:
        self._t = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._t.fill_(int(epoch))

    def get(self) -> int:
        return int(self._t.item())


class EpochShuffleSampler(DistributedSampler):
    """Shuffles the training set with ``seed + epoch`` and shards it over ``num_replicas`` ranks.

    A ``DistributedSampler`` subclass (Lightning keeps it under DDP instead of putting its own in
    the loader): padding, sharding and order are those of ``DistributedSampler(shuffle=True)``.

    The epoch is ``epoch_fn()`` read when an epoch's iteration starts (``trainer.current_epoch``),
    else the last ``set_epoch`` (called by Lightning at each epoch start). Reading it at the start
    matters on resume: Lightning creates the first epoch's iterator (and prefetches a batch)
    before it calls ``set_epoch``. The epoch is also given to the dataset's ``epoch_clock``
    (:class:`EpochClock`) before any index is handed out, so workers augment with it.

    Args:
        dataset: the training dataset.
        seed: shuffling seed (the run's ``seed``).
        num_replicas, rank: DDP world size and this process's global rank (1, 0 alone).
        epoch_fn: the current epoch (None: ``set_epoch`` only).
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))  # type: ignore[arg-type]
        self.epoch_fn = epoch_fn
        #: (epoch, indices to skip) for the first iteration after a resume (ResumableLoader)
        self.resume_at: tuple[int, int] | None = None

    def _tell_dataset(self) -> None:
        clock: Any = getattr(self.dataset, "epoch_clock", None)
        if isinstance(clock, EpochClock):
            clock.set(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._tell_dataset()

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.epoch = int(self.epoch_fn())
        self._tell_dataset()
        skip = 0
        if self.resume_at is not None:
            epoch, n = self.resume_at
            self.resume_at = None
            skip = n if epoch == self.epoch else 0
        return iter(list(super().__iter__())[skip:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochShuffleSampler` whose place in the epoch is part of
    Lightning checkpoints (Lightning saves and restores loaders that have ``state_dict`` /
    ``load_state_dict``).

    ``progress_fn()`` gives ``(epoch, batches of this epoch consumed by training)`` when a
    checkpoint is written (the loader itself has prefetched further). After
    :meth:`load_state_dict`, the first epoch iterated, if it is that epoch, skips those batches.

    Args:
        dataset, batch_size, **kwargs: as ``DataLoader``; ``sampler`` must be an
            :class:`EpochShuffleSampler`.
        progress_fn: the trainer's ``(current_epoch, batches consumed this epoch)``.
    """

    def __init__(
        self, dataset: Any, *args: Any, progress_fn: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.progress_fn = progress_fn

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress_fn() if self.progress_fn is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler = self.sampler
        if isinstance(sampler, EpochShuffleSampler) and self.batch_size:
            sampler.resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]) * int(self.batch_size))


def trainer_progress(trainer: Any) -> tuple[int, int]:
    """``(current epoch, training batches this epoch has consumed)`` of a Lightning ``Trainer``:
    what a :class:`ResumableLoader` saves. At a checkpoint written after batch ``b`` (0-based) of
    the epoch the count is ``b + 1``; the resumed run's next batch is then batch ``b + 1``."""
    return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
