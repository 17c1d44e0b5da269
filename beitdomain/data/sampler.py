"""A batch sampler whose order is a pure function of (seed, epoch), so a run can resume mid-epoch.

A resumed run must see exactly the batches the uninterrupted run would have seen: the order of
epoch `e` comes from a generator seeded with (seed, e), sharded across ranks, and iteration can
start at any batch of the epoch. Augmentation randomness is seeded per item by the dataset, so
the number of loader workers does not change what a batch holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochIndex(int):
    """A dataset index that carries its epoch, as an int that any dataset can use as one.

    The epoch decides an item's augmentation (`ImageDataset.rng`). Sent with every index, it
    reaches loader workers that live across epochs (`persistent_workers`), which a
    `set_epoch` call in the main process would not; so the workers start once per run, not
    once per epoch.
    """

    epoch: int

    def __new__(cls, value: int, epoch: int) -> EpochIndex:
        obj = super().__new__(cls, value)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # keeps the epoch through pickling
        return (EpochIndex, (int(self), self.epoch))


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (or weighted) batches of dataset indices, sharded over ranks, resumable.

    Args:
        num_items: dataset length.
        batch_size: items per batch, per rank.
        seed: the run's seed; epoch `e` is ordered by a generator seeded with seed * 1_000_003 + e.
        shuffle: shuffle each epoch (training) or keep order (evaluation).
        drop_last: drop the final partial batch of each rank's shard.
        rank, world_size: this process's shard.
        weights: per-item sampling weights (class-balanced sampling); draws with replacement.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        if num_items <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} items over {world_size} process(es) give no full batch of "
                f"{batch_size}; lower the batch size to at most {self.per_rank}"
            )

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_items / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts: batch `start_batch` of epoch `epoch`."""
        self.epoch = epoch
        self.start_batch = start_batch

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order (padded so every rank has as many)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total = self.per_rank * self.world_size
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        idx = order.tolist()
        idx += idx[: total - len(idx)]  # pad by wrapping, as DistributedSampler does
        return idx[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        idx = [EpochIndex(i, self.epoch) for i in self.epoch_indices(self.epoch)]
        for b in range(self.start_batch, self.batches_per_epoch):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch
