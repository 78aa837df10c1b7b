"""Seconds until a target validation accuracy, gpu_train.py --data-cache off against --data-cache ram.

    python bench/time_to_accuracy.py                        # 10 classes x 200 PNGs at 32 px, 6 epochs
    python bench/time_to_accuracy.py --target 0.95 --epochs 10 --per-class 500 --rounds 3
    python bench/time_to_accuracy.py --cache-mode device    # on a GPU: the cache on the device

Data (generated in a temporary folder, train/ and val/): 10 classes of 32x32 PNGs, each a small
square of its class's colour at a random place on a noisy background. (The bright square in one
of ten grid cells, as the tests draw it, is a poor fit here: the standard augmentation's random
resized crops move the square between cells, and a small CNN stalls near 70%; a colour survives
the crops, flips, rotation and colour jitter.)

Both sides run gpu_train.main(argv) in this process with the same flags (small_cnn, --img-size 32,
the same seed, --batch-size, --lr, --epochs, the default standard augmentation), each into its own
output folder, with only --data-cache differing: off (files decoded and augmented per image by the
DataLoader) or ram (decoded once by the cache, batches augmented by BatchAugment; a fresh
--cache-dir each time, so every run builds its cache). Their console output goes to a log file in
that folder. The library is imported before the first run, so neither side pays the import.

Time to target = the sum of metrics.csv's epoch_time (training + validation of each epoch) up to
and including the first epoch whose val_acc >= --target; the cache build happens before epoch 1
and is not in it, but is in the wall time of main(), reported beside it. With --rounds above 1
the sides alternate which goes first, and each figure is the median over rounds.

On a busy machine with few cores one epoch can take several times as long as the next (torch's
second OpenMP thread; see the threads part of bench/data_path.py): use --rounds, or compare with
OMP_NUM_THREADS=1 in the environment.

The last line is JSON {"seconds_off": .., "seconds_cache": .., "ratio": ..}, ratio = off / cache
(above 1: the cache reaches the target sooner); a side that never reached the target in some
round gives null, and so does the ratio. This is a measurement: it exits 0 whatever the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo root, for `common` and gpu_train

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

NUM_CLASSES = 10
SIDES = ("off", "cache")
# one easily told colour per class; each image varies it a little
PALETTE = [(230, 40, 40), (240, 140, 30), (235, 225, 40), (50, 200, 60), (40, 210, 210),
           (40, 80, 230), (140, 60, 220), (230, 60, 200), (240, 240, 240), (130, 80, 40)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.9, help="validation accuracy to reach (default 0.9)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each run: the cap (default 6)")
    p.add_argument("--per-class", type=int, default=200, help="training images per class (default 200)")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class (default 50)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=3e-3, help="default 3e-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating (default 1)")
    p.add_argument("--cache-mode", choices=("ram", "device"), default="ram",
                   help="--data-cache of the cache side (default ram)")
    p.add_argument("--workdir", default=None, help="folder for the data and the runs (default: temporary)")
    p.add_argument("--extra", default="", help="more gpu_train flags for both sides, e.g. '--device cpu'")
    args = p.parse_args(argv)
    if min(args.epochs, args.per_class, args.val_per_class, args.batch_size, args.rounds) < 1:
        p.error("--epochs, --per-class, --val-per-class, --batch-size and --rounds must be >= 1")
    return args


def make_dataset(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """root/class_<k>/<k>_<i>.png: a 4-6 px square of class k's colour on noise."""
    rng = np.random.default_rng(seed)
    for c in range(NUM_CLASSES):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (size, size, 3)).astype(np.uint8)
            side = int(rng.integers(4, 7))
            y, x = (int(v) for v in rng.integers(4, size - side - 4, 2))
            img[y:y + side, x:x + side] = np.clip(np.array(PALETTE[c]) + rng.integers(-35, 36, 3), 0, 255)
            Image.fromarray(img).save(folder / f"{c}_{i:04d}.png")
    return root


@dataclass
class Run:
    side: str                  # "off" or "cache"
    round: int                 # 1-based
    wall: float                # seconds of the whole gpu_train.main() call
    rows: list[dict[str, str]]  # metrics.csv rows as written (strings)


def time_to_target(rows: Sequence[dict[str, str]], target: float) -> tuple[float | None, int | None]:
    """(sum of epoch_time up to the first epoch with val_acc >= target, that epoch), or (None, None)."""
    seconds = 0.0
    for row in rows:
        seconds += float(row["epoch_time"])
        if float(row["val_acc"]) >= target:
            return seconds, int(row["epoch"])
    return None, None


