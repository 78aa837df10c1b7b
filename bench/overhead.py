"""Overhead of the project's training loop against a bare PyTorch loop, measured in one run.

    python bench/overhead.py                       # CPU, or the GPU when there is one
    python bench/overhead.py --device cuda --batches 200 --batch-size 256

Both sides train the same SmallCNN (10 classes, 3x32x32 inputs; each epoch starts from the
same initial weights with a fresh AdamW lr 1e-3) on the same in-memory batches, a list of
(x, y) tensors already on the device:

  bare:    for x, y in batches: forward, F.cross_entropy, zero_grad, backward, step
  engine:  common.engine.train_one_epoch, with its progress bar (stderr) and postfix on

Two ways to interleave them (--interleave; auto picks `step` on CPU and `epoch` on CUDA):

  epoch  each round times one epoch of each side back to back, between
         torch.cuda.synchronize() calls on CUDA; which side goes first alternates. The ratio
         is the median over rounds of engine/bare throughput within a round.
  step   each round is one engine epoch whose loader, before it hands out a batch, takes and
         times one bare step on that batch with the bare side's own model. Every engine step
         is thus timed next to a bare step under the same load from whatever else the machine
         runs. The ratio is the median over all steps of bare/engine step time, with the
         engine's per-epoch costs (set-up, bar, final sync) added on top. This holds steady
         on a busy shared CPU where whole-epoch timings swing severalfold. CPU only: it
         would need a sync per step on CUDA.

The last line is `ratio: X.XXX` (engine / bare throughput; the target is >= 0.95). This is
a measurement, not a test: it exits 0 whether or not the target is met.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `common`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common.engine import StepConfig, TrainState, train_one_epoch  # noqa: E402
from common.models.small import SmallCNN  # noqa: E402
from common.optim import Schedule  # noqa: E402
from common.precision import make_precision  # noqa: E402
from common.tasks import ClassificationTask  # noqa: E402

TARGET = 0.95
NUM_CLASSES = 10
Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40, help="batches per epoch (default 40)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--interleave", choices=("auto", "step", "epoch"), default="auto",
                   help="time the two sides step by step (CPU) or epoch by epoch; "
                        "auto: step on CPU, epoch on CUDA")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--batches, --batch-size and --rounds must be >= 1, --warmup >= 0")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but CUDA is not available")
    return torch.device(name)


def make_batches(n: int, batch_size: int, seed: int, device: torch.device) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, 32, 32, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
        batches.append((x.to(device), y.to(device)))
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One side's model and optimizer, fresh from the shared initial weights."""

    def __init__(self, base: nn.Module):
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)


def bare_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bare_epoch(side: Side, batches: list[Batch]) -> None:
    side.model.train()
    for x, y in batches:
        bare_step(side.model, side.opt, x, y)


def engine_epoch(side: Side, loader: Sequence[Batch] | Lockstep, device: torch.device) -> None:
    """One epoch of common.engine.train_one_epoch, progress bar and postfix on."""
    task = ClassificationTask(NUM_CLASSES)
    schedule = Schedule(side.opt, "none", epochs=1, steps_per_epoch=len(loader))
    precision = make_precision(device, amp=False)
    cfg = StepConfig(log_interval=20, show_progress=True)
    train_one_epoch(side.model, task, loader, side.opt, schedule, precision, device, cfg, TrainState())


class Lockstep:
    """The engine's loader in step mode: takes one timed bare step before each batch it hands
    out, and notes how long the engine took between handing out one batch and asking for the
    next (one whole engine step, its bookkeeping included)."""

    def __init__(self, batches: list[Batch], bare: Side):
        self.batches, self.bare = batches, bare
        self.bare_steps: list[float] = []
        self.engine_steps: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        self.bare.model.train()
        handed_out = None
        for x, y in self.batches:
            now = time.perf_counter()
            if handed_out is not None:
                self.engine_steps.append(now - handed_out)
            bare_step(self.bare.model, self.bare.opt, x, y)
            handed_out = time.perf_counter()
            self.bare_steps.append(handed_out - now)
            yield x, y
        if handed_out is not None:
            self.engine_steps.append(time.perf_counter() - handed_out)


@dataclass
class Rates:
    bare: float     # images/s
    engine: float   # images/s

    @property
    def ratio(self) -> float:
        return self.engine / self.bare


