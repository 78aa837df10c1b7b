"""Batches drawn by index from a data set decoded once into one uint8 tensor (data/cache.py),
augmented as whole batches on the device (data/batch_aug.py): no DataLoader, no workers, no
per-sample Python between two steps.

The order is the ShardSampler's (a permutation of (seed, epoch), sharded by rank), so fit()'s
set_epoch, resume and DDP behave exactly as with the DataLoader. The augmentation parameters of
an epoch are drawn once for every sample of the data set from a generator seeded by
(seed, epoch) and picked by sample index: sample i gets the same crop, flip and colours whether
it lands in a batch of 64 on one process or of 32 on each of two, and a resumed run draws what
the uninterrupted one drew. Nothing here reads a value back from the device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..distributed import ShardSampler
from .batch_aug import BatchAugment

_EPOCH_STRIDE = 1_000_003


def _pick(params: Any, index: torch.Tensor) -> Any:
    """The per-sample parameters of the samples in `index` (every field is indexed by sample)."""
    if params is None:
        return None
    return type(params)(**{f.name: getattr(params, f.name)[index] for f in dataclasses.fields(params)})


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, augment with one thread: the batch's many small element-wise kernels gain little
    from a second one, and when another process holds a core, OpenMP's barriers made them 10-35x
    slower (measured on a busy 2-core machine: 6 ms per batch of 32 at 64 px on one thread,
    218 ms on two). The model's large kernels keep every thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CachedBatches:
    """An iterable of (inputs, targets) batches like a DataLoader's, already on `device`.

    images: uint8 (N, C, H, W) on the device or in (pinned) RAM; targets: (N,) labels or
    (N, H, W) masks, in the same place. With masks, the augmentation moves them with the image.
    sample_files: the files of each cached row ({"file": ...}, and "mask" for pairs), for the
    reports that name samples (a non-finite step's); None where the data set has no files.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *,
                 augment: BatchAugment, train: bool, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, masks: bool = False,
                 sample_files: list[dict[str, str]] | None = None):
        if sample_files is not None and len(sample_files) != images.shape[0]:
            raise ValueError(f"{len(sample_files)} file names for {images.shape[0]} cached samples")
        self.sample_files = sample_files
        self.images, self.targets = images, targets
        self.batch_size, self.augment, self.train = batch_size, augment, train
        self.device, self.seed, self.masks = torch.device(device), seed, masks
        self.sampler = ShardSampler(range(images.shape[0]), rank=rank, world_size=world_size,
                                    shuffle=train, pad=train, seed=seed)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def dataset_size(self) -> int:
        return int(self.images.shape[0])

    def _epoch_params(self) -> Any:
        if not self.train or self.augment.kind == "eval":
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * _EPOCH_STRIDE + self.sampler.epoch)
        return self.augment.sample(self.dataset_size, generator, self.device)

    def _gather(self, source: torch.Tensor, index_host: torch.Tensor,
                index_dev: torch.Tensor) -> torch.Tensor:
        """Rows of `source` (flattened per sample: index_select of whole rows is a plain copy)."""
        flat = source.view(source.shape[0], -1)
        if source.device == self.device:
            return flat.index_select(0, index_dev).view(-1, *source.shape[1:])
        rows = flat.index_select(0, index_host).view(-1, *source.shape[1:])
        if self.device.type == "cuda":  # a RAM cache feeding a GPU: pinned, then asynchronous
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        order_dev = order.to(self.device, non_blocking=True)
        params = self._epoch_params()
        for start in range(0, order.shape[0], self.batch_size):
            with _one_cpu_thread(self.device):  # not around the yield: the step keeps its threads
                batch = self._batch(order[start:start + self.batch_size],
                                    order_dev[start:start + self.batch_size], params)
            yield batch

    def _batch(self, host: torch.Tensor, dev: torch.Tensor, params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = self._gather(self.images, host, dev)
        targets = self._gather(self.targets, host, dev)
        picked = _pick(params, dev)
        if self.masks:
            return self.augment.apply(images, picked, masks=targets)
        return self.augment.apply(images, picked), targets