def side_seconds(runs: Sequence[Run], side: str, target: float) -> float | None:
    """Median over this side's rounds; None when some round never reached the target."""
    times = [time_to_target(run.rows, target)[0] for run in runs if run.side == side]
    if not times or any(t is None for t in times):
        return None
    return statistics.median(times)


def gpu_train_argv(args: argparse.Namespace, data: Path, out: Path, side: str) -> list[str]:
    argv = ["--data-dir", str(data), "--model", "small_cnn", "--img-size", "32", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
            "--output", str(out)]
    if side == "off":
        argv += ["--data-cache", "off"]
    else:
        argv += ["--data-cache", args.cache_mode, "--cache-dir", str(out / "cache")]
    return argv + args.extra.split()


def train_once(args: argparse.Namespace, data: Path, out: Path, side: str, r: int) -> Run:
    import gpu_train

    out.mkdir(parents=True)
    argv = gpu_train_argv(args, data, out, side)
    log = out / "console.log"
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        started = time.perf_counter()
        code = gpu_train.main(argv)
        wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise SystemExit(f"error: gpu_train.py {' '.join(argv)} exited with {code}:\n{tail}")
    with open(out / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    print(f"  round {r}, --data-cache {'off' if side == 'off' else args.cache_mode}: {len(rows)} epochs, "
          f"main() {wall:.1f} s", flush=True)
    return Run(side, r, wall, rows)


def report(runs: Sequence[Run], target: float) -> dict[str, float | None]:
    """The per-epoch table of every run, the summary, the verdict and the JSON line; returns the JSON."""
    print()
    print(f"{'side':8}{'round':>6}{'epoch':>6}{'val_acc':>11}{'epoch_time':>12}{'to_date':>10}")
    for run in runs:
        to_date = 0.0
        for row in run.rows:
            to_date += float(row["epoch_time"])
            print(f"{run.side:8}{run.round:>6}{int(row['epoch']):>6}{row['val_acc']:>11}{row['epoch_time']:>12}"
                  f"{to_date:10.3f}")
    print()
    for run in runs:
        seconds, epoch = time_to_target(run.rows, target)
        reached = (f"{seconds:.3f} s to val_acc >= {target:g} (epoch {epoch})" if seconds is not None
                   else f"never reached val_acc >= {target:g} in {len(run.rows)} epochs")
        print(f"result {run.side} round {run.round}: {reached}; main() wall {run.wall:.1f} s")
    off, cache = (side_seconds(runs, side, target) for side in SIDES)
    ratio = off / cache if off is not None and cache is not None else None
    for side, value in zip(SIDES, (off, cache), strict=True):
        wall = statistics.median(run.wall for run in runs if run.side == side)
        shown = f"{value:.3f} s" if value is not None else "null (the target was not reached in every round)"
        print(f"{side:6} time to target (median): {shown}; main() wall (median) {wall:.1f} s")
    print("ratio = off / cache time to target; above 1: the cache reaches the target sooner"
          + ("" if ratio is not None else " (null: a side did not reach the target)"))
    result = {"seconds_off": None if off is None else round(off, 4),
              "seconds_cache": None if cache is None else round(cache, 4),
              "ratio": None if ratio is None else round(ratio, 4)}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import common.classify  # noqa: F401  (imported before timing; gpu_train imports it on its first call)
    import common.launch  # noqa: F401

    with contextlib.ExitStack() as stack:
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        data = root / "data"
        print(f"generating 10 classes x ({args.per_class} train + {args.val_per_class} val) PNGs at 32 px in "
              f"{data}", flush=True)
        make_dataset(data / "train", args.per_class, args.seed + 1)
        make_dataset(data / "val", args.val_per_class, args.seed + 2)
        print(f"gpu_train.main: small_cnn, 32 px, {args.epochs} epochs, batch {args.batch_size}, "
              f"lr {args.lr:g}, seed {args.seed}, target val_acc >= {args.target:g}; --data-cache off vs "
              f"{args.cache_mode}", flush=True)
        runs = []
        for r in range(1, args.rounds + 1):
            order = SIDES if r % 2 == 1 else SIDES[::-1]
            for side in order:
                runs.append(train_once(args, data, root / f"run{r}_{side}", side, r))
        report(runs, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
