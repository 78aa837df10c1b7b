"""Training and inference speed of the time-series models against a plain Conv1d net, one run.

    python bench/timeseries_models.py                    # CPU, or the GPU when there is one
    python bench/timeseries_models.py --device cpu --width 64 --depth 2 --length 128 --channels 6

The baseline is two Conv1d(kernel 5)-ReLU layers of `width` channels, mean pooling and a linear
head: the least a model of this task does. Every model (baseline included) trains with Adam on
the same in-memory batches; each round times a few training steps and a few inference passes
(eval, no_grad) of every model back to back, in a rotating order, so that a busy machine slows
them all alike; no round starts after --budget seconds. Reported: the median over rounds of
training samples/s and inference ms/sample, and each as the median ratio to the baseline of the
same round (train: model / baseline throughput, lower is slower; infer: model / baseline time
per sample, higher is slower). A measurement, not a test: it exits 0 whatever the numbers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `common`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common.models.timeseries import SeriesCNN, SeriesFusion, SeriesTransformer  # noqa: E402

NUM_CLASSES = 3


class PlainConv1d(nn.Module):
    """The baseline: Conv1d-ReLU twice, mean over time, linear head."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64, **_: object):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_chans, width, 5, padding=2), nn.ReLU(),
                                 nn.Conv1d(width, width, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean(dim=-1))


MODELS: dict[str, Callable[..., nn.Module]] = {"baseline": PlainConv1d, "cnn": SeriesCNN,
                                                "transformer": SeriesTransformer, "fusion": SeriesFusion}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch (default 32)")
    p.add_argument("--length", type=int, default=128, help="window length T (default 128)")
    p.add_argument("--channels", type=int, default=6, help="channels C (default 6)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="training steps and inference passes a round (5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds at most (default 5)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="no new round after this many seconds (default 20; at least one round runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    sizes = (args.batch_size, args.steps, args.rounds, args.channels, args.width, args.depth)
    if min(sizes) < 1 or args.length < 8:
        p.error("sizes, --steps and --rounds must be >= 1 and --length >= 8")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but CUDA is not available")
    return torch.device(name)


class Side:
    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(0)
        self.model = MODELS[name](num_classes=NUM_CLASSES, in_chans=args.channels, width=args.width,
                                  depth=args.depth).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.params = sum(p.numel() for p in self.model.parameters())

    def train(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model.train()
        for x, y in batches:
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()

    def infer(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model.eval()
        with torch.no_grad():
            for x, _ in batches:
                self.model(x)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, args.channels, args.length, generator=gen).to(device),
                torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device))
               for _ in range(args.steps)]
    sides = {name: Side(name, args, device) for name in MODELS}
    for side in sides.values():  # warm-up: kernels, allocator, optimizer state
        side.train(batches[:1])
        side.infer(batches[:1])
    samples = args.steps * args.batch_size
    train_rate: dict[str, list[float]] = {n: [] for n in sides}
    infer_ms: dict[str, list[float]] = {n: [] for n in sides}
    train_ratio: dict[str, list[float]] = {n: [] for n in sides}
    infer_ratio: dict[str, list[float]] = {n: [] for n in sides}
    names = list(sides)
    started, done = time.perf_counter(), 0
    for r in range(args.rounds):
        if r and time.perf_counter() - started > args.budget:
            break
        done += 1
        for name in names[r % len(names):] + names[:r % len(names)]:
            side = sides[name]
            train_rate[name].append(samples / timed(lambda s=side: s.train(batches), device))
            infer_ms[name].append(1e3 * timed(lambda s=side: s.infer(batches), device) / samples)
        for name in names:
            train_ratio[name].append(train_rate[name][-1] / train_rate["baseline"][-1])
            infer_ratio[name].append(infer_ms[name][-1] / infer_ms["baseline"][-1])
    print(f"device {device}, windows {args.batch_size}x{args.channels}x{args.length}, width {args.width}, "
          f"depth {args.depth}, {done} rounds of {args.steps} steps")
    print(f"{'model':12}{'params':>10}{'train/s':>11}{'x base':>8}{'infer ms':>11}{'x base':>8}")
    med = statistics.median
    for name, side in sides.items():
        print(f"{name:12}{side.params:>10,}{med(train_rate[name]):>11.0f}{med(train_ratio[name]):>8.2f}"
              f"{med(infer_ms[name]):>11.4f}{med(infer_ratio[name]):>8.2f}")
    print("x base: train = samples/s relative to the baseline (lower is slower); "
          "infer = ms/sample relative to the baseline (higher is slower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
