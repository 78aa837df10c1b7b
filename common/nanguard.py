"""The NaN/Inf guard of the training step, without a host synchronisation per step.

A non-finite loss or gradient stops the run (--nan-policy stop, the default) or skips that optimizer
step (--nan-policy skip; more than --nan-max-skips skipped steps stop the run).

Detection stays on the device
- Every micro-batch folds torch.isfinite(loss) into a device flag; at the optimizer step the gradient
  norm (clip_grad_norm_'s with --clip-grad, else torch.nn.utils.get_total_norm) is checked the same
  way. With GradScaler (float16 AMP on CUDA) the scaler checks the gradients itself and skips steps
  that overflow, as it always does: those are the scaler's normal work and do not count here.
- A count of non-finite steps and the position of the first one stay on the device. They are read
  every --log-interval steps and at the end of the epoch, where the engine reads its totals anyway,
  and all-reduced (max) over DDP ranks at that read, so every rank stops at the same batch. A stop
  comes at most --log-interval steps after the fault and always before that epoch's checkpoint is
  written: checkpoint.pth and best_model.pth keep the last good epoch.
- At the end of each epoch the weights and buffers themselves are checked (an update can overflow
  from finite gradients, BatchNorm's running variance from huge activations); a non-finite one
  stops the run under either policy, naming it.

How skip leaves no trace of the step (all on the device)
- The optimizer step is gated the way GradScaler gates it on CUDA: a fused optimizer (Adam, AdamW or
  SGD with fused=True; trainer.run_job builds one for --nan-policy skip) takes a `found_inf` tensor
  and, when it is set, leaves the weights, the moments and the step counters exactly as they were.
  (Scaling the gradients by 0 would not do: Adam's moments would still decay, its step counter
  advance, and weight decay apply.) With GradScaler the loss flag poisons one gradient with NaN, so
  the scaler's own check skips the step. An unfused optimizer falls back to reading the flag on the
  host before each step (one synchronisation per step, said once in the log).
- The buffers (BatchNorm running statistics, which the forward pass has already updated) and the
  epoch's loss and metric totals are put back to their values at the start of the step with
  torch.where. The learning-rate schedule and the weights' moving average (--ema) still advance,
  as they do over GradScaler's skipped steps.
- torch's fused SGD creates its momentum buffers with empty_like in its first step and leaves them
  uninitialised when that step is skipped; they are created as zeros beforehand (the same update
  when dampening is 0, which it is here).
- Under DDP the gate is the check of the all-reduced gradients, the same on every rank, so the
  replicas never diverge; a non-finite loss on one rank alone with a finite gradient (rare: a NaN
  loss almost always has NaN gradients) is applied, and counted toward --nan-max-skips.
- The count is per invocation: a resumed run starts again from 0 skipped steps.

On a stop, NonFiniteStop (a UserError: one `error:` line, exit code 2, no traceback) names the epoch
and step of the first non-finite step; trainer.run_job writes nonfinite_batch.json with that step's
sample indices per rank (and file names where the data set has them: image folders and image/mask
pairs, cached or not; a torchvision set has none) and waits for rank 0's writes on every rank before leaving.
The indices are replayed from the loader's ShardSampler (a permutation of seed and epoch).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import SequentialSampler

from .distributed import ShardSampler
from .errors import UserError

POLICIES = ("stop", "skip")
_BIG = 1 << 40  # encodes "the earliest step" for an all-reduce with MAX
_LOSS, _GRADIENT = 2, 1  # what was not finite first (MAX across ranks prefers the loss)


@dataclass
class NonFiniteReport:
    """The first non-finite step of the run, on the host."""
    reason: str                 # "loss", "gradient" or "weights"
    epoch: int                  # 1-based
    step: int                   # optimizer step of the run, 1-based
    step_in_epoch: int          # 1-based
    steps_in_epoch: int
    batches: list[int]          # the loaded batches of that step, 1-based within the epoch
    indices: dict[int, list[int]] | None  # rank -> sample indices (None: the order is not replayable)
    count: int = 1              # non-finite steps so far
    policy: str = "stop"
    max_skips: int = 0
    tensor: str = ""            # reason "weights": the first non-finite parameter or buffer

    def describe(self) -> str:
        if self.reason == "weights":
            return (f"the model became non-finite during epoch {self.epoch} ({self.tensor} holds NaN or "
                    "infinity) while every loss and gradient was finite")
        what = "loss" if self.reason == "loss" else "gradient"
        where = f"step {self.step_in_epoch} of {self.steps_in_epoch} in the epoch"
        if self.batches != [self.step_in_epoch]:  # accumulation: a step of several loaded batches
            where += f": batches {', '.join(map(str, self.batches))}"
        return (f"the {what} was not finite (NaN or infinity) at epoch {self.epoch}, step {self.step} "
                f"({where})")

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "batches": list(self.batches),
                "nonfinite_steps": self.count, "policy": self.policy, "max_skips": self.max_skips}


class NonFiniteStop(UserError):
    """Training stopped on a non-finite loss, gradient or weight: summary; advice."""

    def __init__(self, report: NonFiniteReport, summary: str, advice: str):
        super().__init__(f"{summary}; {advice}")
        self.report, self.summary, self.advice = report, summary, advice


@dataclass
class _Epoch:
    number: int = 0          # 1-based
    steps_before: int = 0    # optimizer steps of the run before this epoch
    loader: Any = None
    accumulate: int = 1
    n_batches: int = 0
    seen_at_start: int = 0


class NonFiniteGuard:
    """The device flags of one run and their host reads.

    on_report(report) -> text saying where the report went (e.g. "its 8 samples are listed in
    out/nonfinite_batch.json"); without it the stop message lists the indices themselves."""

    def __init__(self, device: torch.device, policy: str = "stop", max_skips: int = 10, *,
                 log: Callable[[str], None] = print,
                 on_report: Callable[[NonFiniteReport], str] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"nan policy must be one of {POLICIES}, got {policy!r}")
        self.device, self.policy, self.max_skips = torch.device(device), policy, max_skips
        self.log, self.on_report = log, on_report
        self.report: NonFiniteReport | None = None
        self.seen = 0  # non-finite steps read on the host so far
        self._where = ""  # what on_report said
        self._epoch = _Epoch()
        self._buffers: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] = []
        self._primed = self._said_unfused = False
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._first = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._kind = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def skip(self) -> bool:
        return self.policy == "skip"

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized()

    # ------------------------------------------------------------------ inside the step (no sync)

    def start_epoch(self, epoch: int, steps_before: int, loader: Any, accumulate: int,
                    n_batches: int) -> None:
        self._epoch = _Epoch(epoch, steps_before, loader, max(accumulate, 1), n_batches, self.seen)
        self._first.fill_(-1)
        self._kind.zero_()

    def begin_group(self, model: nn.Module) -> None:
        """At the first batch of an optimizer step: clear its flag; skip keeps the buffers' values."""
        self._loss_bad.zero_()
        if not self.skip:
            return
        if self._buffers is None:
            self._buffers = [b for b in model.buffers() if b is not None]
            self._saved = [b.detach().clone() for b in self._buffers]
            return
        for saved, buffer in zip(self._saved, self._buffers, strict=True):
            saved.copy_(buffer)

    def restart_group(self) -> None:
        """The group is replayed from its first batch (out-of-memory recovery)."""
        self._loss_bad.zero_()

    def check_loss(self, loss: torch.Tensor) -> None:
        self._loss_bad.logical_or_(~torch.isfinite(loss.detach()))

    def before_unscale(self, model: nn.Module, scaler: torch.amp.GradScaler) -> None:
        """skip under GradScaler (one process): a non-finite loss makes the scaler skip the step."""
        if not (self.skip and scaler.is_enabled()) or self._distributed():
            return
        grad = next((p.grad for p in model.parameters() if p.grad is not None), None)
        if grad is not None:
            grad.view(-1)[:1].add_(torch.where(self._loss_bad, math.nan, 0.0).to(grad.dtype))

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             params: Iterable[torch.Tensor], grad_norm: torch.Tensor | None,
             step_in_epoch: int) -> torch.Tensor | None:
        """The optimizer step (gated with skip) and the count. Returns, with skip, the device flag of
        a skipped step, for the caller to put its totals back; else None."""
        self._prime(optimizer)
        grad_bad = None
        if not scaler.is_enabled():
            if grad_norm is None:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if grad_norm is not None:
                grad_bad = ~torch.isfinite(grad_norm)
        bad = self._loss_bad if grad_bad is None else self._loss_bad | grad_bad
        if scaler.is_enabled():
            scaler.step(optimizer)
        elif not self.skip:
            optimizer.step()
        else:
            self._gated_step(optimizer, grad_bad if self._distributed() and grad_bad is not None else bad)
        self._record(bad, step_in_epoch)
        if not self.skip:
            return None
        for saved, buffer in zip(self._saved, self._buffers or [], strict=True):
            buffer.copy_(torch.where(bad, saved, buffer))
        return bad

    def _record(self, bad: torch.Tensor, step_in_epoch: int) -> None:
        new = bad & (self._first < 0)
        self._kind.masked_fill_(new & self._loss_bad, _LOSS)
        self._kind.masked_fill_(new & ~self._loss_bad, _GRADIENT)
        self._first.masked_fill_(new, step_in_epoch)
        self._count += bad

    def _gated_step(self, optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: GradScaler's protocol
            optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
            return
        if not self._said_unfused:
            self._said_unfused = True
            self.log(f"notice: --nan-policy skip with an unfused {type(optimizer).__name__} reads a flag "
                     "on the host before every step (a fused optimizer skips on the device)")
        if not bool(bad):
            optimizer.step()

    def _prime(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero momentum buffers for fused SGD, whose own first-step buffers are uninitialised
        memory when that step is skipped (by this guard or by GradScaler)."""
        if self._primed:
            return
        self._primed = True
        if not isinstance(optimizer, torch.optim.SGD) or not getattr(optimizer, "_step_supports_amp_scaling",
                                                                     False):
            return
        for group in optimizer.param_groups:
            if group.get("momentum") and not group.get("dampening"):
                for p in group["params"]:
                    state = optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ at the reads (one sync)

    def read(self, model: nn.Module | None = None) -> None:
        """The host read, at a log interval (model None) or at the end of the epoch (model given:
        its weights are checked too). Raises NonFiniteStop when the run must stop."""
        values = [self._count, torch.where(self._first >= 0, _BIG - self._first, 0), self._kind]
        if model is not None:
            values.append(_weights_bad(model, self.device))
        vec = torch.stack([v.to(torch.int64) for v in values])
        if self._distributed():
            dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        count, first, kind, *weights = vec.tolist()
        if count > self.seen:
            if self.report is None:
                self.report = self._describe(_BIG - first if first else 0,
                                             "loss" if kind == _LOSS else "gradient")
            self.seen = self.report.count = count
            self._publish()
        if self.seen and (not self.skip or self.seen > self.max_skips):
            raise self._stop()
        if weights and weights[0]:
            self.report = self._describe(self._steps_in_epoch() - 1, "weights")
            self.report.count, self.report.tensor = self.seen, _first_non_finite(model)
            self._publish()
            raise self._stop()
        if model is not None and self.report is not None and self.seen > self._epoch.seen_at_start:
            self.log(f"warning: epoch {self._epoch.number}: skipped "
                     f"{self.seen - self._epoch.seen_at_start} optimizer step(s) whose loss or gradient "
                     f"was not finite ({self.seen} so far, at most --nan-max-skips {self.max_skips}); "
                     f"the first: {self.report.describe()}; {self._where}")

    def _steps_in_epoch(self) -> int:
        return math.ceil(self._epoch.n_batches / self._epoch.accumulate)

    def _describe(self, step_in_epoch: int, reason: str) -> NonFiniteReport:
        e = self._epoch
        first = step_in_epoch * e.accumulate
        batches = list(range(first, min(first + e.accumulate, e.n_batches))) if reason != "weights" else []
        return NonFiniteReport(reason=reason, epoch=e.number, step=e.steps_before + step_in_epoch + 1,
                               step_in_epoch=step_in_epoch + 1, steps_in_epoch=self._steps_in_epoch(),
                               batches=[b + 1 for b in batches],
                               indices=sample_indices(e.loader, batches) if batches else None,
                               policy=self.policy, max_skips=self.max_skips)

    def _publish(self) -> None:
        """Hand the report to on_report, and keep what it says about where it went."""
        report = self.report
        assert report is not None
        if self.on_report is not None:
            self._where = self.on_report(report)
        elif report.indices is None:
            self._where = "the step's sample indices are not known (its loader's order cannot be replayed)"
        else:
            flat = [i for values in report.indices.values() for i in values]
            self._where = f"its sample indices: {flat[:20]}{' ...' if len(flat) > 20 else ''}"

    def _stop(self) -> NonFiniteStop:
        report = self.report
        assert report is not None
        if report.reason == "weights":
            return NonFiniteStop(report, f"training stopped: {report.describe()}",
                                 "lower --lr or set --clip-grad")
        if not self.skip:
            return NonFiniteStop(report, f"training stopped: {report.describe()}; {self._where}",
                                 "lower --lr, set --clip-grad, or pass --nan-policy skip to skip such steps")
        return NonFiniteStop(report, f"training stopped: {self.seen} optimizer steps had a non-finite loss "
                             f"or gradient, more than --nan-max-skips {self.max_skips}; the first: "
                             f"{report.describe()}; {self._where}", "lower --lr or set --clip-grad")


def _first_non_finite(model: nn.Module) -> str:
    """The name of the first parameter or buffer with a NaN or an infinity (host reads: on a stop)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            kind = "parameter" if isinstance(tensor, nn.Parameter) else "buffer"
            return f"{kind} {name.replace('_orig_mod.', '').replace('module.', '')}"
    return "a tensor"


def _weights_bad(model: nn.Module, device: torch.device) -> torch.Tensor:
    """True (on the device) when a parameter or floating-point buffer holds a NaN or an infinity."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if torch.is_floating_point(t)]
    if not tensors:
        return torch.zeros((), dtype=torch.bool, device=device)
    return ~torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def sample_indices(loader: Any, batches: list[int]) -> dict[int, list[int]] | None:
    """rank -> data set indices of the loaded `batches` (0-based) of the current epoch, replayed from
    the loader's sampler (ShardSampler: a permutation of (seed, epoch); or in order); None for any
    other sampler, whose order cannot be replayed."""
    sampler, size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
    if not size or not isinstance(sampler, ShardSampler | SequentialSampler):
        return None
    if isinstance(sampler, ShardSampler):
        ranks = []
        for rank in range(sampler.world):
            other = copy.copy(sampler)
            other.rank = rank
            ranks.append(other)
    else:
        ranks = [sampler]
    out: dict[int, list[int]] = {}
    for rank, s in enumerate(ranks):
        order = list(s)
        out[rank] = [order[j] for b in batches for j in range(b * size, min((b + 1) * size, len(order)))]
    return out
