"""Images per second of the DataLoader path against the decode-once cache path, measured in one run.

    python bench/data_path.py                        # 1-2 minutes on 2 cores; several times that when busy
    python bench/data_path.py --images-32 10000 --images-224 1000 --epoch-images 5000 --rounds 5
    python bench/data_path.py --device cuda --batch-size 256   # the cache path on a GPU
    OMP_WAIT_POLICY=PASSIVE python bench/data_path.py          # see "threads" below
    python bench/data_path.py --parts data32,threads           # a choice of the parts

Generated data in a temporary folder (10 classes): --images-32 PNGs of 40x40 pixels for 32 px,
--images-224 JPEG "photos" of 256x256 for 224 px. Two ways to feed a model, as gpu_train.py
builds them (preprocessing(S): resize size round(S / 0.875), ImageNet mean and std):

  loader-Nw  --data-cache off: ImageDataset + train_transform(kind="standard") + make_loader with N
             workers (--workers, default 0 and 2; workers persist across epochs as in gpu_train).
             The baseline of each round is the BETTER of the worker counts.
  cache      --data-cache ram (device with --device cuda): build_image_cache decodes every file once
             into one uint8 tensor at the resize size (timed on its own, before the rounds), then
             CachedBatches with BatchAugment(kind="standard") makes the batches.
  cache-1t   the cache path with the whole of each next() (the epoch's parameter draw included) at
             torch.set_num_threads(1), the count restored for the consumer. CachedBatches makes its
             batches on one CPU thread itself, so this should match cache within the noise; a gap
             says the thread count matters again. Information only; not in the ratios.

Parts (--parts):
  data32, data224  iterate one epoch of batches, no model: images/s.
  epoch            one training epoch of SmallCNN (10 classes, 32 px, a fresh copy of the same initial
                   weights, AdamW lr 1e-3) through common.engine.train_one_epoch, fed by each side,
                   on --epoch-images images of the 32 px set.
  threads          (CPU) ms per batch of BatchAugment alone at 32 and 224 px, and of a SmallCNN
                   training step, at 1 thread and at torch's default count, alternating: on a busy
                   machine with few cores, OpenMP's threads spin and wait for each other at every
                   parallel op, and the second thread can cost more than it gives (several times
                   for the augmentation's many small kernels). OMP_WAIT_POLICY=PASSIVE in the
                   environment is the cure to compare.

Timing: one untimed warm-up epoch per side (it starts the workers), then each round times one epoch
of every side back to back, the order rotating from round to round so that all sides see the same
load. A part's ratio is the median over rounds of cache / best loader throughput within the round.

Targets (the issue): data only >= 10x, a training epoch >= 1.5x, on 2 CPU cores. The last line is
JSON {"data_ratio_32": .., "data_ratio_224": .., "epoch_ratio": ..} (cache / loader throughput).
This is a measurement, not a test: it exits 0 whether or not the targets are met.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `common`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.data.batch_aug import BatchAugment  # noqa: E402
from common.data.cache import ImageCache, build_image_cache, place  # noqa: E402
from common.data.device_batches import CachedBatches  # noqa: E402
from common.data.images import ImageDataset, preprocessing, scan_class_folders, train_transform  # noqa: E402
from common.data.loaders import make_loader  # noqa: E402
from common.device import default_num_workers  # noqa: E402
from common.engine import StepConfig, TrainState, train_one_epoch  # noqa: E402
from common.models.small import SmallCNN  # noqa: E402
from common.optim import Schedule  # noqa: E402
from common.precision import make_precision  # noqa: E402
from common.tasks import ClassificationTask  # noqa: E402

DATA_TARGET = 10.0
EPOCH_TARGET = 1.5
NUM_CLASSES = 10
CACHE, CACHE_1T = "cache", "cache-1t"
PARTS = ("data32", "data224", "epoch", "threads")
JSON_KEYS = {"data_ratio_32": "data32", "data_ratio_224": "data224", "epoch_ratio": "epoch"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images-32", type=int, default=2000, help="PNGs for the 32 px part (default 2000)")
    p.add_argument("--storage-32", type=int, default=40, help="their side in pixels (default 40)")
    p.add_argument("--images-224", type=int, default=300, help="JPEGs for the 224 px part (default 300)")
    p.add_argument("--storage-224", type=int, default=256, help="their side in pixels (default 256)")
    p.add_argument("--epoch-images", type=int, default=640,
                   help="images of the 32 px set in the training epoch (default 640)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to try (default 0,2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per part (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per side first (default 1)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"parts to measure (default {','.join(PARTS)}); a part left out prints null")
    p.add_argument("--probe-reps", type=int, default=5,
                   help="interleaved repetitions of each case of the threads part (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the cache path puts the data and the epoch part trains (default cpu)")
    p.add_argument("--workdir", default=None, help="folder for the generated data (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.worker_counts = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        p.error(f"--workers takes comma-separated integers, got {args.workers!r}")
    if (min(args.images_32, args.images_224, args.epoch_images, args.batch_size, args.rounds,
            args.probe_reps) < 1
            or args.warmup < 0 or not args.worker_counts or min(args.worker_counts) < 0):
        p.error("image counts, --batch-size, --rounds and --probe-reps must be >= 1; --warmup and "
                "--workers >= 0")
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        p.error(f"--parts takes a comma-separated choice of {', '.join(PARTS)}, got {unknown or 'none'}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but CUDA is not available")
    return args


# ------------------------------------------------------------------ data


def make_images(root: Path, n: int, size: int, ext: str, seed: int) -> list[tuple[str, int]]:
    """root/class_<k>/<i>.<ext>: n random-ish pictures (a smooth colour field, noise and a bright
    square), labels i % 10; returns the (path, label) samples as gpu_train scans them."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % NUM_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        backdrop = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        backdrop = backdrop.resize((size, size), Image.BILINEAR)
        arr = np.asarray(backdrop, dtype=np.int16) + rng.integers(-24, 25, (size, size, 3), dtype=np.int16)
        side = max(2, size // 5)
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        arr[y:y + side, x:x + side] = rng.integers(180, 256, 3)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:05d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return scan_class_folders(root)[1]


class FewThreads:
    """`batches` made with torch at `threads` intra-op threads; the consumer (the training step)
    runs at the count it had."""

    def __init__(self, batches: Any, threads: int):
        self.batches, self.threads = batches, threads
        self.sampler = batches.sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.batches)
        while True:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                torch.set_num_threads(before)
            yield batch


