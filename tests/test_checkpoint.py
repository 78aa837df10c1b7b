"""common/checkpoint.py: the payload, atomic writes (also under SIGKILL), the safe loader and
its error messages, strict weight loading, and RNG state."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint as ck
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "tiny", "source": "local", "kwargs": {"num_classes": 3}}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def payload(model: nn.Module | None = None, **kwargs) -> dict:
    defaults = dict(task="classification", model_spec=SPEC,
                    meta={"classes": ["a", "b", "c"], "preprocessing": {"img_size": 32}},
                    metrics={"acc": torch.tensor(0.75), "loss": 0.5}, config={"lr": 0.1})
    defaults.update(kwargs)
    return ck.make_payload(model if model is not None else tiny_model(), **defaults)


def saved_checkpoint(folder: Path, name: str = "checkpoint.pth", **kwargs) -> Path:
    path = folder / name
    ck.atomic_save(payload(**kwargs), path)
    return path


# ---------------------------------------------------------------- payload

def test_payload_is_plain_and_complete(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    train_state = {"optimizer": opt.state_dict(), "epoch": 3, "step": 12, "best_metric": 0.5,
                   "rng": ck.rng_state()}
    path = tmp_path / "checkpoint.pth"
    ck.atomic_save(payload(model, train_state=train_state), path)

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["format"] == ck.FORMAT and loaded["version"] == ck.VERSION
    assert loaded["task"] == "classification"
    assert loaded["model"] == SPEC
    assert loaded["classes"] == ["a", "b", "c"]
    assert loaded["preprocessing"] == {"img_size": 32}
    assert loaded["metrics"] == {"acc": 0.75, "loss": 0.5}
    assert isinstance(loaded["metrics"]["acc"], float)
    assert loaded["config"] == {"lr": 0.1}
    assert set(loaded["versions"]) >= {"torch", "torchvision", "numpy"}
    assert all(isinstance(v, str) for v in loaded["versions"].values())
    assert isinstance(loaded["saved_at"], str)
    assert loaded["train_state"]["epoch"] == 3
    assert set(loaded["state_dict"]) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][key], value)
    # the optimizer state comes back and is usable
    opt2 = torch.optim.AdamW(tiny_model().parameters(), lr=0.01)
    opt2.load_state_dict(loaded["train_state"]["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_payload_without_train_state_has_no_key():
    assert "train_state" not in payload()


def test_unwrap_model_strips_wrappers():
    model = tiny_model()
    assert ck.unwrap_model(model) is model
    assert ck.unwrap_model(nn.DataParallel(model)) is model
    compiled = torch.compile(model)
    assert ck.unwrap_model(compiled) is model
    assert ck.unwrap_model(nn.DataParallel(compiled)) is model


def test_payload_of_wrapped_model_has_plain_keys():
    model = tiny_model()

    class Compiled(nn.Module):  # what torch.compile looks like from outside
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    wrapped = nn.DataParallel(Compiled(model))
    assert any(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    state = payload(wrapped)["state_dict"]
    assert set(state) == set(model.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)


# ---------------------------------------------------------------- atomic save

def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "model.pth"
    ck.atomic_save({"a": torch.ones(3)}, path)
    ck.atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]


@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "no-proc"])
def test_saved_files_get_the_umask_mode_and_the_writer_never_sets_the_umask(tmp_path, monkeypatch, proc):
    """A checkpoint is created with the mode the umask gives other files; reading the umask never
    sets it (os.umask from the writer thread would briefly give the main thread's files another
    mode), with /proc/self/status and without it (the mask read once at import)."""
    import stat
    import threading

    old = os.umask(0o027)
    try:
        if not proc:
            monkeypatch.setattr(ck, "_proc_umask", lambda: None)
            monkeypatch.setattr(ck, "_IMPORT_UMASK", 0o027)
        calls = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
        target = tmp_path / "checkpoint.pth"
        writer = threading.Thread(target=ck.atomic_save, args=({"x": torch.zeros(2)}, target))
        writer.start()
        writer.join()
        assert calls == []
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("error, raised", [(RuntimeError("unexpected pos 64"), OSError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_save_keeps_previous_file(tmp_path, monkeypatch, error, raised):
    """torch's writer failing (RuntimeError) is the OSError it stands for, naming the file."""
    path = saved_checkpoint(tmp_path)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint" * 100)
        raise error

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(raised) as caught:
        ck.atomic_save(payload(), path)
    if raised is OSError:
        assert caught.value.filename == str(path) and "unexpected pos 64" in caught.value.strerror
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["classes"] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


