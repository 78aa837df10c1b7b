"""Run under torchrun (2 processes, gloo): train the same tiny models as a 1-process run with
twice the batch would, and save rank 0's weights. Modes: plain (no batch norm), syncbn
(batch norm with --sync-bn), accum (gradient accumulation with no_sync), cached (the decode-once
data path: uint8 images on the device, batch augmentation with per-sample parameters)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from common.data.batch_aug import BatchAugment  # noqa: E402
from common.data.device_batches import CachedBatches  # noqa: E402
from common.data.loaders import make_loader  # noqa: E402
from common.distributed import (  # noqa: E402
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


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g),
                                          torch.randint(0, 3, (64,), generator=g))


def cached_batches(batch: int, rank: int, world: int) -> CachedBatches:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 10, 10), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
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


def train(mode: str, batch: int, accumulate: int, rank: int, world: int) -> torch.nn.Module:
    plain = model_for(mode)
    model = plain
    if world > 1:
        if mode == "syncbn":
            plain = model = convert_sync_batchnorm(plain, CPU)
        model = wrap_ddp(plain, CPU)
        model.register_comm_hook(None, counting_allreduce)
    loader = make_loader(dataset(), batch, train=True, num_workers=0, pin_memory=False, seed=5,
                         rank=rank, world_size=world)
    if mode == "cached":
        loader = cached_batches(batch, rank, world)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    steps = len(loader) // accumulate
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=steps)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(model, ClassificationTask(3), loader, opt, schedule, make_precision(CPU, amp=False),
                        CPU, StepConfig(accumulate=accumulate, show_progress=False), TrainState())
    return plain


def main() -> None:
    out = Path(sys.argv[1])
    ctx = context_from_env()
    init_process_group(ctx, CPU, 60)
    try:
        for mode, (batch, accumulate) in MODES.items():
            ALL_REDUCES["n"] = 0
            plain = train(mode, batch, accumulate, ctx.rank, ctx.world_size)
            if ctx.is_main:
                torch.save(plain.state_dict(), out / f"{mode}.pt")
                (out / f"{mode}.allreduces").write_text(str(ALL_REDUCES["n"]))
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