def epoch_rounds(args: argparse.Namespace, base: nn.Module, batches: list[Batch],
                 device: torch.device) -> tuple[list[Rates], Rates]:
    """Whole epochs of each side back to back; returns each round and the summary."""
    images = len(batches) * args.batch_size

    def timed(name: str) -> float:
        side = Side(base)
        gc.collect()
        _sync(device)
        started = time.perf_counter()
        if name == "bare":
            bare_epoch(side, batches)
        else:
            engine_epoch(side, batches, device)
        _sync(device)
        return time.perf_counter() - started

    for _ in range(args.warmup):
        timed("bare")
        timed("engine")
    rounds = []
    for r in range(args.rounds):
        order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
        seconds = {name: timed(name) for name in order}
        rounds.append(Rates(images / seconds["bare"], images / seconds["engine"]))
        _show_round(r, rounds[-1])
    ratio = statistics.median(rates.ratio for rates in rounds)
    bare = statistics.median(rates.bare for rates in rounds)
    return rounds, Rates(bare, bare * ratio)


def step_rounds(args: argparse.Namespace, base: nn.Module, batches: list[Batch],
                device: torch.device) -> tuple[list[Rates], Rates]:
    """Engine epochs with a bare step timed before each of theirs; returns each round and the
    summary built from the median paired step ratio."""
    n, images = len(batches), len(batches) * args.batch_size
    pairs: list[float] = []       # bare step / engine step, for the same batch
    bare_steps: list[float] = []
    outside: list[float] = []     # per epoch: the engine's time outside its steps
    rounds = []
    for r in range(-args.warmup, args.rounds):
        loader = Lockstep(batches, Side(base))
        engine = Side(base)
        gc.collect()
        started = time.perf_counter()
        engine_epoch(engine, loader, device)
        seconds = time.perf_counter() - started
        if r < 0:
            continue
        extra = seconds - sum(loader.bare_steps) - sum(loader.engine_steps)
        pairs += [b / e for b, e in zip(loader.bare_steps, loader.engine_steps, strict=True)]
        bare_steps += loader.bare_steps
        outside.append(extra)
        rounds.append(Rates(images / sum(loader.bare_steps),
                            images / (sum(loader.engine_steps) + extra)))
        _show_round(r, rounds[-1])
    bare_epoch_s = n * statistics.median(bare_steps)
    engine_epoch_s = bare_epoch_s / statistics.median(pairs) + statistics.median(outside)
    print(f"engine per-epoch costs outside its steps: {1e3 * statistics.median(outside):.2f} ms "
          f"(median); median bare step {1e3 * statistics.median(bare_steps):.2f} ms; "
          f"median bare/engine step time {statistics.median(pairs):.4f}")
    return rounds, Rates(images / bare_epoch_s, images / engine_epoch_s)


def _show_round(r: int, rates: Rates) -> None:
    print(f"round {r + 1}: bare {rates.bare:9.1f} img/s   engine {rates.engine:9.1f} img/s   "
          f"engine/bare {rates.ratio:.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    mode = args.interleave if args.interleave != "auto" else ("epoch" if device.type == "cuda" else "step")
    if mode == "step" and device.type == "cuda":
        raise SystemExit("error: --interleave step is for CPU; use --interleave epoch on CUDA")
    torch.manual_seed(args.seed)
    base = SmallCNN(NUM_CLASSES).to(device)
    batches = make_batches(args.batches, args.batch_size, args.seed, device)

    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"SmallCNN, {args.batches} batches of {args.batch_size} (3x32x32), AdamW lr 1e-3; "
          f"interleaved by {mode}; {args.warmup} warm-up + {args.rounds} timed rounds", flush=True)
    run = step_rounds if mode == "step" else epoch_rounds
    rounds, summary = run(args, base, batches, device)

    print()
    print(f"{'img/s':10}{'bare':>10}{'engine':>10}{'ratio':>8}")
    print(f"{'median':10}{statistics.median(x.bare for x in rounds):10.1f}"
          f"{statistics.median(x.engine for x in rounds):10.1f}"
          f"{statistics.median(x.engine for x in rounds) / statistics.median(x.bare for x in rounds):8.3f}")
    print(f"{'best':10}{max(x.bare for x in rounds):10.1f}{max(x.engine for x in rounds):10.1f}"
          f"{max(x.engine for x in rounds) / max(x.bare for x in rounds):8.3f}")
    label = "paired" if mode == "step" else "per-round"
    print(f"{label:10}{summary.bare:10.1f}{summary.engine:10.1f}{summary.ratio:8.3f}   <- reported")
    print(f"target: >= {TARGET} ({'met' if summary.ratio >= TARGET else 'NOT met'})")
    print(f"ratio: {summary.ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
