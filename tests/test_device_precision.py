"""common/device.py and common/precision.py on a CPU machine (CUDA faked where needed)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common import device as dev
from common import precision as prec
from common.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    """Behave like a machine without CUDA and without MPS, whatever runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_auto_picks_cpu_silently(no_cuda):
    logged: list[str] = []
    assert dev.select_device("auto", log=logged.append) == CPU
    assert dev.select_device(None, log=logged.append) == CPU
    assert logged == []


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "CUDA"])
def test_cuda_without_cuda_falls_back_with_notice(no_cuda, name):
    logged: list[str] = []
    assert dev.select_device(name, log=logged.append) == CPU
    assert logged == [f"notice: --device {name.lower()} requested but CUDA is not available; using the CPU"]


def test_mps_without_mps_falls_back_with_notice(no_cuda):
    logged: list[str] = []
    assert dev.select_device("mps", log=logged.append) == CPU
    assert logged == ["notice: --device mps requested but MPS is not available; using the CPU"]


def test_unknown_device_is_a_user_error(no_cuda):
    with pytest.raises(UserError) as info:
        dev.select_device("bogus")
    assert str(info.value) == "unknown --device 'bogus'; use auto, cpu, cuda, cuda:N or mps"


def test_no_gpu_and_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a "GPU" present
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("no GPU may be chosen"))
    logged: list[str] = []
    assert dev.select_device("cuda", no_gpu=True, log=logged.append) == CPU
    assert dev.select_device("auto", gpu_id=1, no_gpu=True, log=logged.append) == CPU
    assert dev.select_device("cpu", log=logged.append) == CPU
    assert logged == []  # asked for, so nothing to explain


def test_gpu_index_beyond_visible_gpus_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError) as info:
        dev.select_device("auto", gpu_id=2)
    assert str(info.value) == ("GPU 2 requested but only 1 GPU(s) are visible (CUDA_VISIBLE_DEVICES=3); "
                               "pass --gpu-id between 0 and 0")
    with pytest.raises(UserError) as info:
        dev.select_device("cuda:x")
    assert str(info.value) == "bad --device 'cuda:x'; write cuda:N with N a GPU index (0, 1, ...)"


def test_pin_memory_and_channels_last_on_cpu():
    assert dev.resolve_pin_memory("auto", CPU) is False
    assert dev.resolve_pin_memory(True, CPU) is False
    assert dev.resolve_pin_memory(False, CPU) is False
    cuda = torch.device("cuda", 0)
    assert dev.resolve_pin_memory("auto", cuda) is True
    assert dev.resolve_pin_memory(False, cuda) is False

    logged: list[str] = []
    assert dev.resolve_channels_last("auto", CPU, log=logged.append) is False
    assert logged == []
    assert dev.resolve_channels_last(True, CPU, log=logged.append) is False
    assert logged == ["notice: --channels-last only speeds up CUDA; kept off on cpu"]
    assert dev.resolve_channels_last("auto", cuda, log=logged.append) is True
    assert dev.resolve_channels_last(False, cuda, log=logged.append) is False


def test_memory_fraction_on_cpu_is_a_notice():
    logged: list[str] = []
    dev.set_memory_fraction(0.5, CPU, log=logged.append)
    assert logged == ["notice: --gpu-memory-fraction applies to CUDA only; ignored on cpu"]
    dev.set_memory_fraction(None, CPU, log=logged.append)
    assert len(logged) == 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_memory_fraction_out_of_range(fraction):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        dev.set_memory_fraction(fraction, CPU, log=lambda _: None)


def test_default_num_workers(monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: None)  # unknown: as one core
    assert dev.default_num_workers(CPU) == 0
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    assert dev.default_num_workers(CPU) == 0
    assert dev.default_num_workers(torch.device("cuda", 0)) == 1  # a GPU is fed by one worker
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(dev.sys, "platform", "win32")
    assert dev.default_num_workers(CPU) == 4
    monkeypatch.setattr(dev.sys, "platform", "linux")
    assert dev.default_num_workers(CPU) == 8
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 4)
    assert dev.default_num_workers(CPU) == 3


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    dev.seed_everything(123)
    a = draw()
    dev.seed_everything(123)
    b = draw()
    dev.seed_everything(124)
    c = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(a[2], c[2])


