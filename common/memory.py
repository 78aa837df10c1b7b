"""Out-of-memory recovery that keeps training, and the memory settings a resume keeps.

On an out-of-memory error inside a training step the engine frees the step's memory, zeroes
the gradients of the current accumulation group and asks OOMRecovery what to change:
1. a model with gradient checkpointing (``set_grad_checkpointing``) that has it off: turn it on;
2. otherwise halve the micro-batch: every loaded batch then runs as twice as many chunks with
   their losses weighted by size, which is "half the micro-batch, twice the accumulation" -- the
   effective batch, the learning rate and the optimizer steps stay the same;
then the group is replayed from its first batch (no restart, no lost epoch). At micro-batch 1
with checkpointing on there is nothing left to lower, and training stops with a clear message.
Only torch.OutOfMemoryError is handled: any other CUDA error (an illegal memory access, say)
leaves the device in an unknown state and is never retried.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checkpoint import unwrap_model
from .errors import UserError


def supports_grad_checkpointing(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), "set_grad_checkpointing")


def grad_checkpointing_on(model: nn.Module) -> bool:
    return bool(getattr(unwrap_model(model), "grad_checkpointing", False))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OOMRecovery:
    """Decides what to lower after an out-of-memory error. `batch_size` is the loaded batch."""

    def __init__(self, batch_size: int, accumulate: int, log: Callable[[str], None]):
        self.batch_size, self.accumulate, self.log = batch_size, accumulate, log

    def micro_batch(self, splits: int) -> int:
        return math.ceil(self.batch_size / splits)

    def recover(self, exc: BaseException, model: nn.Module, splits: int) -> int:
        """Change one setting; returns the new number of chunks per loaded batch."""
        free_memory()
        plain = unwrap_model(model)
        if supports_grad_checkpointing(plain) and not grad_checkpointing_on(plain):
            plain.set_grad_checkpointing(True)
            self.log("out of memory: turned on gradient checkpointing; retrying the same batch")
            return splits
        old = self.micro_batch(splits)
        if old <= 1:
            checkpointing = " with gradient checkpointing on" if supports_grad_checkpointing(plain) else ""
            raise UserError(f"out of memory even at micro-batch 1{checkpointing}"
                            ": lower the image size (--img-size or --scale), use --amp, pick a smaller "
                            "model, or free the GPU of other processes") from exc
        new_splits = min(splits * 2, self.batch_size)
        new = self.micro_batch(new_splits)
        self.log(f"out of memory: micro-batch {old} -> {new}, accumulation "
                 f"{self.accumulate * splits} -> {self.accumulate * new_splits} (effective batch "
                 f"{self.batch_size * self.accumulate} unchanged); retrying the same batch")
        return new_splits


def memory_state(model: nn.Module, batch_size: int, accumulate: int, splits: int) -> dict[str, Any]:
    """What checkpoint.pth keeps so that a resumed run starts with the settings that fitted."""
    return {"micro_batch": math.ceil(batch_size / splits), "accumulate": accumulate * splits,
            "grad_checkpointing": grad_checkpointing_on(model)}


def restore_memory_state(train_state: dict[str, Any], model: nn.Module, batch_size: int,
                         log: Callable[[str], None]) -> int:
    """Apply a saved memory state; returns the chunks per loaded batch to use."""
    if train_state.get("grad_checkpointing") and supports_grad_checkpointing(model):
        unwrap_model(model).set_grad_checkpointing(True)
        log("resume: gradient checkpointing on, as when the checkpoint was saved")
    micro = int(train_state.get("micro_batch") or batch_size)
    splits = max(1, math.ceil(batch_size / max(micro, 1)))
    if splits > 1:
        log(f"resume: micro-batch {math.ceil(batch_size / splits)} (out-of-memory recovery), "
            f"batch {batch_size} per step as before")
    return splits
