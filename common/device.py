"""Device choice, backend switches (TF32, cudnn.benchmark, determinism), seeding, and the
one-line environment report."""
from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from .errors import UserError

Log = Callable[[str], None]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def select_device(name: str = "auto", gpu_id: int | None = None, no_gpu: bool = False,
                  local_rank: int | None = None, log: Log = print) -> torch.device:
    """Pick the device: --no-gpu/cpu, an explicit cuda[:N]/mps, or auto (CUDA, MPS, CPU).

    Asking for CUDA on a machine without it falls back to the CPU with a notice, so a command
    copied from a GPU guide still runs on a laptop.
    """
    name = (name or "auto").lower()
    if no_gpu or name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if _mps_available():
            return torch.device("mps")
        log("notice: --device mps requested but MPS is not available; using the CPU")
        return torch.device("cpu")
    if name not in {"auto", "cuda"} and not name.startswith("cuda:"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    index = _cuda_index(name, gpu_id, local_rank)  # its spelling is checked on every machine
    if gpu_id is not None and gpu_id < 0:
        raise UserError(f"--gpu-id must be a GPU index (0, 1, ...), got {gpu_id}")
    if not torch.cuda.is_available():
        if name != "auto":
            log(f"notice: --device {name} requested but CUDA is not available; using the CPU")
        elif gpu_id is not None:
            log(f"notice: --gpu-id {gpu_id} requested but CUDA is not available; using the CPU")
        elif _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise UserError(f"GPU {index} requested but only {count} GPU(s) are visible "
                        f"(CUDA_VISIBLE_DEVICES={visible}); pass --gpu-id between 0 and {count - 1}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _cuda_index(name: str, gpu_id: int | None, local_rank: int | None) -> int:
    if name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            index = -1
        if index < 0:
            raise UserError(f"bad --device {name!r}; write cuda:N with N a GPU index (0, 1, ...)")
        return index
    if local_rank is not None:
        return local_rank
    return gpu_id or 0


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """TF32 on Ampere and newer, cudnn.benchmark unless deterministic results are asked for."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def set_memory_fraction(fraction: float | None, device: torch.device, log: Log = print) -> None:
    if fraction is None:
        return
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    if device.type != "cuda":
        log("notice: --gpu-memory-fraction applies to CUDA only; ignored on " + device.type)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe(device: torch.device) -> str:
    """One line saying which device runs, and what it is."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cudnn = torch.backends.cudnn.version()
        return (f"device: {device} ({props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"CUDA {torch.version.cuda}, cuDNN {cudnn})")
    if device.type == "mps":
        return "device: mps (Apple GPU)"
    return f"device: cpu ({torch.get_num_threads()} threads; no GPU in use)"


def default_num_workers(device: torch.device) -> int:
    """A worker count that feeds the device without oversubscribing small machines.

    Windows starts workers with spawn (slow to start, every worker re-imports torch), so it is
    capped lower there.
    """
    cpus = os.cpu_count() or 1
    if cpus <= 2:
        return 0 if device.type == "cpu" else 1
    cap = 4 if sys.platform == "win32" else 8
    return min(cap, cpus - 1)


def resolve_pin_memory(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting) and device.type == "cuda"


def resolve_channels_last(setting: bool | str, device: torch.device, log: Log = print) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    if setting and device.type != "cuda":
        log("notice: --channels-last only speeds up CUDA; kept off on " + device.type)
        return False
    return bool(setting)
