"""fit() / evaluate(): the one training loop every script uses.

The step never waits for the device: inputs move with non_blocking=True, loss and metric
totals stay on the device, and numbers are read only every --log-interval steps (for the
progress bar and the NaN/Inf guard, common/nanguard.py) and once at the end of an epoch.
A validation loss or metric that is not finite never makes a best model.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, broadcast_buffers
from .memory import OOMRecovery
from .optim import Schedule
from .precision import Precision
from .reporting import progress_fields, progress_title


@dataclass
class TrainState:
    """What a resumed run needs beyond the weights and the optimizer."""
    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop_best: float | None = None  # early stopping on another metric (lower is better), e.g. val loss
    stop_epoch: int = 0
    best_from_ema: bool = False  # the best model so far is the weights' moving average (--ema)

    def stop_improved(self, value: float | None, min_delta: float) -> bool:
        """Record `value` of the early-stopping metric (lower is better)."""
        if value is None or math.isnan(value):
            return False
        if self.stop_best is None or value < self.stop_best - min_delta:
            self.stop_best, self.stop_epoch = value, self.epoch
            return True
        return False

    def improved(self, value: float | None, min_delta: float) -> bool:
        """Record `value` (higher is better); True when it beats the best by min_delta."""
        if value is None or not math.isfinite(value):
            return False
        if self.best_metric is None or value > self.best_metric + min_delta:
            self.best_metric, self.best_epoch = value, self.epoch
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "history": [dict(h) for h in self.history],
                "stop_best": self.stop_best, "stop_epoch": self.stop_epoch,
                "best_from_ema": self.best_from_ema}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(epoch=int(data["epoch"]), step=int(data["step"]),
                   best_metric=data.get("best_metric"), best_epoch=int(data.get("best_epoch", 0)),
                   history=[dict(h) for h in data.get("history", [])],
                   stop_best=data.get("stop_best"), stop_epoch=int(data.get("stop_epoch", 0)),
                   best_from_ema=bool(data.get("best_from_ema", False)))


@dataclass
class StepConfig:
    """How one optimizer step is taken."""
    accumulate: int = 1
    clip_grad: float | None = None
    channels_last: bool = False
    log_interval: int = 20
    show_progress: bool = True
    splits: int = 1                      # chunks per loaded batch (raised by OOM recovery)
    recovery: OOMRecovery | None = None  # None: an out-of-memory error propagates
    # On each loaded batch, once, on the device (MixUp/CutMix): (inputs, targets) -> (inputs, targets)
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    ema: Any = None  # common.ema.EMA, updated after every optimizer step
    guard: Any = None  # common.nanguard.NonFiniteGuard: non-finite loss/gradient -> stop or skip


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = batch[0], batch[1]
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets.to(device, non_blocking=True)


def _reduced(totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum totals over ranks and bring them to the host: the one sync of an epoch."""
    return {k: all_reduce_sum(v).cpu() for k, v in totals.items()}


def _postfix(task: Any, totals: dict[str, torch.Tensor], lr: float, samples: int,
             started: float) -> dict[str, str]:
    metrics = task.summarize({k: v for k, v in totals.items() if v.dim() == 0})
    return progress_fields(metrics, lr, samples / max(time.perf_counter() - started, 1e-9))


