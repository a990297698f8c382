"""Exact sharding of the validation / test splits across DDP ranks (no padding duplicates).

Lightning's default ``DistributedSampler`` pads every rank to the same length by repeating
samples, so a metric over the union of the shards counts a few samples twice. Here rank ``r``
of ``W`` reads the contiguous block ``[r*n//W, (r+1)*n//W)`` of the split's ``n`` samples, in
order: every sample exactly once, shard lengths differing by at most one. Sum-reduced epoch
metrics (:mod:`vrn.metrics`) are then exactly the single-process values. Training keeps
Lightning's default (shuffling, padded) sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ["ContiguousShardSampler", "eval_shard_sampler", "shard_bounds"]


def shard_bounds(n: int, num_replicas: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` dataset indices of ``rank``'s shard of ``n`` samples over ``num_replicas`` ranks.

    Raises:
        ValueError: ``rank`` is not in ``[0, num_replicas)``.
    """
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    return rank * n // num_replicas, (rank + 1) * n // num_replicas


class ContiguousShardSampler(DistributedSampler):
    """Rank ``rank``'s contiguous block of the dataset (:func:`shard_bounds`), in order, no padding.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of putting its own
    padded sampler in the loader (``Trainer(use_distributed_sampler=True)``, the default).

    Raises:
        ValueError: the dataset has fewer samples than ranks (a rank without a batch would
            skip the epoch's metric reduction and hang the others).
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, name: str = "dataset") -> None:
        n = len(dataset)
        if n < num_replicas:
            raise ValueError(
                f"{name} has {n} samples, fewer than the {num_replicas} DDP processes: "
                f"use at most trainer.devices={max(1, n)} or a larger split"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.start, self.stop = shard_bounds(n, num_replicas, rank)
        self.num_samples = self.stop - self.start
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples


def eval_shard_sampler(dataset: Sized, trainer: Any, name: str = "dataset") -> ContiguousShardSampler | None:
    """The sampler of a validation / test loader: this rank's :class:`ContiguousShardSampler`
    when ``trainer`` (a ``pl.Trainer`` or None) runs more than one process, else None (the
    loader reads the whole split in order)."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return None
    return ContiguousShardSampler(dataset, world, int(trainer.global_rank), name)
