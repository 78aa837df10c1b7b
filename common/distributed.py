"""The torchrun environment, the process group, sharded samplers, synchronised batch norm,
and rank-aware helpers. With no torchrun environment everything here is a cheap no-op, so
single-process code calls the same functions.

DDP is on when torchrun's environment (WORLD_SIZE > 1) is present: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(rank=int(os.environ.get("RANK", "0")), world_size=world,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_process_group(ctx: DistContext, device: torch.device, timeout_s: float) -> str:
    """Join the job's process group (nccl on CUDA, gloo otherwise); returns the backend."""
    if not ctx.enabled or dist.is_initialized():
        return dist.get_backend() if dist.is_initialized() else "none"
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if backend == "nccl" else {}
    timeout = _dt.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", ctx.rank, ctx.world_size, timeout=timeout))
    # Keys of an attempt that torchrun restarted (--max-restarts) must not be read by the next
    # one: a stale peer address makes the new group fail to connect.
    store = dist.PrefixStore(f"toolkit/attempt{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size,
                            timeout=timeout, **extra)
    return backend


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics), so all ranks evaluate
    exactly the model that rank 0 saves. DDP only syncs them at the next training forward."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ShardSampler(Sampler[int]):
    """This rank's share of an epoch: indices rank, rank + world, rank + 2*world, ...

    Training (shuffle=True, pad=True): a permutation that depends only on (seed, epoch), padded
    with its first indices so every rank gets the same number of batches (no rank waits for
    another at the end). With one process it is simply that permutation, so a 1-process batch
    of 2B holds exactly the samples of the two ranks' batches of B.
    Evaluation (shuffle=False, pad=False): every sample exactly once across ranks; ranks may
    get one sample fewer, which is safe because evaluation runs no collective per batch.
    """

    def __init__(self, data: Sized, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 pad: bool = True, seed: int = 0):
        self.n, self.rank, self.world = len(data), rank, world_size
        self.shuffle, self.pad, self.seed = shuffle, pad, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad and self.n:
            total = math.ceil(self.n / self.world) * self.world
            order += (order * math.ceil(total / self.n))[: total - self.n]
        return iter(order[self.rank::self.world])

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world)
        return len(range(self.rank, self.n, self.world))

    @property
    def padding(self) -> int:
        """How many of this rank's last indices repeat others (0 or 1 per epoch here): the
        training step learns from them, the reduced totals leave them out (each sample counts once)."""
        return len(self) - len(range(self.rank, self.n, self.world)) if self.n else 0


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics span all ranks, for gloo (torch's SyncBatchNorm
    only runs on GPUs). Differentiable all-reduces carry the gradient across ranks."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = all_reduce(x.sum(dims)) / count
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
                self.num_batches_tracked.add_(1)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """--sync-bn: torch's SyncBatchNorm on GPUs, CpuSyncBatchNorm on the CPU (same weights)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_cpu_sync_bn(model)


def _to_cpu_sync_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync_bn(child))
    return out


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
