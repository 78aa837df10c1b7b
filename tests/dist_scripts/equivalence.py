"""Run under torchrun (2 processes, gloo): train the same tiny models as a 1-process run with
twice the batch would, and save every rank's weights. Modes: plain (no batch norm), syncbn
(batch norm with --sync-bn), accum (gradient accumulation with no_sync), cached (the decode-once
data path: uint8 images on the device, batch augmentation with per-sample parameters).

    python -m torch.distributed.run --standalone --nproc-per-node=2 equivalence.py OUT [N ...]

trains every mode on each data set size N (default 64) and writes, per mode, size and rank,
OUT/<mode>_<N>.rank<R>.pt (the weights after 2 epochs) and OUT/<mode>_<N>.rank<R>.json (the DDP
all-reduces of that rank and the number of samples its reduced training totals counted in each
epoch). train() with world=1 is the single-process reference the test compares them with."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from common.data.batch_aug import BatchAugment  # noqa: E402
from common.data.device_batches import CachedBatches  # noqa: E402
from common.data.loaders import make_loader  # noqa: E402
from common.distributed import (  # noqa: E402
    ShardSampler,
    context_from_env,
    convert_sync_batchnorm,
    destroy_process_group,
    init_process_group,
    wrap_ddp,
)
from common.engine import StepConfig, TrainState, train_one_epoch  # noqa: E402
from common.models.small import SmallCNN, TinyMLP  # noqa: E402
from common.optim import Schedule  # noqa: E402
from common.precision import make_precision  # noqa: E402
from common.tasks import ClassificationTask  # noqa: E402

CPU = torch.device("cpu")
MODES = {"plain": (4, 1), "syncbn": (4, 1), "accum": (2, 2), "cached": (4, 1)}  # batch, accumulation
EPOCHS = 2


def dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g),
                                          torch.randint(0, 3, (n,), generator=g))


def cached_batches(batch: int, rank: int, world: int, n: int = 64) -> CachedBatches:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 10, 10), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    augment = BatchAugment(8, (0.5,) * 3, (0.25,) * 3, kind="standard")
    return CachedBatches(images, labels, batch, augment=augment, train=True, device=CPU, seed=5,
                         rank=rank, world_size=world)


def model_for(mode: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if mode == "syncbn":
        return SmallCNN(3, width=4, dropout=0.0)
    return TinyMLP(3, pool=4, hidden=16)


ALL_REDUCES = {"n": 0}


def counting_allreduce(state, bucket):
    """DDP's default all-reduce, counted: shows that no_sync skips the non-final micro-steps."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ALL_REDUCES["n"] += 1
    return allreduce_hook(state, bucket)


class AsDealt:
    """A 1-process sampler that hands out, in one sequence, exactly what `world` ranks' ShardSamplers
    deal out together (their shares interleaved, the repeated tail included): the 1-process run
    that 2 processes equal by construction when the data does not divide by the world size."""

    def __init__(self, sampler: ShardSampler, world: int):
        self.shards = [ShardSampler(range(sampler.n), rank=r, world_size=world, shuffle=sampler.shuffle,
                                    pad=sampler.pad, seed=sampler.seed) for r in range(world)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # CachedBatches draws the epoch's augmentation from it
        for shard in self.shards:
            shard.set_epoch(epoch)

    def __iter__(self):
        shares = [list(shard) for shard in self.shards]
        return iter([share[k] for k in range(len(shares[0])) for share in shares])

    def __len__(self) -> int:
        return len(self.shards[0]) * len(self.shards)


class CountingTask(ClassificationTask):
    """Notes how many samples the reduced training totals of each epoch counted."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.counts: list[int] = []

    def summarize(self, totals):
        self.counts.append(int(totals["count"]))
        return super().summarize(totals)


def train(mode: str, batch: int, accumulate: int, rank: int, world: int, n: int = 64,
          as_dealt_to: int | None = None) -> tuple[torch.nn.Module, list[int]]:
    """The weights after EPOCHS epochs and each epoch's counted samples. as_dealt_to=W (one process
    only): read the data in the order W ranks are dealt it, repeated tail included."""
    plain = model_for(mode)
    model = plain
    if world > 1:
        if mode == "syncbn":
            plain = model = convert_sync_batchnorm(plain, CPU)
        model = wrap_ddp(plain, CPU)
        model.register_comm_hook(None, counting_allreduce)
    if mode == "cached":
        loader = cached_batches(batch, rank, world, n)
        if as_dealt_to:
            loader.sampler = AsDealt(loader.sampler, as_dealt_to)
    else:
        loader = make_loader(dataset(n), batch, train=True, num_workers=0, pin_memory=False, seed=5,
                             rank=rank, world_size=world)
        if as_dealt_to:
            loader = torch.utils.data.DataLoader(loader.dataset, batch_size=batch,
                                                 sampler=AsDealt(loader.sampler, as_dealt_to))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    steps = -(-len(loader) // accumulate)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=steps)
    task = CountingTask(3)
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(model, task, loader, opt, schedule, make_precision(CPU, amp=False),
                        CPU, StepConfig(accumulate=accumulate, show_progress=False), TrainState())
    return plain, task.counts


def main() -> None:
    out = Path(sys.argv[1])
    sizes = [int(n) for n in sys.argv[2:]] or [64]
    ctx = context_from_env()
    init_process_group(ctx, CPU, 60)
    try:
        for n in sizes:
            for mode, (batch, accumulate) in MODES.items():
                ALL_REDUCES["n"] = 0
                plain, counts = train(mode, batch, accumulate, ctx.rank, ctx.world_size, n)
                name = f"{mode}_{n}.rank{ctx.rank}"
                torch.save(plain.state_dict(), out / f"{name}.pt")
                (out / f"{name}.json").write_text(json.dumps({"allreduces": ALL_REDUCES["n"],
                                                              "counts": counts}))
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
