"""Peak memory of a U-Net training step with and without gradient checkpointing, same batch.

    python bench/grad_checkpointing.py                 # CUDA when present, else the CPU
    python bench/grad_checkpointing.py --batch-size 8 --size 256 --width 64

On CUDA the peak is torch.cuda.max_memory_allocated() around one training step. On the CPU
each variant runs in a fresh child process and the peak is the process's resident high-water
mark (ru_maxrss) during the step minus what it held before the step, so both variants are
measured the same way in one run. The last line is `ratio: X` (with / without); at most 0.7
is expected.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `common`

import torch  # noqa: E402

from common.models.unet import UNet  # noqa: E402
from common.tasks import SegmentationTask  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--width", type=int, default=32, help="U-Net base width (default 32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def step(model: UNet, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = SegmentationTask(2).loss(model(x), y)
    loss.backward()


def setup(args, device: torch.device, checkpointing: bool):
    torch.manual_seed(0)
    model = UNet(2, base=args.width).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.rand(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch_size, args.size, args.size), device=device)
    return model, x, y


def peak_kib_cpu(args, checkpointing: bool) -> float:
    """In a child process: the resident high-water mark added by one step, in KiB."""
    model, x, y = setup(args, torch.device("cpu"), checkpointing)
    small = argparse.Namespace(**{**vars(args), "batch_size": 1, "size": 32})
    step(*setup(small, torch.device("cpu"), checkpointing))  # warm up the kernels and allocator
    model.zero_grad(set_to_none=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(model, x, y)
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)


def peak_bytes_cuda(args, checkpointing: bool) -> float:
    device = torch.device("cuda")
    model, x, y = setup(args, device, checkpointing)
    step(model, x, y)  # warm-up
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, x, y)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps({"peak": peak_kib_cpu(args, args.child == "on")}))
        return 0
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    print(f"U-Net width {args.width}, batch {args.batch_size}x3x{args.size}x{args.size}, one training step")
    if cuda:
        plain, ckpt = peak_bytes_cuda(args, False), peak_bytes_cuda(args, True)
        unit, scale, how = "MiB", 2**20, "torch.cuda.max_memory_allocated"
    else:
        def child(mode: str) -> float:
            cmd = [sys.executable, __file__, "--child", mode, "--batch-size", str(args.batch_size),
                   "--size", str(args.size), "--width", str(args.width)]
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["peak"]
        plain, ckpt = child("off"), child("on")
        unit, scale, how = "MiB", 1024, "CPU resident high-water mark (ru_maxrss), fresh process each"
    print(f"measured with: {how}")
    print(f"without checkpointing: {plain / scale:8.1f} {unit}")
    print(f"with checkpointing:    {ckpt / scale:8.1f} {unit}")
    print("expected: ratio <= 0.7")
    print(f"ratio: {ckpt / max(plain, 1.0):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
