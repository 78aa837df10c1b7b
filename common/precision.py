"""One autocast context and one GradScaler, chosen once for the device and dtype."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

Log = Callable[[str], None]


@dataclass
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: full precision
    scaler: torch.amp.GradScaler

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        if self.dtype is None:
            return "precision: float32"
        name = str(self.dtype).replace("torch.", "")
        return f"precision: {name} autocast" + (" + GradScaler" if self.scaler.is_enabled() else "")


def make_precision(device: torch.device, amp: bool, amp_dtype: str | None = None,
                   log: Log = print) -> Precision:
    """--amp: float16 + GradScaler on CUDA, bfloat16 without a scaler when asked for.

    On CPU, AMP stays off with a notice unless bfloat16 is asked for explicitly.
    """
    kind = device.type
    dtype = None
    if amp:
        if kind == "cuda":
            dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
            if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
                log("notice: this GPU lacks bfloat16; using float16 with GradScaler")
                dtype = torch.float16
        elif kind == "cpu" and amp_dtype == "bfloat16":
            dtype = torch.bfloat16
        else:
            log(f"notice: --amp is off on {kind} (float16 autocast needs CUDA); "
                "add --amp-dtype bfloat16 to train in bfloat16 here")
    scaler = torch.amp.GradScaler("cuda" if kind == "cuda" else "cpu",
                                  enabled=kind == "cuda" and dtype is torch.float16)
    return Precision(device_type=kind, dtype=dtype, scaler=scaler)
