"""Optimizers and the learning-rate schedule, stepped once per optimizer step.

One small Schedule class replaces a chain of torch schedulers: every kind (cosine, step,
warm restarts, one-cycle, plateau, none) is a formula of training progress in epochs, with a
linear warm-up in front. Its whole state is three numbers, so resume is exact even when
--epochs changes.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .errors import UserError


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float,
                    weight_decay: float, momentum: float = 0.9, amsgrad: bool = False,
                    fused: bool = False) -> torch.optim.Optimizer:
    """fused=True (used on CUDA) runs one kernel per step and lets GradScaler skip inf steps on
    the device; the unfused step would read the inf flag on the host after every step."""
    if lr <= 0:
        raise UserError(f"--lr must be positive, got {lr}")
    params = [p for p in params if p.requires_grad]
    extra = {"fused": True} if fused else {}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0, **extra)
    raise UserError(f"unknown --optimizer {name!r}; use adamw, sgd or adam")


class Schedule:
    KINDS = ("cosine", "step", "warmrestart", "onecycle", "plateau", "none")

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, *, epochs: int,
                 steps_per_epoch: int, warmup_epochs: float = 0.0, min_lr: float = 0.0,
                 step_size: int = 20, gamma: float = 0.1, t0: int = 10, t_mult: int = 2,
                 plateau_patience: int = 5):
        if kind not in self.KINDS:
            raise UserError(f"unknown --scheduler {kind!r}; use one of {', '.join(self.KINDS)}")
        self.optimizer = optimizer
        self.kind = kind
        self.epochs = max(epochs, 1)
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.warmup = max(warmup_epochs, 0.0)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.min_lr = min_lr
        self.step_size, self.gamma = max(step_size, 1), gamma
        self.t0, self.t_mult = max(t0, 1), max(t_mult, 1)
        self.plateau_patience = plateau_patience
        self.steps = 0
        self.plateau_scale = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0
        self._apply()

    # progress in epochs, as a float
    @property
    def progress(self) -> float:
        return self.steps / self.steps_per_epoch

    def factor(self, base_lr: float) -> float:
        t = self.progress
        if self.kind == "onecycle":
            return self._onecycle(t)
        warm = 0.01 + 0.99 * t / self.warmup if t < self.warmup else 1.0
        floor = min(self.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup, 1e-8)
            x = min(max((t - self.warmup) / span, 0.0), 1.0)
            f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x))
        elif self.kind == "step":
            f = self.gamma ** math.floor(t / self.step_size)
        elif self.kind == "warmrestart":
            f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * self._restart_phase(t)))
        elif self.kind == "plateau":
            f = self.plateau_scale
        else:
            f = 1.0
        return warm * f

    def _restart_phase(self, t: float) -> float:
        """Position inside the current warm-restart cycle, in [0, 1)."""
        length = float(self.t0)
        while t >= length:
            t -= length
            length *= self.t_mult
        return t / length

    def _onecycle(self, t: float) -> float:
        pct = self.warmup / self.epochs if self.warmup > 0 else 0.3
        peak = pct * self.epochs
        start, end = 1 / 25, 1 / (25 * 1e4)
        if t < peak:
            x = t / max(peak, 1e-8)
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * x))
        x = min((t - peak) / max(self.epochs - peak, 1e-8), 1.0)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * x))

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor(base)

    def step(self) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        self._apply()

    def epoch_end(self, val_loss: float | None) -> None:
        """Plateau: divide the LR by 1/gamma after `plateau_patience` epochs without a lower
        validation loss."""
        if self.kind != "plateau" or val_loss is None:
            return
        if self.plateau_best is None or val_loss < self.plateau_best * (1 - 1e-4):
            self.plateau_best, self.plateau_bad = val_loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.plateau_patience:
                self.plateau_scale *= self.gamma
                self.plateau_bad = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
                "plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Progress is kept in epochs, so a resume with another number of processes (another
        number of steps per epoch) continues the schedule where it was."""
        saved_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))
        self.steps = round(int(state["steps"]) * self.steps_per_epoch / saved_per_epoch)
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = int(state["plateau_bad"])
        self._apply()
