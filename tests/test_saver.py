"""common/saver.py: host snapshots that later in-place changes cannot touch, writes in order on one
background thread, errors raised in the training thread (once, labelled), close() and Ctrl-C."""
from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from common import checkpoint as ck
from common.saver import BackgroundSaver, atomic_write, epoch_checkpoint_write, prune_epoch_checkpoints

ROOT = Path(__file__).resolve().parents[1]
GUARD_S = 20  # an event wait that would only expire if the code under test were broken (deadlock guard)


def gated(release: threading.Event, started: threading.Event | None = None, action=None):
    """A write that waits for `release`, then runs `action`."""
    def write():
        if started is not None:
            started.set()
        assert release.wait(GUARD_S), "the test never released this write"
        if action is not None:
            action()
    return write


def release_later(event: threading.Event, delay_s: float = 0.2) -> threading.Timer:
    """Set `event` a little later from another thread, so that the call under test is already
    blocked when the write it waits for is released (a delay, not a timing assertion)."""
    timer = threading.Timer(delay_s, event.set)
    timer.start()
    return timer


def enospc(label: str = "x.pth"):
    def write():
        raise OSError(errno.ENOSPC, "No space left on device", label)
    return write


def state() -> dict:
    return {"w": torch.arange(6.0).reshape(2, 3), "opt": {"state": {0: {"step": torch.tensor(3.0),
            "exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "history": [{"loss": 1.0}], "shape": torch.Size([2, 3]), "name": "run"}


# ---------------------------------------------------------------- snapshot

@pytest.mark.parametrize("pin_memory", [False, True])
def test_snapshot_is_independent_of_the_original(tmp_path, pin_memory):
    original = state()
    saver = BackgroundSaver(pin_memory=pin_memory)
    snap = saver.snapshot(original)
    original["w"].add_(100)  # an optimizer step after the snapshot ...
    original["history"].append({"loss": 0.5})
    original["opt"]["param_groups"][0]["lr"] = 0.01
    release = threading.Event()
    saver.submit([("gate", gated(release)), atomic_write(snap, tmp_path / "checkpoint.pth")])
    original["opt"]["state"][0]["exp_avg"].mul_(7)  # ... and one after submit, before the write
    release.set()
    saver.close()

    loaded = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg"], torch.ones(4))
    assert loaded["history"] == [{"loss": 1.0}]
    assert loaded["opt"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["name"] == "run"


def test_snapshot_keeps_container_types_and_shared_tensors():
    shared = torch.arange(4.0)
    obj = OrderedDict(a=shared, b=shared, view=shared[1:3], t=(1, shared))
    for pin_memory in (False, True):
        snap = BackgroundSaver(pin_memory=pin_memory).snapshot(obj)
        shared.add_(10)
        assert type(snap) is OrderedDict and isinstance(snap["t"], tuple)
        for key in ("a", "b"):
            assert torch.equal(snap[key], torch.arange(4.0))
        assert torch.equal(snap["view"], torch.tensor([1.0, 2.0]))
        assert torch.equal(snap["t"][1], torch.arange(4.0))
        shared.sub_(10)


def test_pooled_buffers_are_reused_and_refilled():
    saver = BackgroundSaver(pin_memory=True)  # without CUDA: reused plain host buffers
    first = saver.snapshot({"w": torch.zeros(3), "v": torch.ones(3), "b": torch.zeros(2)})
    second = saver.snapshot({"w": torch.full((3,), 2.0), "v": torch.full((3,), 3.0), "b": torch.zeros(5)})
    for key in ("w", "v"):  # same path, shape and dtype: the same buffer, with the new values
        assert second[key].data_ptr() == first[key].data_ptr()
    assert torch.equal(second["w"], torch.full((3,), 2.0)) and torch.equal(second["v"], torch.full((3,), 3.0))
    assert second["b"].shape == (5,)  # a new shape: a new buffer


def test_snapshot_waits_for_the_write_that_reads_its_buffers(tmp_path):
    saver = BackgroundSaver(pin_memory=True)
    weights = torch.zeros(8)
    snap = saver.snapshot({"w": weights})
    release = threading.Event()
    saver.submit([("gate", gated(release)), atomic_write(snap, tmp_path / "a.pth")])
    weights.add_(1)
    release_later(release)
    saver.snapshot({"w": weights})  # reuses the buffer: only after a.pth is written
    saver.close()
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["w"], torch.zeros(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_snapshot_of_cuda_tensors(tmp_path):
    device = torch.device("cuda")
    weights = torch.randn(1 << 20, device=device)
    expected = weights.cpu()
    saver = BackgroundSaver(pin_memory=True)
    snap = saver.snapshot({"w": weights, "step": torch.tensor(1, device=device)})
    weights.mul_(3)  # queued on the stream after the copies
    assert snap["w"].device.type == "cpu" and snap["w"].is_pinned()
    assert torch.equal(snap["w"], expected)
    ptr = snap["w"].data_ptr()
    saver.submit([atomic_write(snap, tmp_path / "c.pth")])
    again = saver.snapshot({"w": weights, "step": torch.tensor(2, device=device)})
    assert again["w"].data_ptr() == ptr and torch.equal(again["w"], weights.cpu())
    saver.close()
    assert torch.equal(torch.load(tmp_path / "c.pth", weights_only=True)["w"], expected)


# ---------------------------------------------------------------- the writer thread

def test_writes_run_in_order_on_another_thread_and_submit_does_not_wait():
    calls: list[tuple[str, int]] = []
    started, release = threading.Event(), threading.Event()

    def record(name):
        return lambda: calls.append((name, threading.get_ident()))

    saver = BackgroundSaver()
    saver.submit([("slow", gated(release, started, record("a"))), ("b", record("b"))])
    assert started.wait(GUARD_S)
    assert calls == [] and saver.busy  # submit returned while the first write still runs
    release_later(release)
    saver.submit([("c", record("c"))])  # waits for the first batch
    assert [name for name, _ in calls] == ["a", "b"]
    saver.wait()
    assert not saver.busy
    assert [name for name, _ in calls] == ["a", "b", "c"]
    assert len({ident for _, ident in calls}) == 1
    assert calls[0][1] != threading.get_ident()
    saver.close()


def test_disabled_runs_the_writes_in_submit():
    calls: list[int] = []
    saver = BackgroundSaver(enabled=False)
    saver.submit([("a", lambda: calls.append(threading.get_ident()))])
    assert calls == [threading.get_ident()] and not saver.busy
    with pytest.raises(OSError) as info:
        saver.submit([("x.pth", enospc()), ("b", lambda: calls.append(0))])
    assert info.value.errno == errno.ENOSPC
    assert any("x.pth" in note for note in info.value.__notes__)
    assert calls == [threading.get_ident()]
    saver.close()


@pytest.mark.parametrize("where", ["wait", "submit", "snapshot", "close"])
def test_a_failed_write_is_raised_once_with_its_label(where):
    ran: list[str] = []
    saver = BackgroundSaver()
    saver.submit([("first", lambda: ran.append("first")), ("x.pth", enospc()),
                  ("after", lambda: ran.append("after"))])
    with pytest.raises(OSError) as info:
        if where == "submit":
            saver.submit([("next", lambda: ran.append("next"))])
        elif where == "snapshot":
            saver.snapshot({"w": torch.zeros(1)})
        else:
            getattr(saver, where)()
    exc = info.value
    assert type(exc) is OSError and exc.errno == errno.ENOSPC and exc.filename == "x.pth"
    assert any("x.pth" in note for note in exc.__notes__)
    assert ran == ["first"]  # neither the rest of the batch nor a batch submitted after it
    saver.wait()  # raised once
    saver.close()
    saver.close()


def test_close_waits_for_the_pending_write_and_is_idempotent(tmp_path):
    release = threading.Event()
    target = tmp_path / "checkpoint.pth"
    saver = BackgroundSaver()
    saver.submit([("slow", gated(release, action=lambda: ck.atomic_save({"a": 1}, target)))])
    release_later(release)
    saver.close()
    assert target.exists() and not saver.busy
    saver.close()
    with pytest.raises(RuntimeError, match="after close"):
        saver.submit([("late", lambda: None)])


@pytest.mark.skipif(not hasattr(signal, "pthread_kill")
                    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs POSIX signals and Python's Ctrl-C handler")
def test_ctrl_c_in_the_training_thread_still_finishes_the_write(tmp_path):
    main = threading.get_ident()
    waiting, release = threading.Event(), threading.Event()
    target = tmp_path / "checkpoint.pth"

    def write():
        assert waiting.wait(GUARD_S)
        signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the training thread waits
        assert release.wait(GUARD_S)
        ck.atomic_save({"a": 1}, target)

    saver = BackgroundSaver()
    with pytest.raises(KeyboardInterrupt):
        saver.submit([("slow", write), ("x.pth", enospc())])
        waiting.set()
        saver.wait()
    assert not target.exists()
    release_later(release)
    with pytest.raises(OSError) as info:  # what the caller's finally does: the batch is finished ...
        saver.close()
    assert target.exists()
    assert info.value.errno == errno.ENOSPC  # ... and its failure is not lost
    saver.close()


def test_exit_without_close_finishes_the_writes_and_reports_the_error(tmp_path):
    script = textwrap.dedent(f"""
        import errno, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from common.saver import BackgroundSaver, atomic_write
        def slow():
            time.sleep(0.3)
            atomic_write({{"a": 1}}, {str(tmp_path / "done.pth")!r})[1]()
        def fail():
            raise OSError(errno.ENOSPC, "No space left on device", "x.pth")
        saver = BackgroundSaver()
        saver.submit([("done.pth", slow), ("x.pth", fail)])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "done.pth").exists()
    assert "No space left on device" in proc.stderr and "while writing x.pth" in proc.stderr


# ---------------------------------------------------------------- with the checkpoint format

def test_round_trip_with_atomic_save_and_no_temp_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)

    def step():
        model(torch.randn(5, 4)).sum().backward()
        opt.step()

    step()
    spec = {"name": "tiny", "source": "local", "kwargs": {}}
    payload = ck.make_payload(model, task="classification", model_spec=spec, meta={"classes": ["a"]},
                              metrics={"acc": 0.5}, config={"lr": 0.01},
                              train_state={"optimizer": opt.state_dict(), "epoch": 1})
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    saver = BackgroundSaver()
    snap = saver.snapshot({"ckpt": payload, "best": {k: v for k, v in payload.items() if k != "train_state"}})
    saver.submit([atomic_write(snap["best"], tmp_path / "best_model.pth"),
                  atomic_write(snap["ckpt"], tmp_path / "checkpoint.pth")])
    step()  # training goes on while the files are written
    saver.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pth", "checkpoint.pth"]
    for name in ("best_model.pth", "checkpoint.pth"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert loaded["format"] == ck.FORMAT
        for key, value in expected_weights.items():
            assert torch.equal(loaded["state_dict"][key], value), key
    resumed = ck.load_checkpoint(tmp_path / "checkpoint.pth", need_train_state=True)
    assert torch.equal(resumed["train_state"]["optimizer"]["state"][0]["exp_avg"], expected_avg)
    assert not torch.equal(opt.state_dict()["state"][0]["exp_avg"], expected_avg)  # it did move on


# ---------------------------------------------------------------- epoch checkpoints

def test_epoch_checkpoint_holds_weights_only_and_keeps_the_last_k_and_the_best(tmp_path):
    """checkpoint_epoch{N}.pth: the payload without its train state (about the weights' size); the
    files beyond the last keep_last go, except the best epoch's; other files are never touched."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    payload = ck.make_payload(model, task="segmentation", model_spec={"name": "m", "source": "local"},
                              meta={"mask_values": [0, 255]}, metrics={"val_dice": 0.5}, config={},
                              train_state={"optimizer": opt.state_dict(), "epoch": 1})
    (tmp_path / "checkpoint_epoch_notes.pth").write_text("not ours")
    saver = BackgroundSaver(enabled=False)
    for epoch in range(1, 7):
        saver.submit([epoch_checkpoint_write(payload, tmp_path, epoch, keep_last=3, best_epoch=2)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_epoch2.pth", "checkpoint_epoch4.pth", "checkpoint_epoch5.pth",
                     "checkpoint_epoch6.pth", "checkpoint_epoch_notes.pth"]
    light = ck.load_checkpoint(tmp_path / "checkpoint_epoch6.pth", task="segmentation")
    assert "train_state" not in light and light["mask_values"] == [0, 255]
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = (tmp_path / "checkpoint_epoch6.pth").stat().st_size
    assert weights <= size <= weights + 16_384
    assert prune_epoch_checkpoints(tmp_path, 0) == []  # 0 keeps every file
    assert len(prune_epoch_checkpoints(tmp_path, 1)) == 3 and (tmp_path / "checkpoint_epoch6.pth").is_file()
