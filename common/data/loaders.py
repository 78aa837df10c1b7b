"""DataLoader construction with the performance rules: workers, pinning only with CUDA,
persistent workers, prefetching, a spawn-safe setup on Windows, and sharded epoch-seeded
sampling (a resumed run sees exactly the data order of an uninterrupted one, and under DDP
each rank reads its own share)."""
from __future__ import annotations

import sys

from torch.utils.data import DataLoader, Dataset

from ..distributed import ShardSampler

# Windows has no fork: workers start with spawn and re-import everything (kept explicit here
# so the tests can run the same path on Linux).
WORKER_START_METHOD = "spawn" if sys.platform == "win32" else None


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int,
                pin_memory: bool, seed: int = 0, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, persistent_workers: bool = True, prefetch_factor: int = 4
                ) -> DataLoader:
    """Training: shuffled and padded to equal shares; evaluation: in order, every sample once.
    persistent_workers and prefetch_factor apply when there are workers."""
    sampler = ShardSampler(dataset, rank=rank, world_size=world_size,  # type: ignore[arg-type]
                           shuffle=train, pad=train, seed=seed)
    extra = {}
    if num_workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor}
        if WORKER_START_METHOD:
            extra["multiprocessing_context"] = WORKER_START_METHOD
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last, **extra)