def _micro_steps(model: nn.Module, task: Any, batch: Any, totals: dict[str, torch.Tensor],
                 precision: Precision, device: torch.device, cfg: StepConfig, per_group: int,
                 sync_at_end: bool, uncounted: int = 0) -> int:
    """Forward and backward of one loaded batch, as cfg.splits chunks. Each chunk's mean loss is
    weighted by its samples over `per_group` (the samples of a full accumulation group), so the
    gradient is that of the group's summed loss over per_group, whatever the split; a short group
    is put right at its optimizer step (_optimizer_step's `rescale`).
    uncounted: the batch's last samples that are the sampler's padding (a repeat that gives every
    rank the same number of batches): they train like the others but stay out of the totals."""
    inputs, targets = _to_device(batch, device, cfg.channels_last)
    n = targets.shape[0]
    chunks = list(zip(inputs.tensor_split(cfg.splits), targets.tensor_split(cfg.splits), strict=True))
    chunks = [c for c in chunks if c[1].shape[0] > 0]
    counted_end, start = n - uncounted, 0
    for j, (x, y) in enumerate(chunks):
        with _grad_sync(model, sync_at_end and j == len(chunks) - 1):
            with precision.autocast():
                outputs = model(x)
                loss = task.loss(outputs, y, train=True)
            if cfg.guard is not None:
                cfg.guard.check_loss(loss)
            precision.scaler.scale(loss * (y.shape[0] / per_group)).backward()
        keep = min(y.shape[0], max(counted_end - start, 0))
        start += y.shape[0]
        if keep == y.shape[0]:
            task.accumulate(totals, outputs.detach(), y, loss.detach())
        elif keep:
            kept_out, kept_y = outputs.detach()[:keep], y[:keep]
            task.accumulate(totals, kept_out, kept_y, task.loss(kept_out, kept_y, train=True))
    return n


def train_one_epoch(model: nn.Module, task: Any, loader: Iterable, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, precision: Precision, device: torch.device,
                    cfg: StepConfig, state: TrainState, desc: str = "train") -> dict[str, float]:
    """One pass over `loader`; returns the epoch's training metrics and throughput.

    Batches are grouped by cfg.accumulate (a short last group is weighted by its real size);
    the optimizer steps once per group. An out-of-memory error replays the group after
    cfg.recovery has lowered the memory need (see common/memory.py). cfg.guard checks the loss and
    the gradients on the device and reads its flags with the log interval (common/nanguard.py)."""
    model.train()
    totals = task.new_totals(device, train=True)
    n_batches = len(loader)  # type: ignore[arg-type]
    accumulate = max(cfg.accumulate, 1)
    guard = cfg.guard
    if guard is not None:
        guard.start_epoch(state.epoch + 1, state.step, loader, accumulate, n_batches)
    samples, started = 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    group: list[Any] = []
    # the sampler's padding (ShardSampler under DDP): the last batch's last samples repeat others
    padding = getattr(getattr(loader, "sampler", None), "padding", 0)
    with tqdm(total=n_batches, desc=desc, leave=False, disable=not cfg.show_progress,
              dynamic_ncols=True, mininterval=0.5) as bar:
        for i, batch in enumerate(loader):
            if cfg.batch_transform is not None:
                batch = cfg.batch_transform(*_to_device(batch, device, cfg.channels_last))
            group_start = (i // accumulate) * accumulate
            group_size = min(accumulate, n_batches - group_start)
            if i == group_start:
                group, at_group_start = [], _snapshot(totals, cfg)
                if guard is not None:
                    guard.begin_group(model)
            group.append(batch)
            last_in_group = i == group_start + group_size - 1
            per_group = group[0][1].shape[0] * group_size  # only an epoch's last batch is short
            samples += _run_guarded(model, task, group, totals, at_group_start, optimizer, precision,
                                    device, cfg, per_group, last_in_group,
                                    padding if i == n_batches - 1 else 0)
            if last_in_group:
                in_group = sum(b[1].shape[0] for b in group)  # shapes: known on the host
                skipped = _optimizer_step(model, optimizer, precision, cfg, i // accumulate,
                                          rescale=per_group / in_group)
                if skipped is not None and at_group_start is not None:  # the skipped batches do not count
                    for key, value in at_group_start.items():
                        totals[key].copy_(torch.where(skipped, value, totals[key]))
                if cfg.ema is not None:
                    cfg.ema.update()
                schedule.step()
                state.step += 1
            bar.update(1)
            if (i + 1) % cfg.log_interval == 0:
                if guard is not None:  # on every rank: under DDP the read is a collective
                    guard.read()
                if cfg.show_progress:
                    bar.set_postfix(_postfix(task, totals, schedule.lr, samples, started), refresh=False)
        if guard is not None:
            guard.read(model)
        elapsed = time.perf_counter() - started
        metrics = task.summarize(_reduced(totals))
        metrics["samples_per_s"] = samples / max(elapsed, 1e-9)
        if cfg.show_progress:  # the epoch's numbers (read here anyway), also when it is shorter than
            shown = {k: v for k, v in metrics.items() if k != "samples_per_s"}  # the log interval
            bar.set_postfix(progress_fields(shown, schedule.lr, metrics["samples_per_s"]))
    return metrics


def _snapshot(totals: dict[str, torch.Tensor], cfg: StepConfig) -> dict[str, torch.Tensor] | None:
    """Totals at the start of a group, to undo a half-done group (out-of-memory recovery) or a
    skipped step (--nan-policy skip); None when neither can happen."""
    keep = cfg.recovery is not None or (cfg.guard is not None and cfg.guard.skip)
    return {k: v.clone() for k, v in totals.items()} if keep else None


def _run_guarded(model, task, group, totals, at_group_start, optimizer, precision, device,
                 cfg: StepConfig, per_group: int, last_in_group: bool, uncounted: int) -> int:
    """Run the newest batch of the group; after an out-of-memory error, replay the whole group."""
    pending = group[-1:]
    while True:
        try:
            done = 0
            for k, batch in enumerate(pending):
                last = k == len(pending) - 1
                done = _micro_steps(model, task, batch, totals, precision, device, cfg, per_group,
                                    last_in_group and last, uncounted if last else 0)
            return done
        except torch.OutOfMemoryError as exc:
            if cfg.recovery is None:
                raise
            optimizer.zero_grad(set_to_none=True)
            if cfg.guard is not None:
                cfg.guard.restart_group()
            for key, value in (at_group_start or {}).items():
                totals[key].copy_(value)
            cfg.splits = cfg.recovery.recover(exc, model, cfg.splits)
            pending = list(group)


def _grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Under DDP, skip the gradient all-reduce on the micro-steps before the last of a group."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                    cfg: StepConfig, step_in_epoch: int, rescale: float = 1.0) -> torch.Tensor | None:
    """Clip, step, update the scaler. Returns the guard's device flag of a skipped step (skip).
    rescale: per_group / the group's samples, for a short last group (at most once an epoch), so
    its gradient is its samples' mean loss, as one batch of them gives."""
    scaler, guard = precision.scaler, cfg.guard
    if rescale != 1.0:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, rescale)
    if guard is not None:
        guard.before_unscale(model, scaler)
    norm = None
    if cfg.clip_grad:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    skipped = None
    if guard is None:
        scaler.step(optimizer)
    else:
        skipped = guard.step(optimizer, scaler, model.parameters(), norm, step_in_epoch)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return skipped