KILL_SERVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)  # no OpenMP pool: a forked worker would deadlock on it
    from common.checkpoint import FORMAT, VERSION, atomic_save

    def payload(i):
        return {"format": FORMAT, "version": VERSION, "task": "classification",
                "model": {"name": "x", "source": "local", "kwargs": {}}, "iteration": i,
                "state_dict": {"w": torch.full((512 * 1024,), float(i))}}  # 2 MB

    target = sys.argv[1]
    atomic_save(payload(0), target)
    print("ready", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        pid = os.fork()
        if pid == 0:  # the worker: save over and over until killed
            i = int(line)
            while True:
                i += 1
                atomic_save(payload(i), target)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("dead", flush=True)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A process killed at random instants while saving always leaves a whole checkpoint."""
    target = tmp_path / "checkpoint.pth"
    server = subprocess.Popen([sys.executable, "-c", KILL_SERVER, str(target), str(ROOT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(1234)
    seen: list[int] = []

    def mid_write_kills() -> int:  # a writer killed mid-write leaves its temporary file behind
        return sum(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    try:
        assert server.stdout.readline().strip() == "ready"
        # 5 kills at random moments, more (up to 20) until one has landed in the middle of a write
        while len(seen) < 5 or (mid_write_kills() == 0 and len(seen) < 20):
            server.stdin.write(f"{(len(seen) + 1) * 1_000_000}\n")
            server.stdin.flush()
            worker = int(server.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(worker, signal.SIGKILL)
            assert server.stdout.readline().strip() == "dead"
            ckpt = ck.load_checkpoint(target, task="classification")
            i = ckpt["iteration"]
            assert torch.equal(ckpt["state_dict"]["w"], torch.full((512 * 1024,), float(i)))
            seen.append(i)
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # the workers really were rewriting the file, and at least one kill hit a write
    assert len({i for i in seen if i > 0}) >= 3, seen
    assert seen == sorted(seen)
    assert mid_write_kills() > 0, "no kill landed during a write"


# ---------------------------------------------------------------- loading errors

def assert_user_error_naming(path: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        ck.load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path):
    message = assert_user_error_naming(tmp_path / "nope.pth")
    assert "does not exist" in message


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "empty" in assert_user_error_naming(path)


def test_directory(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert "folder" in assert_user_error_naming(folder)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.01])
def test_truncated_file(tmp_path, fraction):
    good = saved_checkpoint(tmp_path, "good.pth")
    data = good.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    message = assert_user_error_naming(path)
    assert "trust-checkpoint" not in message
    assert "is truncated (" in message and "miniz" not in message and "PytorchStreamReader" not in message


def resumable_payload() -> dict:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return payload(model, train_state={"optimizer": opt.state_dict(), "rng": ck.rng_state(), "epoch": 1})


@pytest.mark.parametrize("writer", ["file object", "file name"])
def test_truncation_knows_the_length_once_the_first_record_is_whole(tmp_path, writer):
    """Cut at every 37th byte (and the last 30): from the end of data.pkl on, the expected length
    is the file's real one, whichever archive name torch used (a file object gives "archive",
    a file name its stem); inside data.pkl it is unknown; a whole file is not truncated."""
    import zipfile

    from common.archive import truncation

    good = tmp_path / "good_name.pth"
    if writer == "file object":
        ck.atomic_save(resumable_payload(), good)
    else:
        torch.save(resumable_payload(), good)
    data = good.read_bytes()
    first_end = zipfile.ZipFile(good).infolist()[1].header_offset  # data.pkl and its descriptor
    assert truncation(good) is None
    cut = tmp_path / "cut.pth"
    for size in [*range(4, len(data), 37), *range(len(data) - 30, len(data))]:
        cut.write_bytes(data[:size])
        assert truncation(cut) == (size, len(data) if size >= first_end else None), size


def test_zip_damaged_otherwise_is_not_called_truncated(tmp_path):
    good = saved_checkpoint(tmp_path, "good.pth")
    data = bytearray(good.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end:end + 4] = b"XXXX"  # the end record's signature, overwritten: whole length, no directory
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    message = assert_user_error_naming(path)
    assert "truncated" not in message and "corrupt" in message and "miniz" not in message


# ---------------------------------------------------------------- hand-edited entries

def good_checkpoint() -> dict:
    from common.data.images import preprocessing

    return payload(model_spec={"name": "small_cnn", "source": "local", "kwargs": {"num_classes": 3}},
                   meta={"classes": ["a", "b", "c"], "preprocessing": preprocessing(32)})


@pytest.mark.parametrize("edit, key", [
    (lambda c: c.update(task=3), "'task'"),
    (lambda c: c["model"].pop("name"), "'model.name'"),
    (lambda c: c["model"].update(kwargs=[3]), "'model.kwargs'"),
    (lambda c: c.update(version="1"), "'version'"),
    (lambda c: c.update(metrics=[0.5]), "'metrics'"),
    (lambda c: c.update(classes=["a", None, "c"]), "'classes'"),
])
def test_check_header_names_a_mistyped_entry(tmp_path, edit, key):
    ckpt = good_checkpoint()
    edit(ckpt)
    with pytest.raises(UserError) as info:
        ck.check_header(ckpt, tmp_path / "x.pth")
    assert key in str(info.value) and str(tmp_path / "x.pth") in str(info.value)


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["preprocessing"].update(resize_size=0), "'preprocessing.resize_size'"),
    (lambda c: c["preprocessing"].update(std=[0.2, 0.0, 0.2]), "'preprocessing.std'"),
    (lambda c: c.update(task="segmentation", mask_values="0,255"), "'mask_values'"),
    (lambda c: c.update(task="segmentation", mask_values=[0, 255], preprocessing={"scale": 2}),
     "'preprocessing.scale'"),
    (lambda c: c.update(task="timeseries", preprocessing={"window_size": 8, "channels": "ax,ay",
                                                           "mean": [0, 0], "std": [1, 1]}),
     "'preprocessing.channels'"),
    (lambda c: c.update(task="timeseries", preprocessing={"window_size": "8", "channels": ["ax"],
                                                           "mean": [0], "std": [1]}),
     "'preprocessing.window_size'"),
])
def test_check_inputs_names_what_the_tools_cannot_use(tmp_path, edit, key):
    ckpt = good_checkpoint()
    ck.check_inputs(ckpt, tmp_path / "x.pth")  # the unedited one is fine
    edit(ckpt)
    with pytest.raises(UserError) as info:
        ck.check_inputs(ckpt, tmp_path / "x.pth")
    assert key in str(info.value) and str(tmp_path / "x.pth") in str(info.value)


def test_a_short_wrong_list_is_shown_not_just_called_a_list(tmp_path):
    ckpt = good_checkpoint()
    ckpt["preprocessing"]["mean"] = [1]
    with pytest.raises(UserError) as info:
        ck.check_inputs(ckpt, tmp_path / "x.pth")
    assert "should be a list of 3 numbers (one per channel), but it is [1];" in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_classes": 3, "depth": 2}, ["'depth'", "small_cnn does not take", "in_chans, width, dropout"]),
    ({"num_classes": 3, "width": "32"}, ["model.kwargs.width is '32'", "whole number"]),
    ({"num_classes": 3, "dropout": True}, ["model.kwargs.dropout is True", "float"]),
    ({"num_classes": 0}, ["model.kwargs.num_classes is 0"]),
    ({"width": 8}, ["lacks num_classes"]),
])
def test_model_from_spec_names_a_hand_edited_argument(kwargs, words):
    from common.models import model_from_spec

    with pytest.raises(UserError) as info:
        model_from_spec({"name": "small_cnn", "source": "local", "kwargs": kwargs}, where="checkpoint c.pth")
    message = str(info.value)
    assert message.startswith("checkpoint c.pth: ") and all(w in message for w in words), message


def test_model_from_spec_torchvision_arguments():
    from common.models import model_from_spec

    with pytest.raises(UserError, match="'dropout', which torchvision's resnet18 does not take"):
        model_from_spec({"name": "resnet18", "source": "torchvision",
                         "kwargs": {"num_classes": 2, "dropout": 1}})
    with pytest.raises(UserError, match="model.kwargs.num_classes is '2'"):
        model_from_spec({"name": "resnet18", "source": "torchvision", "kwargs": {"num_classes": "2"}})


RANDOM_BYTES = bytes(random.Random(0).randrange(256) for _ in range(4096))
NOT_CHECKPOINTS = {
    "random": RANDOM_BYTES,
    "text": b"hello, this is a text file and not a checkpoint\n" * 20,
    "json": b'{"lr": 0.1, "epochs": 3}\n',
}


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
def test_garbage_file_is_a_user_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    path.write_bytes(NOT_CHECKPOINTS[kind])
    assert_user_error_naming(path)


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
def test_garbage_file_is_not_called_a_pickle_to_trust(tmp_path, kind):
    """Advising --trust-checkpoint for random bytes would send users to the unsafe loader."""
    path = tmp_path / f"{kind}.pth"
    path.write_bytes(NOT_CHECKPOINTS[kind])
    with pytest.raises(UserError) as info:
        ck.load_raw(path)
    assert "trust-checkpoint" not in str(info.value)


def test_plain_state_dict_is_not_a_toolkit_checkpoint(tmp_path):
    """The way out is named with the calling script's own flag, and no flag without one."""
    path = tmp_path / "weights.pth"
    torch.save(tiny_model().state_dict(), path)
    message = assert_user_error_naming(path)
    assert ck.FORMAT in message and "--" not in message
    message = assert_user_error_naming(path, start_from="-f/--load")
    assert message.endswith("to start from its weights, pass it to -f/--load")


class Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": evil}, path)
    with pytest.raises(UserError) as info:
        ck.load_checkpoint(path)
    assert "--trust-checkpoint" in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_trust_loads_full_pickle(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=0.5)}, path)
    with pytest.raises(UserError, match="trust-checkpoint"):
        ck.load_raw(path)
    assert ck.load_raw(path, trust=True)["args"].lr == 0.5


def test_wrong_task(tmp_path):
    path = saved_checkpoint(tmp_path, task="segmentation")
    message = assert_user_error_naming(path, task="classification")
    assert "segmentation" in message and "classification" in message
    assert ck.load_checkpoint(path, task="segmentation")["task"] == "segmentation"


def test_newer_version_is_refused(tmp_path):
    data = payload()
    data["version"] = ck.VERSION + 1
    path = tmp_path / "future.pth"
    ck.atomic_save(data, path)
    assert "newer" in assert_user_error_naming(path)


def test_need_train_state(tmp_path):
    best = saved_checkpoint(tmp_path, "best_model.pth")
    assert "resume from checkpoint.pth" in assert_user_error_naming(best, need_train_state=True)
    full = saved_checkpoint(tmp_path, "checkpoint.pth", train_state={"epoch": 1})
    assert ck.load_checkpoint(full, need_train_state=True)["train_state"] == {"epoch": 1}