def test_describe_cpu():
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert dev.describe(CPU) == f"device: cpu ({n} threads; no GPU in use)"
    finally:
        torch.set_num_threads(threads)


def test_describe_cuda(monkeypatch):
    props = type("Props", (), {"name": "NVIDIA GeForce RTX 3090", "total_memory": 24 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert dev.describe(torch.device("cuda", 1)) == ("device: cuda:1 (NVIDIA GeForce RTX 3090, 24.0 GiB, "
                                                     "CUDA 12.4, cuDNN 90100)")
    assert dev.describe(torch.device("mps")) == "device: mps (Apple GPU)"


# ---------------------------------------------------------------- precision

def test_amp_on_cpu_is_off_with_notice():
    logged: list[str] = []
    p = prec.make_precision(CPU, amp=True, log=logged.append)
    assert p.enabled is False and p.dtype is None
    assert not p.scaler.is_enabled()
    assert logged == ["notice: --amp is off on cpu (float16 autocast needs CUDA); add --amp-dtype bfloat16 "
                      "to train in bfloat16 here"]
    assert p.describe() == "precision: float32"
    x = torch.randn(4, 4)
    with p.autocast():
        assert (x @ x).dtype == torch.float32


def test_no_amp_is_float32_without_notice():
    logged: list[str] = []
    p = prec.make_precision(CPU, amp=False, log=logged.append)
    assert p.dtype is None and not p.scaler.is_enabled() and logged == []


def test_bfloat16_on_cpu_really_autocasts():
    logged: list[str] = []
    p = prec.make_precision(CPU, amp=True, amp_dtype="bfloat16", log=logged.append)
    assert p.enabled and p.dtype is torch.bfloat16
    assert not p.scaler.is_enabled()
    assert logged == []
    assert p.describe() == "precision: bfloat16 autocast"  # no GradScaler
    x = torch.randn(4, 4)
    with p.autocast():
        assert (x @ x).dtype == torch.bfloat16
    assert (x @ x).dtype == torch.float32


class FakeScaler:
    def __init__(self, device: str = "cuda", enabled: bool = True):
        self.device, self.enabled = device, enabled

    def is_enabled(self) -> bool:
        return self.enabled


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", FakeScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_cuda_float16_uses_an_enabled_scaler(fake_cuda):
    p = prec.make_precision(torch.device("cuda", 0), amp=True, log=lambda _: None)
    assert p.dtype is torch.float16
    assert p.scaler.device == "cuda" and p.scaler.is_enabled()
    assert p.describe() == "precision: float16 autocast + GradScaler"


def test_cuda_bfloat16_has_no_scaler(fake_cuda):
    p = prec.make_precision(torch.device("cuda", 0), amp=True, amp_dtype="bfloat16")
    assert p.dtype is torch.bfloat16
    assert not p.scaler.is_enabled()


def test_cuda_without_bfloat16_falls_back_to_float16(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    logged: list[str] = []
    p = prec.make_precision(torch.device("cuda", 0), amp=True, amp_dtype="bfloat16",
                            log=logged.append)
    assert p.dtype is torch.float16 and p.scaler.is_enabled()
    assert logged == ["notice: this GPU lacks bfloat16; using float16 with GradScaler"]


def test_cuda_without_amp_has_no_scaler(fake_cuda):
    p = prec.make_precision(torch.device("cuda", 0), amp=False)
    assert p.dtype is None and not p.scaler.is_enabled()


def test_gpu_id_without_cuda_is_a_notice_and_a_negative_index_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    said = []
    assert dev.select_device("auto", gpu_id=3, log=said.append) == CPU
    assert said == ["notice: --gpu-id 3 requested but CUDA is not available; using the CPU"]
    said.clear()
    assert dev.select_device("auto", log=said.append) == CPU
    assert said == []  # nothing asked for, nothing to say
    with pytest.raises(UserError, match="--gpu-id must be a GPU index"):
        dev.select_device("auto", gpu_id=-1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="cuda:N with N a GPU index"):
        dev.select_device("cuda:-1")
