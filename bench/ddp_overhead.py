"""DDP with 2 processes on gloo against 1 process doing the same global work, in one run.

    python bench/ddp_overhead.py                          # batch 32 per process, 30 steps, 3 epochs
    python bench/ddp_overhead.py --batch-size 64 --steps 50 --epochs 5

Both sides train the same SmallCNN (10 classes, 3x32x32 random images and labels held in memory,
fixed seed, the same initial weights, AdamW lr 1e-3) with common.engine.train_one_epoch, and
take the same number of optimizer steps on the same images per epoch:

  1 process:    batch 2B per step, in this process, with 2 x --threads intra-op threads
  2 processes:  batch B per process per step (ShardSampler shards), DDP on gloo, --threads
                intra-op threads each (OMP_NUM_THREADS), started once as
                python -m torch.distributed.run --standalone --nproc-per-node=2 \
                    bench/ddp_overhead.py --worker --workdir DIR ...

Fairness: both sides get the same number of CPU threads in total (by default 1 process x 2
threads against 2 processes x 1 thread: both sides use the 2 cores of a small machine). With
the same hardware on both sides, the ratio shows what DDP costs (the gradient all-reduce and a
second Python process), not a speed-up: DDP pays off when every process gets a device of its
own, e.g. one GPU each, where the expected speed-up on N GPUs is close to N.

Timing: after one untimed warm-up epoch per side, each round times one epoch of each side back
to back, the order alternating, so both see the same load from whatever else the machine runs.
The workers stay up between epochs: rank 0 waits for a go_<k> file from this script, both
ranks train epoch k between two barriers, and rank 0 writes its time to ddp_<k>.json. Process
start-up and set-up are never timed. The ratio is the median over rounds of
(1-process epoch time / DDP epoch time); the last line is `ratio: X.XXX` (DDP / 1-process
throughput). This is a measurement, not a test: it exits 0 whatever the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `common`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from common.data.loaders import make_loader  # noqa: E402
from common.distributed import (  # noqa: E402
    barrier,
    context_from_env,
    destroy_process_group,
    init_process_group,
    wrap_ddp,
)
from common.engine import StepConfig, TrainState, train_one_epoch  # noqa: E402
from common.models.small import SmallCNN  # noqa: E402
from common.optim import Schedule  # noqa: E402
from common.precision import make_precision  # noqa: E402
from common.tasks import ClassificationTask  # noqa: E402

NUM_CLASSES = 10
WORLD = 2
CPU = torch.device("cpu")
POLL_S = 0.01  # how often a waiting side looks for the other's file (never inside a timing)
WAIT_S = 600.0  # the longest one side waits for the other (one epoch, or start-up)


def note(cores: int) -> str:
    return (f"note: both sides share the same {cores} CPU core(s) with the same total threads, so on "
            f"this {cores}-core CPU machine the ratio shows the cost of gradient communication (and "
            "of a second Python process), not a speed-up. DDP speeds training up when each process "
            "has a device of its own: on N GPUs the expected speed-up is close to N.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per process per step; the 1-process side uses twice this (default 32)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch (default 30)")
    p.add_argument("--epochs", type=int, default=3,
                   help="timed epochs, after one untimed warm-up epoch (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per DDP process; the 1-process side gets twice as many "
                        "(default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # under torchrun
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # the worker's command and result files
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.epochs, args.threads) < 1:
        p.error("--batch-size, --steps, --epochs and --threads must be >= 1")
    if args.worker and not args.workdir:
        p.error("--worker needs --workdir DIR")
    return args


def make_dataset(args: argparse.Namespace) -> TensorDataset:
    """steps x 2B images: one epoch is `steps` steps on both sides."""
    n = args.steps * args.batch_size * WORLD
    gen = torch.Generator().manual_seed(args.seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen),
                         torch.randint(0, NUM_CLASSES, (n,), generator=gen))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(NUM_CLASSES)


class Side:
    """One side's model, optimizer and share of the data. epoch(k) trains epoch k and returns its
    seconds; under DDP it starts and ends at a barrier, so rank 0's time is the job's."""

    def __init__(self, args: argparse.Namespace, batch: int, rank: int = 0, world: int = 1):
        self.plain = make_model(args.seed)
        self.model = wrap_ddp(self.plain, CPU) if world > 1 else self.plain
        self.loader = make_loader(make_dataset(args), batch, train=True, num_workers=0, pin_memory=False,
                                  seed=args.seed, rank=rank, world_size=world)
        if len(self.loader) != args.steps:
            raise RuntimeError(f"{len(self.loader)} batches per epoch, expected {args.steps}")
        self.opt = torch.optim.AdamW(self.plain.parameters(), lr=1e-3)
        self.schedule = Schedule(self.opt, "none", epochs=args.epochs + 1, steps_per_epoch=args.steps)
        self.precision = make_precision(CPU, amp=False)
        self.cfg, self.task = StepConfig(show_progress=False), ClassificationTask(NUM_CLASSES)
        self.state = TrainState()

    def epoch(self, k: int) -> float:
        self.loader.sampler.set_epoch(k)
        barrier()
        started = time.perf_counter()
        train_one_epoch(self.model, self.task, self.loader, self.opt, self.schedule, self.precision,
                        CPU, self.cfg, self.state)
        barrier()
        return time.perf_counter() - started


def wait_for(paths: Sequence[Path], timeout: float, proc: subprocess.Popen | None = None) -> Path | None:
    """The first of `paths` to exist; None if `proc` ended first. Polls every POLL_S seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for path in paths:
            if path.exists():
                return path
        if proc is not None and proc.poll() is not None:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing from {', '.join(p.name for p in paths)} in {timeout:.0f} s")
        time.sleep(POLL_S)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)  # the reader never sees half a file


