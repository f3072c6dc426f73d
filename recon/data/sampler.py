"""Training batches that do not depend on the number of processes: one global batch per step, split over ranks.

With ``data.batch_size = B`` and ``W`` processes, every step draws the same ``B`` views as a one-process run
(one permutation per epoch from a seed all ranks share) and rank ``r`` takes views ``r*B/W .. (r+1)*B/W - 1``
of it. DDP averages the ranks' gradients, so a W-process run follows the one-process run up to float rounding.
Plain torch: no Lightning, no Hydra.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from recon.data.frames import DataError


def run_seed() -> int:
    """The run's seed, the same in every process: ``seed`` of the config as ``lightning.seed_everything`` exports it
    (``PL_GLOBAL_SEED``, which launched ranks inherit or set themselves); 0 when nothing set it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SharedPermutation(Sampler[int]):
    """A random order of ``n`` indices per epoch, a function of (seed, epoch) only, so every rank draws the same one.

    ``set_epoch`` picks the epoch (Lightning calls it on ``DataLoader.batch_sampler.sampler`` at each epoch start).
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # as torch's DistributedSampler: seed + epoch
        return iter(torch.randperm(self.n, generator=g).tolist())


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's slice of each global batch of ``global_batch`` indices of ``sampler``.

    sampler: the global order (a :class:`SharedPermutation`). global_batch: views per step over all ranks
    (``data.batch_size``); it must divide by ``world_size``. rank: this process's global rank.
    An epoch is ``n // global_batch`` full global batches (the rest is dropped); with fewer than ``global_batch``
    views it is one batch of all ``n``, which must then divide by ``world_size`` too.
    """

    def __init__(self, sampler: SharedPermutation, global_batch: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes.")
        if global_batch <= 0 or global_batch % world_size:
            raise DataError(
                f"data.batch_size={global_batch} is the global batch (views per step over all processes) and must "
                f"divide by the number of processes, {world_size} (trainer.devices x trainer.num_nodes). "
                f"Set data.batch_size to a multiple of {world_size}."
            )
        n = len(sampler)
        if n < global_batch and n % world_size:
            raise DataError(
                f"the training split has {n} views, fewer than data.batch_size={global_batch}, and {n} does not "
                f"divide by the {world_size} processes: use more training views or data.batch_size={n - n % world_size}."
            )
        self.sampler, self.rank, self.world_size = sampler, int(rank), int(world_size)
        self.global_batch = min(int(global_batch), n)  # fewer views than a batch: one batch of all of them
        self._skip = 0

    def resume_at(self, step: int) -> None:
        """Continue a run at global ``step``: the next pass over the epoch starts at the batch that step would have
        drawn (every epoch is ``len(self)`` steps, so the epoch in progress is ``step // len(self)``, as Lightning's
        restored epoch counter says), not at the epoch's first batch. A resumed run so draws the views the
        uninterrupted run drew."""
        self._skip = int(step) % len(self) if len(self) else 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch if self.global_batch else 0

    def __iter__(self) -> Iterator[list[int]]:
        order, per_rank = list(self.sampler), self.global_batch // self.world_size
        skip, self._skip = self._skip, 0
        for step in range(skip, len(self)):
            start = step * self.global_batch + self.rank * per_rank
            yield order[start:start + per_rank]
