"""Will an input size fit in memory? Checked before the work, so that `--img-size 100000` is one
line instead of the machine's out-of-memory killer after minutes (exit 137, nothing saved).

Two estimates, both lower bounds, so a size that could fit is never refused:
- before the data and the model: the bytes one input takes while it is prepared (the decoded
  uint8 image, its float32 tensor and the augmented copy), times the batch;
- once the model is built: the activations autograd keeps for the backward pass, measured on a
  dry run at a small size (tensors saved for backward, counted once each, through
  torch.autograd.graph.saved_tensors_hooks) and scaled to the real size by the pixel count,
  plus weights, gradients and two optimizer moments.
Memory is the GPU's free memory on CUDA, else the available RAM. On CUDA a batch that does not
fit is left to out-of-memory recovery (common/memory.py: checkpointing, then smaller
micro-batches; `recovers`), so only a single input that cannot fit is refused there; on the CPU an
allocation beyond the RAM ends the process, so the batch is checked too.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .data.cache import available_ram
from .errors import UserError

PREPARE_COPIES = 9  # bytes per pixel and channel while an input is made: uint8 + float32 + float32
PARAM_COPIES = 4  # weights, gradients and two Adam/AdamW moments, float32
PROBE_SIZE = 64  # pixels of the dry run's square inputs
PROBE_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def human(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def memory_budget(device: torch.device) -> tuple[int | None, str]:
    """(bytes an allocation can use, what they are): free GPU memory on CUDA, else available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), "free on the GPU"
    return available_ram(), "of available RAM"


def _largest_square(budget: float, bytes_per_pixel: float) -> int:
    return max(0, int(math.sqrt(max(budget, 0) / bytes_per_pixel)))


def check_input_size(flag: str, height: int, width: int, channels: int, batch: int,
                     device: torch.device, budget: tuple[int | None, str] | None = None,
                     recovers: bool | None = None) -> None:
    """Refuse an input size whose preparation alone cannot fit (one input on CUDA, the batch on
    the CPU), before any image is read."""
    avail, where = budget or memory_budget(device)
    if avail is None:
        return
    per_input = PREPARE_COPIES * channels * height * width
    count = 1 if (device.type == "cuda" if recovers is None else recovers) else batch
    if count * per_input <= avail:
        return
    side = _largest_square(avail / count, PREPARE_COPIES * channels)
    what = "one input" if count == 1 else f"a batch of {batch}"
    named = f"{flag} {height}" if height == width else flag
    raise UserError(f"{named}: inputs of {height} x {width} px cannot fit: preparing {what} takes at "
                    f"least {human(count * per_input)}, and there is {human(avail)} {where}; use a "
                    f"smaller {flag} (about {side} px at most{'' if count == 1 else ' at this batch size'})")


def saved_activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward of `example`, each
    storage counted once. The model is left as it was (mode and buffers such as BatchNorm's
    running statistics)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = [(m, m.training) for m in model.modules()]  # each one's: frozen BatchNorm stays in eval
    try:
        model.train()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(example)
        del output
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    # weights are counted apart, the input with the inputs
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip.add(example.untyped_storage().data_ptr())
    return sum(n for (ptr, _), n in seen.items() if ptr not in skip)


def activation_bytes_per_pixel(model: nn.Module, channels: int, device: torch.device,
                               size: int) -> float | None:
    """Saved activation bytes per input pixel, measured at PROBE_SIZE (or at `size` itself for a
    model that cannot take small inputs); None when no dry run works."""
    for probe in dict.fromkeys((min(size, PROBE_SIZE), size if size <= 4 * PROBE_SIZE else None)):
        if probe is None:
            continue
        example = torch.randn(PROBE_BATCH, channels, probe, probe, device=device)
        try:
            saved = saved_activation_bytes(model, example)
        except (RuntimeError, ValueError, TypeError, AssertionError):
            continue  # a model with a fixed input size, or too small an input for it
        return saved / (PROBE_BATCH * probe * probe)
    return None


def _training_need(model: nn.Module, channels: int, device: torch.device, probe: int,
                   budget: tuple[int | None, str] | None) -> tuple[int, str, int, float] | None:
    """(bytes available, what they are, bytes of weights + gradients + optimizer, bytes per input
    pixel: activations and preparation), or None when either cannot be known."""
    avail, where = budget or memory_budget(device)
    per_pixel = activation_bytes_per_pixel(model, channels, device, probe)
    if avail is None or per_pixel is None:
        return None
    fixed = PARAM_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    return avail, where, fixed, per_pixel + PREPARE_COPIES * channels


