"""GPU benchmarks in one table, each row against a baseline measured in the same run.

    python bench/gpu.py                    # a few minutes on a recent GPU
    python bench/gpu.py --quick            # about a minute: fewer steps, rounds and images
    python bench/gpu.py --parts steps --models resnet50,efficientnet_b0 --batch-size 64

Synthetic data, nothing downloaded. The rows (--parts):

  steps   images/s of gpu_train's training step -- common.engine.train_one_epoch with a fused AdamW,
          the NaN guard and log interval 20, on batches already on the GPU; cudnn.benchmark and TF32
          on, as gpu_train sets them -- for --models at 224 px, 1000 classes: AMP (float16 +
          GradScaler) against float32, and AMP + channels_last against AMP (timm reports +20-47%
          for channels_last on conv nets). A variant that runs out of memory says so in its row.
  engine  bench/overhead.py on CUDA: the engine's epoch against a bare PyTorch loop (SmallCNN,
          32 px, batch 256); target >= 0.95.
  data    bench/data_path.py on CUDA: images/s of the decode-once cache on the GPU (uint8 images,
          batch augmentation on the device) against the better DataLoader (0 and N workers),
          224 px JPEGs without a model, and (not with --quick) a SmallCNN training epoch at 32 px.
  memory  bench/grad_checkpointing.py on CUDA: the U-Net's peak memory of one training step
          (torch.cuda.max_memory_allocated) with gradient checkpointing against without, width 32,
          batch 4, 256 px; target <= 0.6.

Rounds interleave the sides (the order rotates) and each figure is the median over the rounds.
Without a visible CUDA device it prints one line and exits with code 2. It is a measurement, not a
test: it exits 0 whether or not a target is met. The last line is JSON {measure: ratio}.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):  # the repo root for `common`, bench/ for the other benchmarks
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PARTS = ("steps", "engine", "data", "memory")
NO_CUDA = ("error: no CUDA device: bench/gpu.py measures the CUDA paths and needs a visible NVIDIA GPU "
           "(torch.cuda.is_available() is False); on a CPU use bench/overhead.py, bench/data_path.py "
           "or bench/grad_checkpointing.py")
MiB = 2**20


# ------------------------------------------------------------------ the table (pure, tested on CPU)


@dataclass
class Row:
    """One measurement and its baseline; ratio = value / baseline unless given (a median of per-round
    ratios, say). target: '>= X' or '<= X' on the ratio. note: why a value is missing."""
    measure: str
    value: float | None
    unit: str
    baseline_name: str
    baseline: float | None
    ratio: float | None = None
    target: str | None = None
    note: str = ""

    def the_ratio(self) -> float | None:
        if self.ratio is not None:
            return self.ratio
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def verdict(self) -> str:
        ratio = self.the_ratio()
        if self.target is None:
            return ""
        if ratio is None:
            return f"{self.target}: not measured"
        op, limit = self.target.split()
        met = ratio >= float(limit) if op == ">=" else ratio <= float(limit)
        return f"{self.target}: {'met' if met else 'NOT met'}"


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.1f} {unit}"


def format_table(rows: Sequence[Row]) -> list[str]:
    """The table's lines: measure | result | baseline (named, with its value) | ratio | target."""
    header = ("measure", "result", "baseline", "ratio", "target")
    cells = []
    for row in rows:
        ratio = row.the_ratio()
        result = _amount(row.value, row.unit) + (f" ({row.note})" if row.note else "")
        cells.append((row.measure, result, f"{row.baseline_name}: {_amount(row.baseline, row.unit)}",
                      "n/a" if ratio is None else f"{ratio:.2f}x", row.verdict()))
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return lines


def ratios_json(rows: Sequence[Row]) -> str:
    return json.dumps({row.measure: None if row.the_ratio() is None else round(row.the_ratio(), 4)
                       for row in rows})


