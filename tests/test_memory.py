"""Out-of-memory recovery: training continues, the effective batch is unchanged and the weights
equal those of a run that used the smaller micro-batch from the start. Errors are injected."""
from __future__ import annotations

import pytest
import torch
from conftest import FAST
from torch import nn

import gpu_train
from common.checkpoint import load_checkpoint
from common.engine import StepConfig, TrainState, train_one_epoch
from common.errors import UserError
from common.memory import OOMRecovery
from common.models.small import TinyMLP
from common.optim import Schedule
from common.precision import make_precision
from common.tasks import ClassificationTask

CPU = torch.device("cpu")


class _OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit):
        ctx.big = x.shape[0] > limit
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.big:
            raise torch.OutOfMemoryError("CUDA out of memory (injected, in backward)")
        return grad, None


class Limited(nn.Module):
    """TinyMLP that 'runs out of memory' for chunks larger than `limit` (forward or backward)."""

    def __init__(self, limit: int, where: str = "forward"):
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyMLP(3, pool=4, hidden=16)
        self.limit, self.where, self.calls = limit, where, 0

    def forward(self, x):
        self.calls += 1
        limit = self.limit * (2 if getattr(self, "grad_checkpointing", False) else 1)
        if self.where == "forward" and x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        out = self.inner(x)
        return _OOMInBackward.apply(out, limit) if self.where == "backward" else out


class LimitedWithCheckpointing(Limited):
    """The same, with timm's switch: checkpointing doubles what fits."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def batches(n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n * size, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (n * size,), generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


def run(model, data, accumulate, recovery=None, log=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=-(-len(data) // accumulate))
    cfg = StepConfig(accumulate=accumulate, show_progress=False, recovery=recovery)
    state = TrainState()
    metrics = train_one_epoch(model, ClassificationTask(3), data, opt, schedule,
                              make_precision(CPU, amp=False), CPU, cfg, state)
    return cfg, state, metrics


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_recovered_run_equals_smaller_micro_batch_from_the_start(where):
    messages: list[str] = []
    model = Limited(limit=4, where=where)
    data = batches(6, 8)  # batch 8, but only 4 fit
    cfg, state, metrics = run(model, data, 2, OOMRecovery(8, 2, messages.append))
    assert cfg.splits == 2 and state.step == 3  # training went on: every optimizer step taken
    assert any("micro-batch 8 -> 4, accumulation 2 -> 4 (effective batch 16 unchanged)" in m
               for m in messages)

    reference = Limited(limit=10**6)
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in data for i in (0, 4)]
    _, ref_state, ref_metrics = run(reference, halves, 4)
    assert ref_state.step == 3
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the metrics count every sample once, even though a group was replayed
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
    assert metrics["acc"] == pytest.approx(ref_metrics["acc"])


def test_gradient_checkpointing_is_tried_first():
    messages: list[str] = []
    model = LimitedWithCheckpointing(limit=4)  # with checkpointing, 8 fit
    cfg, state, _ = run(model, batches(3, 8), 1, OOMRecovery(8, 1, messages.append))
    assert model.grad_checkpointing is True and cfg.splits == 1 and state.step == 3
    assert messages == ["out of memory: turned on gradient checkpointing; retrying the same batch"]


def test_nothing_left_to_lower_is_a_clear_error():
    model = LimitedWithCheckpointing(limit=0)
    with pytest.raises(UserError) as info:
        run(model, batches(2, 4), 1, OOMRecovery(4, 1, lambda _: None))
    text = str(info.value)
    assert "micro-batch 1 with gradient checkpointing on" in text
    for hint in ("--img-size", "--amp", "smaller model"):
        assert hint in text


def test_an_unrecoverable_cuda_error_is_never_retried():
    model = Limited(limit=10**6)

    def broken(x):
        model.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.forward = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(model, batches(2, 4), 1, OOMRecovery(4, 1, lambda _: None))
    assert model.calls == 1


def test_without_recovery_the_error_propagates():
    with pytest.raises(torch.OutOfMemoryError):
        run(Limited(limit=2), batches(2, 4), 1, None)


def test_recovered_settings_are_saved_and_kept_on_resume(dataset, tmp_path, monkeypatch, capsys):
    from common.models.small import SmallCNN

    original = SmallCNN.forward

    def limited(self, x):
        if x.shape[0] > 4 and self.training:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, x)

    monkeypatch.setattr(SmallCNN, "forward", limited)
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1"]) == 0
    ts = load_checkpoint(out / "checkpoint.pth")["train_state"]
    assert ts["micro_batch"] == 4 and ts["accumulate"] == 2 and ts["step"] == 4
    assert "out of memory: micro-batch 8 -> 4" in (out / "training.log").read_text()
    capsys.readouterr()
    resume = ["--resume", str(out / "checkpoint.pth"), "--epochs", "2", "--num-workers", "0"]
    assert gpu_train.main(resume) == 0
    printed = capsys.readouterr().out
    assert "resume: micro-batch 4" in printed and "out of memory" not in printed
    assert load_checkpoint(out / "checkpoint.pth")["train_state"]["step"] == 8


class _Injector(nn.Module):
    """Raises one out-of-memory error at its `at`-th call: in forward, or in backward (after the
    layers behind it already wrote their gradients), like a transient peak in the middle of a net."""

    def __init__(self, at: int, where: str):
        super().__init__()
        self.at, self.where, self.calls, self.fired = at, where, 0, False

    def forward(self, x):
        self.calls += 1
        fire = not self.fired and self.calls == self.at
        self.fired |= fire
        if fire and self.where == "forward":
            raise torch.OutOfMemoryError("CUDA out of memory (injected, mid-network)")
        return _OOMInBackward.apply(x, -1 if fire else 10**9) if self.where == "backward" else x


class _Counting(ClassificationTask):
    """Records the sample count of the epoch's totals."""

    counted = -1

    def summarize(self, totals):
        if "count" in totals:
            type(self).counted = int(totals["count"])
        return super().summarize(totals)


