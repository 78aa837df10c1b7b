"""DataLoader construction with the performance rules: workers, pinning only with CUDA,
persistent workers, prefetching, a spawn-safe setup on Windows, and epoch-seeded shuffling
(so a resumed run sees exactly the data order of an uninterrupted one)."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Windows has no fork: workers start with spawn and re-import everything (kept explicit here
# so the tests can run the same path on Linux).
WORKER_START_METHOD = "spawn" if sys.platform == "win32" else None


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch)."""

    def __init__(self, data: Sized, seed: int):
        self.n = len(data)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int,
                pin_memory: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    sampler = EpochShuffleSampler(dataset, seed) if train else None  # type: ignore[arg-type]
    extra = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": 4}
        if WORKER_START_METHOD:
            extra["multiprocessing_context"] = WORKER_START_METHOD
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last, **extra)