def check_training_memory(model: nn.Module, flag: str, size: int, channels: int, batch: int,
                          device: torch.device, log: Callable[[str], None],
                          budget: tuple[int | None, str] | None = None, recovers: bool | None = None) -> None:
    """Refuse a size at which training cannot fit even one input (on the CPU: the batch); log a
    notice when, on CUDA, the batch is expected not to fit and recovery will split it."""
    need_of = _training_need(model, channels, device, size, budget)
    if need_of is None:
        return
    avail, where, fixed, per_pixel = need_of
    per_input = per_pixel * size * size
    recovers, count, need = _inputs_at_once(device, recovers, batch, fixed, per_input)
    if need > avail:
        side = _largest_square((avail - fixed) / count, per_pixel)
        what = "one input" if count == 1 else f"a batch of {batch}"
        fix = f"use a smaller {flag} (about {side} px at most)" if side >= 8 else \
            "the model itself does not fit: use a smaller model"
        fix += _smaller_batch("--batch-size", count, avail, fixed, per_input)
        raise UserError(f"{flag} {size}: training cannot fit: {what} needs at least {human(need)} "
                        f"(weights, gradients and optimizer {human(fixed)}, activations and inputs "
                        f"{human(per_input)} per input), and there is {human(avail)} {where}; {fix}")
    _notice_split(recovers, fixed + batch * per_input, avail, where, f"a batch of {batch} at {size} px", log)


def check_scaled_memory(model: nn.Module, height: int, width: int, scale: float, channels: int,
                        batch: int, device: torch.device, log: Callable[[str], None],
                        budget: tuple[int | None, str] | None = None, recovers: bool | None = None) -> None:
    """The same check for inputs of their own size shrunk by -s/--scale (train_unet.py): height x
    width is the largest image; the message suggests the largest scale that fits."""
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    need_of = _training_need(model, channels, device, min(h, w), budget)
    if need_of is None:
        return
    avail, where, fixed, per_pixel = need_of
    per_input = per_pixel * h * w
    recovers, count, need = _inputs_at_once(device, recovers, batch, fixed, per_input)
    if need > avail:
        fits = math.sqrt(max(avail - fixed, 0) / count / per_input) * scale
        what = "one image" if count == 1 else f"a batch of {batch}"
        fix = f"use a smaller -s/--scale (about {math.floor(fits * 100) / 100:.2f} at most)" \
            if fits * min(height, width) >= 16 else \
            "even the smallest scale the U-Net takes does not fit: use a smaller --width"
        fix += _smaller_batch("-b/--batch-size", count, avail, fixed, per_input)
        raise UserError(f"-s/--scale {scale}: training on {height} x {width} px images ({h} x {w} scaled) "
                        f"cannot fit: {what} needs at least {human(need)} (weights, gradients and "
                        f"optimizer {human(fixed)}, activations and inputs {human(per_input)} per image), "
                        f"and there is {human(avail)} {where}; {fix}")
    _notice_split(recovers, fixed + batch * per_input, avail, where,
                  f"a batch of {batch} at {h} x {w} px", log)


def _inputs_at_once(device: torch.device, recovers: bool | None, batch: int, fixed: int,
                    per_input: float) -> tuple[bool, int, float]:
    """(recovers, inputs that must fit at once, bytes they need): with out-of-memory recovery (CUDA)
    one input must fit, as the batch is split; without it, the whole batch."""
    recovers = device.type == "cuda" if recovers is None else recovers
    count = 1 if recovers else batch
    return recovers, count, fixed + count * per_input


def _smaller_batch(flag: str, count: int, avail: int, fixed: int, per_input: float) -> str:
    """", or a smaller --batch-size (about N)" where one input fits but not the batch."""
    if count > 1 and fixed + per_input <= avail:
        return f", or a smaller {flag} (about {max(1, int((avail - fixed) // per_input))})"
    return ""


def _notice_split(recovers: bool, need: float, avail: int, where: str, what: str,
                  log: Callable[[str], None]) -> None:
    if recovers and need > avail:
        log(f"notice: {what} needs at least {human(need)} and {human(avail)} is {where}; "
            "out-of-memory recovery will split it into micro-batches")