# ------------------------------------------------------------------ arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, rounds and images (about a minute)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"rows to measure (default {','.join(PARTS)})")
    p.add_argument("--models", default="resnet50,efficientnet_b0",
                   help="models of the steps rows (default resnet50,efficientnet_b0)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the steps rows (default 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per timed epoch (default 20; quick 6)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; quick 2)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        p.error(f"--parts takes a comma-separated choice of {', '.join(PARTS)}, got {unknown or 'none'}")
    args.models = [x.strip() for x in args.models.split(",") if x.strip()]
    args.steps = args.steps or (6 if args.quick else 20)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if min(args.batch_size, args.steps, args.rounds) < 1:
        p.error("--batch-size, --steps and --rounds must be >= 1")
    return args


# ------------------------------------------------------------------ steps: gpu_train's training step


VARIANTS = {"float32": (False, False), "AMP": (True, False), "AMP + channels_last": (True, True)}


class Side:
    """One variant's copy of the model and its optimizer, precision and step settings, as gpu_train's
    run_job builds them on CUDA."""

    def __init__(self, base, amp: bool, channels_last: bool, device):
        import torch

        from common.nanguard import NonFiniteGuard
        from common.optim import build_optimizer
        from common.precision import make_precision

        self.model = copy.deepcopy(base)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model.parameters(), "adamw", 1e-3, 0.01, fused=True)
        self.precision = make_precision(device, amp=amp, log=lambda _: None)
        self.guard = NonFiniteGuard(device, "stop", log=lambda _: None)
        self.channels_last, self.device = channels_last, device

    def epoch(self, batches) -> float:
        """Images/s of one epoch over `batches`."""
        import torch

        from common.engine import StepConfig, TrainState, train_one_epoch
        from common.optim import Schedule
        from common.tasks import ClassificationTask

        schedule = Schedule(self.opt, "none", epochs=1, steps_per_epoch=len(batches))
        cfg = StepConfig(channels_last=self.channels_last, log_interval=20, show_progress=False,
                         guard=self.guard)
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        train_one_epoch(self.model, ClassificationTask(1000), batches, self.opt, schedule, self.precision,
                        self.device, cfg, TrainState())
        torch.cuda.synchronize(self.device)
        return sum(int(y.shape[0]) for _, y in batches) / (time.perf_counter() - started)


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def step_rates(name: str, args, device) -> tuple[dict[str, float], dict[str, str]]:
    """Median images/s per variant, and a note per variant that could not run."""
    import torch

    from common.models import build_model

    torch.manual_seed(0)
    base, _ = build_model(name, 1000, img_size=224)
    base.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    distinct = [(torch.randn(args.batch_size, 3, 224, 224, device=device, generator=gen),
                 torch.randint(0, 1000, (args.batch_size,), device=device, generator=gen)) for _ in range(4)]
    batches = [distinct[i % len(distinct)] for i in range(args.steps)]
    sides, notes, rates = {}, {}, {}
    for variant, (amp, channels_last) in VARIANTS.items():
        try:
            side = Side(base, amp, channels_last, device)
            side.epoch(batches)  # warm-up: cudnn.benchmark picks its algorithms, lazy state is made
            sides[variant], rates[variant] = side, []
        except torch.OutOfMemoryError:
            notes[variant] = f"out of memory at batch {args.batch_size}; try a smaller --batch-size"
        if variant in notes:  # outside the except: its traceback no longer holds the step's tensors
            side = None  # noqa: F841 - the failed variant's memory goes before the next one
            _free()
        print(f"  {name} {variant}: warmed up" + (f" ({notes[variant]})" if variant in notes else ""),
              flush=True)
    names = list(sides)
    for r in range(args.rounds if names else 0):
        for variant in names[r % len(names):] + names[:r % len(names)]:  # the order rotates
            rates[variant].append(sides[variant].epoch(batches))
        print(f"  {name} round {r + 1}: " + "  ".join(f"{v} {rates[v][-1]:.1f}" for v in names) + " img/s",
              flush=True)
    return {v: statistics.median(x) for v, x in rates.items()}, notes


