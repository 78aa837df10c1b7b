"""The decode-once data cache on a real GPU (make test-gpu): with --data-cache device the images
and labels live on the GPU and a whole training epoch copies no image from the host; with
--data-cache ram (the control, which proves the two detectors see such copies) every batch is
copied. Two detectors: Python-level CPU->CUDA moves of image-sized tensors (Tensor.to, .cuda,
.copy_), and the host-to-device memcpy operations torch.profiler records on the GPU.
Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder
from torch.profiler import ProfilerActivity, profile

import common.engine as engine
import gpu_train

pytestmark = pytest.mark.cuda

IMAGE = 3 * 32 * 32  # elements of one image at the training size
TRAIN_IMAGES, BATCH = 64, 8


@pytest.fixture
def data_64(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    make_folder(root / "train", per_class=TRAIN_IMAGES // 2, seed=1)
    make_folder(root / "val", per_class=6, seed=2)
    return root


def _is_cuda_target(args: tuple, kwargs: dict) -> bool:
    for value in (kwargs.get("device"), *args):
        if isinstance(value, torch.Tensor):
            value = value.device
        if isinstance(value, (str, torch.device, int)) and not isinstance(value, bool):
            try:
                return torch.device(value).type == "cuda"
            except (RuntimeError, TypeError):
                continue
    return False


def watched_epoch(monkeypatch, epoch_to_watch: int = 2) -> dict:
    """Wraps engine.train_one_epoch: the loader of every epoch, and for one epoch the image-sized
    CPU->CUDA moves made from Python and the profiler's host-to-device memcpys."""
    seen: dict = {"loaders": [], "moves": [], "memcpy": None}
    original = engine.train_one_epoch

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            if name == "copy_":
                source, target = args[0], self
                moved = isinstance(source, torch.Tensor) and source.device.type == "cpu" and target.is_cuda
            else:
                source = self
                moved = self.device.type == "cpu" and (name == "cuda" or _is_cuda_target(args, kwargs))
            if moved and source.numel() >= IMAGE:
                seen["moves"].append(f"{name} {tuple(source.shape)} {source.dtype}")
            return result
        return wrapper

    def wrapped(model, task, loader, *args, **kwargs):
        seen["loaders"].append(loader)
        if len(seen["loaders"]) != epoch_to_watch:
            return original(model, task, loader, *args, **kwargs)
        torch.cuda.synchronize()
        with monkeypatch.context() as patch:
            for name in ("to", "cuda", "copy_"):
                patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                result = original(model, task, loader, *args, **kwargs)
                torch.cuda.synchronize()
        seen["memcpy"] = [e.name for e in prof.events() if "HtoD" in e.name]
        return result

    monkeypatch.setattr(engine, "train_one_epoch", wrapped)
    return seen


def run(data: Path, out: Path, cache: str) -> int:
    return gpu_train.main(["--data-dir", str(data), "--output", str(out), *FAST, "--device", "cuda",
                           "--epochs", "2", "--data-cache", cache])


def test_device_cache_epoch_copies_no_image_from_the_host(data_64, tmp_path, monkeypatch):
    batches = TRAIN_IMAGES // BATCH
    assert FAST[FAST.index("--batch-size") + 1] == str(BATCH)

    seen = watched_epoch(monkeypatch)
    assert run(data_64, tmp_path / "device", "device") == 0
    loader = seen["loaders"][1]
    assert loader.images.is_cuda and loader.targets.is_cuda and loader.images.dtype == torch.uint8
    assert loader.images.shape[0] == TRAIN_IMAGES
    assert "data cache: on the GPU" in (tmp_path / "device" / "training.log").read_text()
    assert seen["moves"] == [], seen["moves"]
    assert len(seen["memcpy"]) < batches, seen["memcpy"]  # the epoch's sample order, not a copy per batch

    monkeypatch.undo()
    control = watched_epoch(monkeypatch)
    assert run(data_64, tmp_path / "ram", "ram") == 0
    assert not control["loaders"][1].images.is_cuda
    assert len(control["moves"]) >= batches, control["moves"]  # every batch's images came over
    assert len(control["memcpy"]) >= batches, control["memcpy"]