def worker(args: argparse.Namespace) -> int:
    """The DDP side: one of the processes torchrun started. Rank 0 waits for the parent's
    go_<k> file, both ranks train epoch k, and rank 0 writes ddp_<k>.json; `stop` ends it."""
    torch.set_num_threads(args.threads)
    ctx = context_from_env()
    if ctx.world_size != WORLD:
        raise SystemExit(f"error: --worker expects {WORLD} processes under torchrun, got {ctx.world_size}")
    workdir = Path(args.workdir)
    init_process_group(ctx, CPU, timeout_s=WAIT_S)
    try:
        side = Side(args, args.batch_size, rank=ctx.rank, world=ctx.world_size)
        for k in range(args.epochs + 1):
            command = torch.zeros(1, dtype=torch.int64)
            if ctx.is_main:
                got = wait_for([workdir / f"go_{k}", workdir / "stop"], WAIT_S)
                command[0] = k if got.name == f"go_{k}" else -1
            dist.broadcast(command, src=0)
            if command[0] < 0:
                break
            seconds = side.epoch(k)
            if ctx.is_main:
                write_json(workdir / f"ddp_{k}.json", {
                    "seconds": seconds, "backend": dist.get_backend(),
                    "threads_per_process": torch.get_num_threads()})
    finally:
        destroy_process_group()
    return 0


class Workers:
    """The 2 DDP processes under torchrun, kept alive between epochs so that their epochs can
    alternate with the 1-process side's (both then see the same load from the rest of the machine)."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={WORLD}", str(Path(__file__).resolve()), "--worker",
                   "--workdir", str(workdir), "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
        self.workdir, self.log = workdir, open(workdir / "torchrun.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, env=env, cwd=root, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def epoch(self, k: int) -> dict:
        (self.workdir / f"go_{k}").touch()
        result = wait_for([self.workdir / f"ddp_{k}.json"], WAIT_S, self.proc)
        if result is None:
            raise WorkersFailed(self.output_tail())
        return json.loads(result.read_text(encoding="utf-8"))

    def close(self) -> None:
        (self.workdir / "stop").touch()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # torchrun passes it on to its workers
            self.proc.wait()
        self.log.close()

    def output_tail(self) -> str:
        self.log.flush()
        text = (self.workdir / "torchrun.log").read_text(encoding="utf-8", errors="replace")
        return f"the DDP workers ended (exit code {self.proc.poll()}):\n{text[-4000:]}"


class WorkersFailed(RuntimeError):
    pass


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[float], list[float], dict]:
    """Warm-up epoch of each side, then --epochs rounds of one epoch per side, the order
    alternating; returns the 1-process and DDP epoch seconds and the workers' last report."""
    threads = torch.get_num_threads()
    single = Side(args, args.batch_size * WORLD)
    workers = Workers(args, workdir)
    try:
        torch.set_num_threads(args.threads * WORLD)
        report = workers.epoch(0)  # waits for the workers to start, untimed
        single.epoch(0)
        single_s, ddp_s = [], []
        for k in range(1, args.epochs + 1):
            for name in (("single", "ddp") if k % 2 else ("ddp", "single")):
                if name == "single":
                    single_s.append(single.epoch(k))
                else:
                    report = workers.epoch(k)
                    ddp_s.append(report["seconds"])
            print(f"round {k}: 1 process {single_s[-1]:.2f} s, DDP {ddp_s[-1]:.2f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
        workers.close()
    return single_s, ddp_s, report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    params = sum(p.numel() for p in make_model(args.seed).parameters())
    images = args.steps * args.batch_size * WORLD  # per epoch, both sides
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cores} CPU cores; SmallCNN ({params / 1e6:.2f}M parameters, "
          f"{params * 4 / 1e6:.2f} MB of float32 gradients all-reduced per DDP step)")
    print(f"{args.steps} steps x {images // args.steps} images per epoch; 1 warm-up + "
          f"{args.epochs} timed epochs per side")
    print(f"threads: 1 process x {args.threads * WORLD} threads vs {WORLD} processes x {args.threads} "
          f"thread(s) (the same total, {args.threads * WORLD}, on both sides)", flush=True)
    if args.threads * WORLD > cores:
        print(f"warning: {args.threads * WORLD} threads per side on {cores} cores oversubscribes the CPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * cores:
        print(f"warning: the machine is busy (load average {load:.1f} on {cores} cores); other work "
              "slows the multi-threaded 1-process side most, so the ratio is only meaningful on an "
              "idle machine")

    with tempfile.TemporaryDirectory() as tmp:
        try:
            single, ddp, report = measure(args, Path(tmp))
        except WorkersFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    paired = [s / d for s, d in zip(single, ddp, strict=True)]
    sides = [(f"1 process x {args.threads * WORLD} threads", f"{args.batch_size * WORLD}", single),
             (f"DDP {WORLD} x {report['threads_per_process']} thread(s), {report['backend']}",
              f"{args.batch_size} x {WORLD}", ddp)]
    print()
    print(f"{'side':32}{'batch/step':>11}{'img/s median':>14}{'img/s best':>12}  epoch times (s)")
    for name, batch, seconds in sides:
        print(f"{name:32}{batch:>11}{images / statistics.median(seconds):14.1f}"
              f"{images / min(seconds):12.1f}  {' '.join(f'{s:.2f}' for s in seconds)}")
    print(f"DDP / 1 process, per round: {' '.join(f'{r:.3f}' for r in paired)} "
          "(the ratio is their median)")
    print(note(cores))
    print(f"ratio: {statistics.median(paired):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
