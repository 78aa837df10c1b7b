"""GPU memory on a real GPU (make test-gpu): a real CUDA out-of-memory error and its recovery,
--gpu-memory-fraction, and bench/grad_checkpointing.py's peak from torch.cuda.max_memory_allocated.

The out-of-memory test sizes its budget from the card itself: two uncapped runs measure the peak of
the U-Net at micro-batch 4 and at 8 (both with gradient checkpointing), and the run under test gets
--gpu-memory-fraction for the budget halfway between, as a fraction of torch.cuda.mem_get_info()'s
total. The caching allocator then refuses, deterministically and on any card size, what a batch of
8 needs: training turns checkpointing on, still does not fit, halves the micro-batch and goes on.
On a machine without CUDA these tests are skipped (tests/conftest.py)."""
from __future__ import annotations

import gc
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gpu_train
import train_unet
from common.checkpoint import load_checkpoint
from common.data.segmentation import make_shapes_dataset
from common.models import model_from_spec
from common.models.unet import UNet

pytestmark = pytest.mark.cuda

MiB = 2**20
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _settle() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture
def whole_gpu() -> Iterator[None]:
    """The memory fraction is per process and outlives a run: every test here starts and ends with
    the whole card (fraction 1) and an empty cache."""
    torch.cuda.set_per_process_memory_fraction(1.0)
    _settle()
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        _settle()


@pytest.fixture(scope="module")
def shapes_256(tmp_path_factory) -> Path:
    """17 image/mask pairs of 256 x 256: -v 10 keeps 1 for validation, 16 train (2 batches of 8)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", n=17, size=256)


def unet_flags(data: Path, out: Path, batch: int, accumulate: int) -> list[str]:
    return ["--data-dir", str(data), "--output", str(out), "-e", "2", "-b", str(batch),
            "--accumulate-grad-batches", str(accumulate), "-s", "1", "--width", "16", "-l", "3e-3",
            "-v", "10", "--scheduler", "none", "--num-workers", "0", "--device", "cuda", "--deterministic",
            "--data-cache", "device", "--log-interval", "1"]


def measured_run(monkeypatch, argv: list[str]) -> tuple[int, int]:
    """(peak allocated, peak reserved) bytes of a train_unet run with gradient checkpointing on from
    its first step."""
    original = UNet.__init__

    def checkpointed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.set_grad_checkpointing(True)

    with monkeypatch.context() as patch:
        patch.setattr(UNet, "__init__", checkpointed)
        _settle()
        torch.cuda.reset_peak_memory_stats()
        assert train_unet.main(argv) == 0
        torch.cuda.synchronize()
        peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    _settle()
    return peaks


def parameters(path: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint (BatchNorm's running statistics left out: the forward
    passes that ran out of memory had already updated those of the layers before the failure)."""
    ckpt = load_checkpoint(path)
    names = {name for name, _ in model_from_spec(ckpt["model"]).named_parameters()}
    return {k: v for k, v in ckpt["state_dict"].items() if k in names}


def test_a_real_out_of_memory_error_is_recovered(shapes_256, tmp_path, monkeypatch, whole_gpu):
    # micro-batch 4 from the start (checkpointing on): the reference, and the peak that must fit
    reference = tmp_path / "reference"
    _, fits = measured_run(monkeypatch, unet_flags(shapes_256, reference, 4, 2))
    # a batch of 8 with checkpointing on: what must not fit
    too_big, _ = measured_run(monkeypatch, unet_flags(shapes_256, tmp_path / "eight", 8, 1))
    assert too_big - fits > 64 * MiB, (
        f"the test's sizes do not separate: peak {fits / MiB:.0f} MiB reserved at micro-batch 4, "
        f"{too_big / MiB:.0f} MiB allocated at 8")
    budget = (fits + too_big) // 2
    total = torch.cuda.mem_get_info()[1]
    fraction = budget / total

    out = tmp_path / "recovered"
    torch.cuda.reset_peak_memory_stats()
    assert train_unet.main([*unet_flags(shapes_256, out, 8, 1), "--gpu-memory-fraction", repr(fraction)]) == 0
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(fraction, rel=1e-3)
    assert torch.cuda.max_memory_reserved() <= budget + 2 * MiB  # the cap held for the whole run
    log = (out / "training.log").read_text()
    assert "out of memory: turned on gradient checkpointing; retrying the same batch" in log
    assert "out of memory: micro-batch 8 -> 4, accumulation 1 -> 2 (effective batch 8 unchanged)" in log
    assert log.count("out of memory:") == 2  # and never again: epoch 2 ran at the settings that fitted
    ts = load_checkpoint(out / "checkpoint.pth")["train_state"]
    assert ts["epoch"] == 2 and ts["step"] == 4  # every optimizer step of both epochs was taken
    assert (ts["micro_batch"], ts["accumulate"], ts["grad_checkpointing"]) == (4, 2, True)

    got, want = parameters(out / "checkpoint_epoch2.pth"), parameters(reference / "checkpoint_epoch2.pth")
    assert got.keys() == want.keys() and got
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-3, msg=f"{key} differs")
    # the comparison means something: two epochs moved the weights far beyond that tolerance
    first = parameters(out / "checkpoint_epoch1.pth")
    assert max(float((got[k] - first[k]).abs().max()) for k in got) > 1e-3


def test_gpu_memory_fraction_caps_what_the_process_may_allocate(dataset, tmp_path, whole_gpu):
    from conftest import FAST

    cap = 512 * MiB
    fraction = cap / torch.cuda.mem_get_info()[1]
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1",
                           "--device", "cuda", "--gpu-memory-fraction", repr(fraction)]) == 0
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(fraction, rel=1e-3)
    _settle()
    small = torch.empty(cap // 8, dtype=torch.uint8, device="cuda")  # within the cap
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(cap, dtype=torch.uint8, device="cuda")  # beyond it, on a card with room to spare
    del small
    torch.cuda.set_per_process_memory_fraction(1.0)
    _settle()
    whole = torch.empty(cap, dtype=torch.uint8, device="cuda")  # the card itself had the room
    assert whole.numel() == cap


def test_grad_checkpointing_bench_reports_max_memory_allocated_ratio(capsys, whole_gpu):
    sys.path.insert(0, str(BENCH))
    try:
        import grad_checkpointing
    finally:
        sys.path.remove(str(BENCH))

    assert grad_checkpointing.main(["--size", "256", "--device", "cuda"]) == 0  # U-Net width 32, batch 4
    out = capsys.readouterr().out
    assert "measured with: torch.cuda.max_memory_allocated" in out
    without = float(re.search(r"without checkpointing: +([\d.]+) MiB", out)[1])
    with_ = float(re.search(r"with checkpointing: +([\d.]+) MiB", out)[1])
    ratio = float(re.search(r"^ratio: ([\d.]+)$", out, re.M)[1])
    assert without > 100 and with_ > 0  # a batch of 4 at 256 px keeps hundreds of MiB for backward
    assert ratio == pytest.approx(with_ / without, abs=2e-3)
    assert ratio <= 0.6, out
