"""What kill -9 tests cannot see on a machine that does not lose power, checked by recording the
system calls: a checkpoint's bytes reach the disk (fsync) before the rename that publishes it, and
the folder entry after it; and under DDP, accumulation all-reduces the gradients once per
optimizer step (no_sync on the other micro-steps), not once per micro-batch."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from common import checkpoint, outdir
from common.engine import StepConfig, TrainState, train_one_epoch
from common.models.small import TinyMLP
from common.optim import Schedule
from common.precision import make_precision
from common.tasks import ClassificationTask

CPU = torch.device("cpu")


def record_calls(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = str(fd)
        calls.append(("fsync", name))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        calls.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="names file descriptors through /proc")
def test_a_checkpoint_is_on_disk_before_it_is_published(monkeypatch, tmp_path):
    calls = record_calls(monkeypatch)
    target = tmp_path / "checkpoint.pth"
    checkpoint.atomic_save({"w": torch.ones(3)}, target)
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    tmp_name = calls[0][1]
    assert Path(tmp_name).name.startswith(".checkpoint.pth.") and tmp_name.endswith(".tmp")
    assert calls[1][1] == f"{tmp_name} -> {target}"  # the file that was synced is the one renamed
    assert calls[2][1] == str(tmp_path)  # then the folder, so the new name survives a power cut
    assert torch.load(target)["w"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="names file descriptors through /proc")
def test_text_outputs_are_synced_before_the_rename(monkeypatch, tmp_path):
    calls = record_calls(monkeypatch)
    target = tmp_path / "results.json"
    outdir.write_atomically(target, lambda fh: fh.write("{}\n"))
    kinds = [kind for kind, _ in calls]
    assert kinds[:2] == ["fsync", "replace"], calls
    assert calls[1][1].endswith(f"-> {target}")
    assert target.read_text() == "{}\n"


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "s"), 1), rank=0,
                                world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("accumulate", [1, 3])
def test_ddp_all_reduces_once_per_optimizer_step(one_process_group, accumulate):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyMLP(3, pool=4, hidden=16))
    reductions = {"n": 0}

    def counting_hook(state, bucket):
        reductions["n"] += 1
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, counting_hook)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(7)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = -(-len(data) // accumulate)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=steps)
    state = TrainState()
    train_one_epoch(model, ClassificationTask(3), data, opt, schedule, make_precision(CPU, amp=False), CPU,
                    StepConfig(accumulate=accumulate, show_progress=False), state)
    assert state.step == steps
    assert reductions["n"] == steps  # a model this small has one gradient bucket: one reduction per step
