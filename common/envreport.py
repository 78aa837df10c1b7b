"""The environment report (run_behavior_classification.py --test-gpu): versions, each GPU,
TF32 / bfloat16 support, an autocast smoke test, a matmul throughput figure and a DataLoader
check. Without a GPU it says so plainly; the CPU figures are still measured.

The CUDA module is a parameter so that the GPU branch runs in tests through a stand-in.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

Log = Callable[[str], None]


def matmul_tflops(device: torch.device, size: int = 1024, dtype: torch.dtype = torch.float32,
                  repeats: int = 5) -> float:
    """Dense matmul throughput in TFLOP/s (one warm-up, then `repeats` timed products)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    started = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()  # one sync for all of them
    seconds = max(time.perf_counter() - started, 1e-9)
    return 2 * size**3 * repeats / seconds / 1e12


def autocast_smoke(device: torch.device, dtype: torch.dtype) -> str:
    """A linear layer and its backward under autocast; returns the output dtype's name."""
    layer = torch.nn.Linear(64, 64).to(device)
    x = torch.randn(8, 64, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    y.float().sum().backward()
    if not torch.isfinite(layer.weight.grad).all():
        raise RuntimeError("non-finite gradient under autocast")
    return str(y.dtype).removeprefix("torch.")


def dataloader_check(workers: int, pin: bool) -> str:
    """Iterate a small in-memory set with the given workers and pinning; returns a summary."""
    data = torch.utils.data.TensorDataset(torch.randn(512, 6, 128), torch.randint(0, 3, (512,)))
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    loader = torch.utils.data.DataLoader(data, batch_size=64, num_workers=workers, pin_memory=pin, **extra)
    started = time.perf_counter()
    batches = sum(1 for _ in loader)
    rate = 512 / max(time.perf_counter() - started, 1e-9)
    return f"{batches} batches with {workers} worker(s), pin_memory={pin}: {rate:,.0f} samples/s"


def _gpu_lines(cuda: Any, log: Log) -> None:
    count = cuda.device_count()
    log(f"GPUs: {count} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'not set')})")
    for i in range(count):
        props = cuda.get_device_properties(i)
        major, minor = props.major, props.minor
        tf32 = "yes" if major >= 8 else "no (needs compute capability 8.0, Ampere or newer)"
        bf16 = "yes" if cuda.is_bf16_supported() else "no"
        log(f"  GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{major}.{minor}; TF32: {tf32}; bfloat16: {bf16}")


def report(log: Log = print, cuda: Any = None, workers: int | None = None,
           measure: Callable[[torch.device], float] = matmul_tflops,
           smoke: Callable[[torch.device, torch.dtype], str] = autocast_smoke) -> int:
    """Print the report; returns 0 (also without a GPU: that is a finding, not a failure), or 1
    when a check on a present GPU fails."""
    cuda = cuda if cuda is not None else torch.cuda
    log(f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA build {torch.version.cuda or 'none (CPU-only build of torch)'}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}")
    failed = 0
    if not cuda.is_available():
        log("no CUDA GPU is available: training will run on the CPU. To use a GPU, install an NVIDIA "
            "driver and a CUDA build of torch")
        device = torch.device("cpu")
    else:
        _gpu_lines(cuda, log)
        device = torch.device("cuda", 0)
        for dtype in (torch.float16, torch.bfloat16):
            try:
                log(f"autocast {str(dtype).removeprefix('torch.')}: ok (output {smoke(device, dtype)})")
            except (RuntimeError, TypeError) as exc:
                failed += 1
                why = " ".join(str(exc).split())[:160]
                log(f"autocast {str(dtype).removeprefix('torch.')}: FAILED ({why})")
    log(f"matmul 1024x1024 float32 on {device}: {measure(device):.2f} TFLOP/s")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    log(f"DataLoader: {dataloader_check(workers, pin=device.type == 'cuda')}")
    log("GPU check: " + ("passed" if failed == 0 else f"{failed} check(s) failed"))
    return 1 if failed else 0