def _mid_network_model(at: int, where: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), _Injector(at, where), nn.ReLU(),
                         nn.Linear(16, 3))


def _run_counting(model, data, accumulate, recovery=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=-(-len(data) // accumulate))
    cfg = StepConfig(accumulate=accumulate, show_progress=False, recovery=recovery)
    state = TrainState()
    task = _Counting(3)
    metrics = train_one_epoch(model, task, data, opt, schedule, make_precision(CPU, amp=False), CPU, cfg,
                              state)
    return cfg, state, metrics, task.counted


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("at", [2, 3, 6], ids=["2nd-of-group-1", "last-of-group-1", "last-of-group-2"])
def test_an_error_late_in_a_group_replays_the_whole_group(where, at):
    """--accumulate-grad-batches 3, batches of 8, an out-of-memory error on the 2nd or last micro-batch
    of a group: the earlier micro-batches of the group are replayed at the smaller size, their partial
    gradients are dropped first, and every sample counts once. The weights equal those of a run at
    micro-batch 4 from the start."""
    data = batches(6, 8)
    messages: list[str] = []
    model = _mid_network_model(at, where)
    cfg, state, metrics, counted = _run_counting(model, data, 3, OOMRecovery(8, 3, messages.append))
    assert model[2].fired and cfg.splits == 2 and state.step == 2
    assert any("micro-batch 8 -> 4, accumulation 3 -> 6" in m for m in messages), messages

    reference = _mid_network_model(10**9, where)
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in data for i in (0, 4)]
    _, ref_state, ref_metrics, ref_counted = _run_counting(reference, halves, 6)
    assert ref_state.step == 2
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert counted == ref_counted == 48
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
    assert metrics["acc"] == pytest.approx(ref_metrics["acc"])
