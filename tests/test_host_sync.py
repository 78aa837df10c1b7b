"""No host sync inside the training step: between two log intervals the loop never reads a device
tensor on the host, also with the NaN/Inf guard, under DDP, and (on a GPU) by torch's own sync
debug mode. The detector itself is tested first: each way of reading a tensor is caught."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from host_sync import host_syncs
from torch import nn

from common.engine import StepConfig, TrainState, train_one_epoch
from common.models.small import TinyMLP
from common.nanguard import NonFiniteGuard
from common.optim import Schedule
from common.precision import make_precision
from common.tasks import ClassificationTask

CPU = torch.device("cpu")
HERE = __file__


READS = {
    "item": lambda t: t.item(),
    "float": lambda t: float(t),
    "int": lambda t: int(t),
    "bool": lambda t: bool(t > 0),
    "if": lambda t: 1 if t > 0 else 0,
    "format": lambda t: f"{t:.4f}",
    "str": lambda t: str(t),
    "repr": lambda t: repr(t),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "np.asarray": lambda t: np.asarray(t),
    "cpu": lambda t: t.cpu(),
    "to('cpu')": lambda t: t.to("cpu"),
    "to(device=cpu)": lambda t: t.to(device=torch.device("cpu")),
    # an output whose size the device must compute before the host can allocate it
    "bincount": lambda t: torch.bincount(t.long().view(1), minlength=4),
    "nonzero": lambda t: t.nonzero(),
    "unique": lambda t: torch.unique(t),
    "boolean mask": lambda t: t.view(1)[t.view(1) > 0],
    "masked_select": lambda t: t.masked_select(t > 0),
}


@pytest.mark.parametrize("how", list(READS))
def test_the_detector_sees_every_kind_of_read(monkeypatch, how):
    with host_syncs(monkeypatch, roots=[HERE]) as syncs:
        READS[how](torch.tensor(1.5))
    assert syncs.count == 1, (how, syncs.calls)


def test_the_detector_sees_a_read_inside_torch_made_for_our_code(monkeypatch):
    """clip_grad_norm_(error_if_nonfinite=True) tests the norm with an `if` inside torch."""
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with host_syncs(monkeypatch, roots=[HERE]) as syncs:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert syncs.count >= 1
    with host_syncs(monkeypatch, roots=[HERE]) as syncs:
        torch.nn.utils.clip_grad_norm_([p], 1.0)  # the default: no read
    assert syncs.count == 0, syncs.calls


def test_the_detector_ignores_what_does_not_sync(monkeypatch):
    t = torch.tensor([1.5, 2.0])
    loader_tensor = torch.ones(2)
    with host_syncs(monkeypatch, roots=[HERE]) as syncs:
        batch = next(syncs.from_loader([(loader_tensor,)]))
        batch[0].to("cpu", non_blocking=True)  # a host tensor going to the device: no sync
        (t * 2 + 1).sum()
        t.to(torch.float64)
        t.to(dtype=torch.float16)
        torch.where(t > 1, t, 0)
        torch.zeros(4).index_add_(0, torch.tensor([1, 1]), t)  # the output's size is known
        with torch.inference_mode():  # where one_hot is one operator, not its decomposition
            torch.nn.functional.one_hot(torch.tensor([0, 2]), 3)  # sized: a device assert on CUDA
    assert syncs.count == 0, syncs.calls


def test_the_detector_ignores_code_outside_its_roots(monkeypatch):
    with host_syncs(monkeypatch, roots=["/nowhere/"]) as syncs:
        torch.tensor(2.0).item()
    assert syncs.count == 0


def batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _segmentation_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 3, (2, 16, 16), generator=g))
            for _ in range(n)]


def train_counting(monkeypatch, model: nn.Module, policy: str | None, n: int = 12, nan_at: int | None = None,
                   task=None, data=None):
    """One epoch of 12 batches; returns the detector's count before each batch and at the end."""
    task = task or ClassificationTask(3)
    data = data or batches(n)
    if nan_at is not None:
        data[nan_at] = (torch.full_like(data[nan_at][0], float("nan")), data[nan_at][1])
    guard = None if policy is None else NonFiniteGuard(CPU, policy, log=lambda _: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=policy == "skip")
    schedule = Schedule(opt, "cosine", epochs=1, steps_per_epoch=n // 2, warmup_epochs=0.5)
    seen: list[int] = []
    with host_syncs(monkeypatch, optimizers=[opt]) as syncs:

        class Loader(list):
            def __iter__(self):
                for batch in syncs.from_loader(list.__iter__(self)):
                    seen.append(syncs.count)
                    yield batch

        train_one_epoch(model, task, Loader(data), opt, schedule,
                        make_precision(CPU, amp=False), CPU,
                        StepConfig(accumulate=2, clip_grad=1.0, log_interval=100, show_progress=True,
                                   guard=guard), TrainState())
        total = syncs.count
    return seen, total, syncs.calls, guard


@pytest.mark.parametrize("policy", [None, "stop", "skip"])
def test_no_host_sync_inside_the_training_step(monkeypatch, policy):
    model = TinyMLP(3, pool=4, hidden=16)
    nan_at = 5 if policy == "skip" else None
    seen, total, calls, guard = train_counting(monkeypatch, model, policy, nan_at=nan_at)
    assert len(seen) == 12
    # counted before each batch is handed out: nothing from batch 1 to batch 12
    assert seen[-1] == seen[0], f"host syncs inside the loop: {calls}"
    assert total > seen[-1]  # the epoch-end read does happen: the detector is live
    if policy == "skip":  # the guard did its work: one step skipped, the weights finite
        assert guard.seen == 1
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_no_host_sync_inside_a_segmentation_training_step(monkeypatch):
    """The U-Net's loss (cross entropy + soft Dice over a one-hot of the masks) and its totals."""
    from common.models.unet import UNet
    from common.tasks import SegmentationTask

    torch.manual_seed(0)
    seen, total, calls, _ = train_counting(monkeypatch, UNet(3, base=2), None, task=SegmentationTask(3),
                                           data=_segmentation_batches(12))
    assert len(seen) == 12 and seen[-1] == seen[0], f"host syncs inside the loop: {calls}"
    assert total > seen[-1]


def test_a_sync_added_to_the_step_is_caught(monkeypatch):
    """The test above can fail: a loss read per step (as a hand-written loop's print would) is seen."""
    import common.engine as engine

    original = engine._micro_steps

    def chatty(*args, **kwargs):
        n = original(*args, **kwargs)
        totals = args[3]
        f"{totals['loss_sum']:.4f}"  # noqa: B018 - the read is the point
        return n

    monkeypatch.setattr(engine, "_micro_steps", chatty)
    seen, _, calls, _ = train_counting(monkeypatch, TinyMLP(3, pool=4, hidden=16), None)
    assert seen[-1] > seen[0]
    assert any("format" in c for c in calls), calls


@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_no_host_sync_between_validation_batches(monkeypatch, task_name):
    """Validation keeps its totals on the device too (the confusion matrix included: bincount's
    output size depends on the values, which on a GPU waits for them): one read at the end."""
    from common.engine import evaluate
    from common.tasks import SegmentationTask

    if task_name == "classification":  # 7 classes: the confusion matrix and the top-5 count
        model, task, data = TinyMLP(7, pool=4, hidden=16), ClassificationTask(7), batches(6)
    else:
        model, task, data = nn.Conv2d(3, 3, 1), SegmentationTask(3), _segmentation_batches(6)
    seen: list[int] = []
    with host_syncs(monkeypatch) as syncs:

        class Loader(list):
            def __iter__(self):
                for batch in syncs.from_loader(list.__iter__(self)):
                    seen.append(syncs.count)
                    yield batch

        totals = evaluate(model, task, Loader(data), make_precision(CPU, amp=False), CPU)
        total = syncs.count
    assert len(seen) == 6 and seen[-1] == seen[0], f"host syncs between validation batches: {syncs.calls}"
    assert total > seen[-1]  # the end-of-loop read is seen: the detector is live
    assert int(totals["count"]) == (24 if task_name == "classification" else 12)


@pytest.fixture
def one_process_group():
    """A gloo process group of one rank in this process: DDP's code paths (no_sync, the reducer,
    the guard's all-reduce) run as under torchrun."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("policy", [None, "stop"])
def test_no_host_sync_under_ddp(monkeypatch, one_process_group, policy):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyMLP(3, pool=4, hidden=16))
    seen, total, calls, _ = train_counting(monkeypatch, model, policy)
    assert seen[-1] == seen[0], f"host syncs inside the loop under DDP: {calls}"
    assert total > seen[-1]


@pytest.mark.cuda
@pytest.mark.parametrize("policy", [None, "stop", "skip"])
def test_no_sync_on_cuda_by_torchs_own_debug_mode(policy):
    """On a GPU, torch itself raises at any synchronising call between the first and the last batch."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = TinyMLP(3, pool=4, hidden=16).to(device)
    data = [(x.pin_memory(), y.pin_memory()) for x, y in batches(12)]
    guard = None if policy is None else NonFiniteGuard(device, policy, log=lambda _: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    schedule = Schedule(opt, "cosine", epochs=1, steps_per_epoch=6, warmup_epochs=0.5)
    modes: list[int] = []

    class Loader(list):
        def __iter__(self):
            for i, batch in enumerate(list.__iter__(self)):
                if i == 1:  # after the first batch (lazy optimizer state, cuDNN set-up)
                    torch.cuda.set_sync_debug_mode("error")
                modes.append(torch.cuda.get_sync_debug_mode())
                yield batch
            torch.cuda.set_sync_debug_mode(0)  # the epoch end reads its totals

    try:
        train_one_epoch(model, ClassificationTask(3), Loader(data), opt, schedule,
                        make_precision(device, amp=False), device,
                        StepConfig(accumulate=2, clip_grad=1.0, log_interval=100, show_progress=False,
                                   guard=guard), TrainState())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert modes[1:] == [2] * 11