@dataclass
class Part:
    """One measured part: its sides (name -> an iterable of batches with .sampler) and results."""
    name: str
    title: str
    sides: dict[str, Any]
    images: int
    rounds: list[dict[str, float]] = field(default_factory=list)  # side -> images/s
    names: list[str] = field(init=False)
    loader_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = list(self.sides)
        self.loader_names = [name for name in self.names if name.startswith("loader")]


def ratio_of_round(rates: dict[str, float], loaders: Sequence[str], side: str = CACHE) -> float:
    """cache (or `side`) throughput over the best loader's in one round."""
    return rates[side] / max(rates[name] for name in loaders)


def part_ratio(part: Part, side: str = CACHE) -> float:
    return statistics.median(ratio_of_round(r, part.loader_names, side) for r in part.rounds)


def sources(samples: Sequence[tuple[str, int]], cache: ImageCache, out_size: int, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """The sides' batch iterables over the same images: loaders first, then the cache path."""
    pre = preprocessing(out_size)
    dataset = ImageDataset(samples, train_transform(pre, kind="standard"))
    sides: dict[str, Any] = {}
    for workers in args.worker_counts:
        sides[f"loader-{workers}w"] = make_loader(dataset, args.batch_size, train=True, num_workers=workers,
                                                  pin_memory=device.type == "cuda", seed=args.seed)
    augment = BatchAugment(out_size, pre["mean"], pre["std"], kind="standard", hflip=True, rotation=15.0)
    batches = CachedBatches(cache.images, cache.labels, args.batch_size, augment=augment, train=True,
                            device=device, seed=args.seed)
    sides[CACHE] = batches
    sides[CACHE_1T] = FewThreads(batches, 1)
    return sides


def build_cache(samples: Sequence[tuple[str, int]], out_size: int, folder: Path,
                device: torch.device) -> tuple[ImageCache, float, float]:
    """The cache as gpu_train builds it (decode + write the file), its build time and the time to
    read it back from the file (a later run's start)."""
    resize = preprocessing(out_size)["resize_size"]
    options = {"cache_dir": folder / "cache", "data_root": folder, "skip_bad": False,
               "show_progress": False, "log": lambda _line: None}
    started = time.perf_counter()
    cache = build_image_cache(samples, resize, **options)
    built = time.perf_counter() - started
    started = time.perf_counter()
    build_image_cache(samples, resize, **options)
    reread = time.perf_counter() - started
    placement = "device" if device.type == "cuda" else "ram"
    return place(cache, placement, device, pin=False), built, reread


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ timing


def data_epoch(batches: Iterable, device: torch.device) -> int:
    """Iterate one epoch; the number of images it gave."""
    n = 0
    for x, _ in batches:
        n += x.shape[0]
    _sync(device)
    return n


def train_epoch(batches: Any, base: torch.nn.Module, device: torch.device) -> int:
    """One epoch of train_one_epoch from the shared initial weights; the number of images."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=len(batches))
    cfg = StepConfig(log_interval=20, show_progress=False)
    train_one_epoch(model, ClassificationTask(NUM_CLASSES), batches, opt, schedule,
                    make_precision(device, amp=False), device, cfg, TrainState())
    _sync(device)
    return len(batches.sampler)


def run_part(part: Part, args: argparse.Namespace, device: torch.device,
             base: torch.nn.Module | None) -> None:
    names = part.names

    def timed(name: str, epoch: int) -> float:
        batches = part.sides[name]
        batches.sampler.set_epoch(epoch)
        gc.collect()
        started = time.perf_counter()
        n = data_epoch(batches, device) if base is None else train_epoch(batches, base, device)
        return n / (time.perf_counter() - started)

    for w in range(args.warmup):
        for name in names:
            timed(name, 10_000 + w)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rates = {name: timed(name, r) for name in order}
        part.rounds.append({name: rates[name] for name in names})
        print(f"  {part.name} round {r + 1}: " + "  ".join(f"{k} {v:.1f}" for k, v in part.rounds[-1].items())
              + " img/s", flush=True)


@contextlib.contextmanager
def closing_loaders(sides: dict[str, Any]) -> Iterator[None]:
    """Shut the persistent workers down when a part is done."""
    try:
        yield
    finally:
        for batches in sides.values():
            iterator = getattr(batches, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        gc.collect()


# ------------------------------------------------------------------ output


def print_table(parts: Sequence[Part]) -> None:
    """One row per round and a median row per part; ratio = cache / best loader of the row (the
    median row: the median of the round ratios)."""
    for part in parts:
        names = part.names
        print()
        print(part.title)
        print(f"{'part':10}{'round':>7}" + "".join(f"{n:>12}" for n in names) + f"{'ratio':>9}")
        for r, rates in enumerate(part.rounds):
            print(f"{part.name:10}{r + 1:>7}" + "".join(f"{rates[n]:12.1f}" for n in names)
                  + f"{ratio_of_round(rates, part.loader_names):9.3f}")
        medians = {n: statistics.median(rates[n] for rates in part.rounds) for n in names}
        print(f"{part.name:10}{'median':>7}" + "".join(f"{medians[n]:12.1f}" for n in names)
              + f"{part_ratio(part):9.3f}   <- reported")


def thread_probe(args: argparse.Namespace, device: torch.device,
                 threads: int) -> list[tuple[str, float, float]]:
    """(case, ms per batch at 1 thread, ms at `threads`): BatchAugment alone (what CachedBatches
    runs per batch) at 32 and 224 px, and a SmallCNN training step at 32 px; the median over
    --probe-reps repetitions, the two thread counts alternating. CPU with 2 or more threads only."""
    if device.type != "cpu" or threads < 2:
        return []
    gen = torch.Generator().manual_seed(args.seed)
    cases = []
    for size in (32, 224):
        pre = preprocessing(size)
        source = torch.randint(0, 256, (args.batch_size, 3, pre["resize_size"], pre["resize_size"]),
                               dtype=torch.uint8, generator=gen)
        augment = BatchAugment(size, pre["mean"], pre["std"], kind="standard")
        params = augment.sample(args.batch_size, gen, device)
        cases.append((f"BatchAugment {size} px", lambda a=augment, x=source, p=params: a.apply(x, p)))
    torch.manual_seed(args.seed)
    model = SmallCNN(NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    cases.append(("SmallCNN step 32 px", step))
    results = []
    for name, fn in cases:
        times: dict[int, list[float]] = {1: [], threads: []}
        for rep in range(args.probe_reps + 1):  # the first repetition warms up
            for count in ((1, threads) if rep % 2 == 0 else (threads, 1)):
                torch.set_num_threads(count)
                started = time.perf_counter()
                fn()
                if rep:
                    times[count].append(time.perf_counter() - started)
        torch.set_num_threads(threads)
        results.append((name, 1e3 * statistics.median(times[1]), 1e3 * statistics.median(times[threads])))
    return results


def print_probe(probe: Sequence[tuple[str, float, float]], args: argparse.Namespace, threads: int) -> None:
    if not probe:
        return
    print()
    print(f"threads: ms per batch of {args.batch_size}, median of {args.probe_reps} (1 thread and {threads} "
          "alternating); above 1 in the last column: the extra threads cost time")
    print(f"{'case':22}{'1 thread':>10}{f'{threads} threads':>11}{'ratio':>8}")
    for name, one, many in probe:
        print(f"{name:22}{one:10.2f}{many:11.2f}{many / one:8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device: {device}; torch {torch.__version__}, {threads} intra-op threads, "
          f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"batch {args.batch_size}; workers {args.workers} (gpu_train's default here: "
          f"{default_num_workers(device)}); {args.warmup} warm-up + {args.rounds} timed rounds per part; "
          "img/s, higher is better", flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            parts, builds = measure(args, device, root)
            probe = thread_probe(args, device, threads) if "threads" in args.parts else []
        finally:
            torch.set_num_threads(threads)

    print_table(parts)
    print_probe(probe, args, threads)
    print()
    for size, (built, reread, n) in builds.items():
        print(f"cache build {size} px: {n} images decoded and written in {built:.2f} s, read back from "
              f"the file in {reread:.2f} s (not in the rounds)")
    by_name = {p.name: p for p in parts}
    ratios = {key: part_ratio(by_name[name]) if name in by_name else None for key, name in JSON_KEYS.items()}
    print("ratio = cache / the better of the loaders (" + ", ".join(parts[0].loader_names)
          + ") within each round; median over rounds")
    for part in parts:
        print(f"  {part.name}: {part_ratio(part):.3f}; with 1 thread for the batches (cache-1t): "
              f"{part_ratio(part, CACHE_1T):.3f}")
    for key, value in ratios.items():
        target = EPOCH_TARGET if key == "epoch_ratio" else DATA_TARGET
        verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
        print(f"target {key} >= {target:g} on 2 cores: {verdict}")
    print(json.dumps({k: None if v is None else round(v, 4) for k, v in ratios.items()}))
    return 0


def data_part(size: int, samples: Sequence[tuple[str, int]], storage: int, cache: ImageCache,
              args: argparse.Namespace, device: torch.device) -> Part:
    resize = preprocessing(size)["resize_size"]
    kind = "PNG" if size == 32 else "JPEG"
    title = (f"data only, {size} px: {len(samples)} {kind}s {storage}x{storage} -> cache uint8 "
             f"{resize}x{resize} -> standard augmentation -> {size}x{size}, images/s")
    return Part(f"data{size}", title, sources(samples, cache, size, args, device), len(samples))


def epoch_part(samples: Sequence[tuple[str, int]], cache: ImageCache, args: argparse.Namespace,
               device: torch.device) -> Part:
    n = min(args.epoch_images, len(samples))
    pick = np.linspace(0, len(samples) - 1, n).round().astype(int)  # spread over the classes
    index = torch.as_tensor(pick, device=cache.images.device)
    subset = ImageCache(cache.images[index], cache.labels[index], None, None, False, [])
    title = f"training epoch, SmallCNN at 32 px, {n} images (train_one_epoch, AdamW lr 1e-3), images/s"
    return Part("epoch", title, sources([samples[i] for i in pick], subset, 32, args, device), n)


def measure(args: argparse.Namespace, device: torch.device, root: Path
            ) -> tuple[list[Part], dict[int, tuple[float, float, int]]]:
    wanted = set(args.parts) | ({"data32"} if "epoch" in args.parts else set())  # the epoch's data: 32 px
    sizes = [size for size in (32, 224) if f"data{size}" in wanted]
    count = {32: args.images_32, 224: args.images_224}
    storage = {32: args.storage_32, 224: args.storage_224}
    samples: dict[int, list[tuple[str, int]]] = {}
    caches: dict[int, ImageCache] = {}
    builds: dict[int, tuple[float, float, int]] = {}
    for size in sizes:
        ext = "png" if size == 32 else "jpg"
        print(f"{size} px: generating {count[size]} {ext.upper()}s of {storage[size]}x{storage[size]} "
              f"in {root}, building the cache", flush=True)
        samples[size] = make_images(root / f"{ext}{size}", count[size], storage[size], ext, args.seed + size)
        caches[size], built, reread = build_cache(samples[size], size, root / f"build{size}", device)
        builds[size] = (built, reread, len(caches[size]))
    parts: list[Part] = []
    torch.manual_seed(args.seed)
    base = SmallCNN(NUM_CLASSES).to(device)
    for name in PARTS:
        if name not in args.parts or name == "threads":
            continue
        if name == "epoch":
            part = epoch_part(samples[32], caches[32], args, device)
        else:
            size = int(name[len("data"):])
            part = data_part(size, samples[size], storage[size], caches[size], args, device)
        started = time.perf_counter()
        with closing_loaders(part.sides):
            run_part(part, args, device, base if name == "epoch" else None)
        print(f"{part.name}: {len(part.names)} sides, {time.perf_counter() - started:.1f} s", flush=True)
        parts.append(part)
    return parts, builds


if __name__ == "__main__":
    raise SystemExit(main())