@torch.inference_mode()
def evaluate(model: nn.Module, task: Any, loader: Iterable, precision: Precision,
             device: torch.device, *, channels_last: bool = False, show_progress: bool = False,
             desc: str = "val") -> dict[str, torch.Tensor]:
    """Run the model over `loader`; returns the task's totals, summed over ranks, on the host."""
    model.eval()
    broadcast_buffers(model)
    totals = task.new_totals(device, train=False)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        inputs, targets = _to_device(batch, device, channels_last)
        with precision.autocast():
            outputs = model(inputs)
        task.accumulate(totals, outputs.float(), targets, task.loss(outputs, targets, train=False))
    return _reduced(totals)


EpochHook = Callable[[TrainState, dict[str, float], bool], None]


def fit(model: nn.Module, task: Any, train_loader: Iterable, val_loader: Iterable | None,
        optimizer: torch.optim.Optimizer, schedule: Schedule, precision: Precision,
        device: torch.device, *, epochs: int, state: TrainState, step_cfg: StepConfig,
        on_epoch_end: EpochHook | None = None, min_delta: float = 0.0,
        patience: int | None = None, log: Callable[[str], None] = print,
        eval_model: nn.Module | None = None, restore_best: bool = False,
        stop_on: str | None = None) -> TrainState:
    """Train from state.epoch to `epochs`, evaluating, saving and stopping early as asked.

    on_epoch_end(state, record, improved) runs after each epoch (saving, logging, plots);
    training stops early after `patience` epochs without an improvement > min_delta.
    eval_model: the plain model under a DDP wrapper (evaluation needs no collectives per batch,
    so ranks with one sample fewer never wait for each other).
    restore_best: at the end, put the best epoch's weights back into the model.
    stop_on: early stopping watches this validation metric (lower is better, e.g. "loss") instead
    of the one that picks the best model (task.monitor).
    """
    plain = eval_model or model
    best_weights: dict[str, torch.Tensor] | None = None
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(state.epoch, epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        train = train_one_epoch(model, task, train_loader, optimizer, schedule, precision, device,
                                step_cfg, state, desc=progress_title(epoch + 1, epochs, state.history))
        record: dict[str, float] = {"epoch": epoch + 1}
        record.update({f"train_{k}": v for k, v in train.items() if k != "samples_per_s"})
        if val_loader is not None:
            val = task.summarize(evaluate(plain, task, val_loader, precision, device,
                                          channels_last=step_cfg.channels_last))
            record.update({f"val_{k}": v for k, v in val.items()})
            if step_cfg.ema is not None:
                ema_val = task.summarize(evaluate(step_cfg.ema.module, task, val_loader, precision,
                                                  device, channels_last=step_cfg.channels_last))
                record.update({f"val_ema_{k}": v for k, v in ema_val.items()})
            schedule.epoch_end(val.get("loss"))
        record.update(lr=schedule.lr, samples_per_s=train["samples_per_s"],
                      epoch_time=time.perf_counter() - started)
        state.epoch = epoch + 1
        state.history.append(record)
        monitored, from_ema = _monitored(record, task.monitor, log)
        improved = state.improved(monitored, min_delta)
        if improved:
            state.best_from_ema = from_ema
        if improved and restore_best:
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(state, record, improved)
        if stop_on is not None:
            state.stop_improved(record.get(f"val_{stop_on}", record.get(f"train_{stop_on}")), min_delta)
        if patience is not None and _should_stop(state, task.monitor, stop_on, patience, min_delta, log):
            break
    if best_weights is not None and state.best_epoch != state.epoch:
        plain.load_state_dict(best_weights)
        log(f"restored the best weights (epoch {state.best_epoch})")
    return state


def _monitored(record: dict[str, float], monitor: str,
               log: Callable[[str], None]) -> tuple[float | None, bool]:
    """The value that picks the best model (validation, else training), and whether it is the
    moving average's (--ema), when that is the better of the two. A candidate whose metric or loss is
    not finite is none (non-finite weights give a NaN loss and an accuracy that looks like a number)."""
    split = "val_" if f"val_{monitor}" in record else "train_"
    value = _finite_candidate(record, split, monitor, log)
    ema = _finite_candidate(record, "val_ema_", monitor, log)
    if ema is not None and (value is None or ema > value):
        return ema, True
    return value, False


def _finite_candidate(record: dict[str, float], prefix: str, monitor: str,
                      log: Callable[[str], None]) -> float | None:
    value = record.get(f"{prefix}{monitor}")
    if value is None:
        return None
    bad = [f"{prefix.rstrip('_').replace('_', ' ')} {key} is {record[prefix + key]}"
           for key in dict.fromkeys((monitor, "loss"))
           if prefix + key in record and not math.isfinite(record[prefix + key])]
    if bad:
        log(f"warning: epoch {int(record['epoch'])}: {', '.join(bad)}; this epoch cannot be the best model")
        return None
    return value


def _should_stop(state: TrainState, monitor: str, stop_on: str | None, patience: int,
                 min_delta: float, log: Callable[[str], None]) -> bool:
    if stop_on is None:
        if state.epoch - state.best_epoch < patience:
            return False
        log(f"early stopping: no improvement of val {monitor} above {min_delta} for "
            f"{patience} epochs (best {state.best_metric:.4f} at epoch {state.best_epoch})")
        return True
    if state.epoch - state.stop_epoch < patience:
        return False
    log(f"early stopping: val {stop_on} has not gone below {state.stop_best:.4f} (epoch "
        f"{state.stop_epoch}) for {patience} epochs")
    return True