# ---------------------------------------------------------------- strict weights

def test_load_state_dict_checked_accepts_a_match():
    source, target = tiny_model(), nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                                 nn.Linear(8, 3))
    ck.load_state_dict_checked(target, source.state_dict(), "x.pth")
    assert torch.equal(target[0].weight, source[0].weight)


def test_load_state_dict_checked_names_what_does_not_fit():
    model = tiny_model()
    state = dict(model.state_dict())
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["3.weight"] = torch.zeros(5, 8)
    before = model[3].weight.clone()
    with pytest.raises(UserError) as info:
        ck.load_state_dict_checked(model, state, "run/best_model.pth")
    message = str(info.value)
    assert "run/best_model.pth" in message
    assert "missing: 0.bias" in message
    assert "unexpected: extra.weight" in message
    assert "3.weight (5, 8) vs (3, 8)" in message
    assert torch.equal(model[3].weight, before)  # nothing was half-loaded


def test_load_state_dict_checked_shortens_long_lists():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    with pytest.raises(UserError, match=r"missing: .*\(\+5 more\)"):
        ck.load_state_dict_checked(model, {}, "empty.pth")


def test_sha256_of(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert ck.sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------- RNG state

def draw_all() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.randn(), torch.rand(3))


def assert_same(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert torch.equal(a[4], b[4])


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gauss value in the state
    np.random.randn()
    state = ck.rng_state()
    first = draw_all()
    draw_all()
    ck.set_rng_state(state)
    assert_same(first, draw_all())


def test_rng_state_survives_safe_save_and_load(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.randn()
    path = tmp_path / "rng.pth"
    ck.atomic_save({"rng": ck.rng_state()}, path)
    first = draw_all()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ck.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert_same(first, draw_all())
