"""Mixed precision on a real GPU (make test-gpu): float16 autocast with GradScaler and a fused AdamW
(the loss falls, an inf gradient makes the scaler back off and skips exactly that step, no host
sync per step), the same through gpu_train.py --amp, and bfloat16 autocast without a scaler.
On a machine without CUDA these tests are skipped (tests/conftest.py)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST
from torch import nn

import gpu_train
from common.checkpoint import load_checkpoint
from common.engine import StepConfig, TrainState, train_one_epoch
from common.models.small import SmallCNN
from common.nanguard import NonFiniteGuard
from common.optim import Schedule, build_optimizer
from common.precision import make_precision
from common.tasks import ClassificationTask

pytestmark = pytest.mark.cuda


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def learnable_batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 classes, each a bright colour channel over noise: a small CNN learns it in a few epochs.
    Pinned host tensors, as a DataLoader with pin_memory hands them over."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (size,), generator=g)
        x = torch.randn(size, 3, 16, 16, generator=g)
        x[torch.arange(size), y] += 2.0
        out.append((x.pin_memory(), y.pin_memory()))
    return out


class SyncFreeLoader(list):
    """Hands out the batches with CUDA's sync debug mode at "error" from the second batch on (the
    first sets up cuDNN and the optimizer state), so any synchronising call of the step raises; the
    mode goes back to default after the last step, for the epoch-end read the engine does by design."""

    def __iter__(self):
        try:
            for i, batch in enumerate(list.__iter__(self)):
                if i == 1:
                    torch.cuda.set_sync_debug_mode("error")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode(0)


def output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list]:
    """Records the dtype of every Conv2d/Linear output in a training forward (grad enabled)."""
    seen: list[torch.dtype] = []

    def hook(module, args, output):
        if module.training and torch.is_grad_enabled():
            seen.append(output.dtype)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    return seen, handles


def test_float16_gradscaler_fused_adamw_trains_and_skips_an_inf_step():
    device = torch.device("cuda", torch.cuda.current_device())
    precision = make_precision(device, amp=True, log=lambda _: None)
    assert precision.dtype is torch.float16 and precision.scaler.is_enabled()
    torch.manual_seed(0)
    model = SmallCNN(3, width=16).to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), "adamw", 3e-3, 0.01, fused=True)  # as run_job on CUDA
    assert opt.defaults["fused"] is True
    data = learnable_batches(8)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=len(data))
    guard = NonFiniteGuard(device, "stop", log=lambda _: None)  # gpu_train's default guard
    task = ClassificationTask(3)

    def epoch(batches) -> dict[str, float]:
        cfg = StepConfig(clip_grad=1.0, channels_last=True, log_interval=100, show_progress=False,
                         guard=guard)
        return train_one_epoch(model, task, batches, opt, schedule, precision, device, cfg, TrainState())

    dtypes, handles = output_dtypes(model)
    try:
        losses = [epoch(SyncFreeLoader(data))["loss"] for _ in range(5)]  # a sync in the step raises
    finally:
        for h in handles:
            h.remove()
    assert dtypes and set(dtypes) == {torch.float16}, set(dtypes)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses

    # one step whose gradient is inf: the scaler halves its scale and the fused AdamW leaves the
    # weights and its state exactly as they were
    scale = precision.scaler.get_scale()
    params = [p.detach().clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].clone() for p in model.parameters()]
    weight = model.head[-1].weight
    handle = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    try:
        epoch(data[:1])
    finally:
        handle.remove()
    assert precision.scaler.get_scale() == scale * precision.scaler.get_backoff_factor()
    for before, p in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, p), "a skipped step changed a weight"
    for before, p in zip(steps, model.parameters(), strict=True):
        assert torch.equal(before, opt.state[p]["step"])
    assert guard.seen == 0  # the scaler's own overflow handling is not a non-finite stop

    # the next, finite step is taken, at the lowered scale
    epoch(data[1:2])
    assert precision.scaler.get_scale() == scale * precision.scaler.get_backoff_factor()
    assert any(not torch.equal(before, p) for before, p in zip(params, model.parameters(), strict=True))


def test_gpu_train_amp_runs_float16_with_scaler_and_fused_adamw(dataset, tmp_path):
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "4",
                           "--device", "cuda", "--amp"]) == 0
    log = (out / "training.log").read_text()
    assert "precision: float16 autocast + GradScaler" in log
    rows = read_rows(out / "metrics.csv")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(float(r["val_acc"]) for r in rows) > 0.75
    ts = load_checkpoint(out / "checkpoint.pth")["train_state"]
    assert ts["scaler"]["scale"] > 0  # the scaler's state is kept for a resume
    assert all(group["fused"] for group in ts["optimizer"]["param_groups"])


def test_bfloat16_autocast_without_a_scaler(dataset, tmp_path):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16")
    device = torch.device("cuda", torch.cuda.current_device())
    precision = make_precision(device, amp=True, amp_dtype="bfloat16", log=lambda _: None)
    assert precision.dtype is torch.bfloat16 and not precision.scaler.is_enabled()

    seen: list[torch.dtype] = []

    def hook(module, args, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.training and torch.is_grad_enabled():
            seen.append(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)  # every module of the run
    out = tmp_path / "o"
    try:
        code = gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "4",
                               "--device", "cuda", "--amp", "--amp-dtype", "bfloat16"])
    finally:
        handle.remove()
    assert code == 0
    assert seen and set(seen) == {torch.bfloat16}, set(seen)
    line = next(x for x in (out / "training.log").read_text().splitlines() if "precision:" in x)
    assert line.endswith("precision: bfloat16 autocast"), line  # no GradScaler
    rows = read_rows(out / "metrics.csv")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert max(float(r["val_acc"]) for r in rows) > 0.75
    assert not load_checkpoint(out / "checkpoint.pth")["train_state"]["scaler"]  # a disabled scaler: {}