def step_rows(args, device) -> list[Row]:
    rows = []
    for name in args.models:
        rates, notes = step_rates(name, args, device)
        _free()  # the variants' models and batches went with step_rates' frame
        rows.append(Row(f"{name} 224 px, AMP float16", rates.get("AMP"), "img/s", "float32 (TF32)",
                        rates.get("float32"), note=notes.get("AMP", notes.get("float32", ""))))
        rows.append(Row(f"{name} 224 px, AMP + channels_last", rates.get("AMP + channels_last"), "img/s",
                        "AMP", rates.get("AMP"), note=notes.get("AMP + channels_last", "")))
    return rows


# ------------------------------------------------------------------ the other benchmarks on CUDA


def engine_rows(args, device) -> list[Row]:
    import overhead
    import torch

    ns = argparse.Namespace(batches=10 if args.quick else 40, batch_size=256, rounds=args.rounds,
                            warmup=1, seed=0)
    torch.manual_seed(0)
    base = overhead.SmallCNN(overhead.NUM_CLASSES).to(device)
    batches = overhead.make_batches(ns.batches, ns.batch_size, ns.seed, device)
    _, summary = overhead.epoch_rounds(ns, base, batches, device)
    del base, batches
    _free()
    return [Row("engine epoch vs bare loop, SmallCNN 32 px, batch 256", summary.engine, "img/s", "bare loop",
                summary.bare, ratio=summary.ratio, target=f">= {overhead.TARGET}")]


def data_rows(args, device) -> list[Row]:
    import data_path

    from common.device import default_num_workers

    workers = f"0,{max(1, default_num_workers(device))}"
    parts = "data224" if args.quick else "data224,epoch"
    ns = data_path.parse_args(["--device", "cuda", "--parts", parts, "--workers", workers,
                               "--images-224", "100" if args.quick else "300", "--images-32", "2000",
                               "--epoch-images", "2000", "--rounds", str(args.rounds), "--warmup", "1"])
    with tempfile.TemporaryDirectory() as folder:
        measured, _ = data_path.measure(ns, device, Path(folder))
    titles = {"data224": "data path 224 px (no model): cache on the GPU",
              "epoch": "training epoch SmallCNN 32 px: cache on the GPU"}
    rows = []
    for part in measured:
        if part.name not in titles:
            continue  # data32 is measured for the epoch part's data only
        median = {n: statistics.median(r[n] for r in part.rounds) for n in part.names}
        best = max(part.loader_names, key=lambda n: median[n])
        rows.append(Row(titles[part.name], median[data_path.CACHE], "img/s",
                        f"DataLoader {best} (better of {workers} workers)", median[best],
                        ratio=data_path.part_ratio(part)))
    _free()
    return rows


def memory_rows(args, device) -> list[Row]:
    import grad_checkpointing

    ns = grad_checkpointing.parse_args(["--size", "256", "--batch-size", "4", "--width", "32",
                                        "--device", "cuda"])
    plain = grad_checkpointing.peak_bytes_cuda(ns, False)
    _free()
    with_ckpt = grad_checkpointing.peak_bytes_cuda(ns, True)
    _free()
    return [Row("U-Net 256 px peak memory, width 32, batch 4: checkpointing", with_ckpt / MiB, "MiB",
                "without checkpointing", plain / MiB, target="<= 0.6")]


MEASURES = {"steps": step_rows, "engine": engine_rows, "data": data_rows, "memory": memory_rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from common.device import configure_backends, describe

    device = torch.device("cuda", torch.cuda.current_device())
    configure_backends(device, deterministic=False)  # cudnn.benchmark, TF32: as gpu_train
    print(f"{describe(device)}; torch {torch.__version__}")
    print(f"{'quick' if args.quick else 'full'} run: parts {', '.join(args.parts)}; {args.rounds} timed "
          f"rounds; steps rows: batch {args.batch_size}, {args.steps} steps per epoch", flush=True)
    rows: list[Row] = []
    for part in args.parts:
        print(f"{part}:", flush=True)
        started = time.perf_counter()
        rows += MEASURES[part](args, device)
        print(f"{part}: {time.perf_counter() - started:.1f} s", flush=True)
    print()
    print(describe(device))
    for line in format_table(rows):
        print(line)
    print("ratio: result / baseline (the data rows: median of the per-round ratios); img/s: higher is "
          "better, MiB: lower is better")
    print(ratios_json(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
