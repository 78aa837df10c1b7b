"""Wall time of `python gpu_train.py` against a hand-written PyTorch loop doing the same work, from
process start to process end, measured in one run.

    python bench/wall_time.py                               # 10 classes x 100 PNGs at 32 px, 5 epochs
    python bench/wall_time.py --model resnet18 --epochs 10 --per-class 300 --rounds 3
    python bench/wall_time.py --keep-cache                  # gpu_train reuses its data cache file

The issue: "the hand-written loop takes 34 s, gpu_train.py 54 s; the goal is gpu_train.py within
1.1x of the bare loop's wall time on the same work, while keeping its checkpoints, logs and plots."

Data (generated in a temporary folder): DATA/train/<class>/ and DATA/val/<class>/, 32x32 PNGs.
The two sides, each a fresh Python process timed from its start to its end (imports included:
they are part of what the user waits for):

  bare       a script written to the temporary folder, as a user would write it: torchvision
             ImageFolder with the transforms of gpu_train's standard augmentation (random resized
             crop 0.6-1, flip, rotation 15, colour jitter 0.2; validation: resize + centre crop),
             DataLoader (shuffled, --workers), the same model (small_cnn: the same layers as
             common.models.small.SmallCNN, defined in the script; or a torchvision model), AdamW
             with weight decay 0.01 and a per-step cosine schedule, validation every epoch, one
             line per epoch, torch.save of the weights at the end.
  gpu_train  python gpu_train.py --data-dir DATA --model M --img-size 32 --epochs N --batch-size B
             --lr LR --seed S --num-workers W --output OUT: its defaults otherwise (image check,
             data cache, checkpoints every epoch, training.log, metrics.csv, TensorBoard, plots).
             Its data cache file is deleted before each run (every run is a first run) unless
             --keep-cache.

Both get the same epochs, batch size, learning rate, seed and worker count (default: gpu_train's
own default on this machine). The rounds alternate which side goes first. The table gives each
run's wall time, the time inside its epochs (training + validation: the bare script's own timer,
gpu_train's metrics.csv epoch_time) and the rest (start-up, set-up, saving, plots, exit).

On a busy machine with few cores the figures swing severalfold from run to run: torch's second
OpenMP thread spins while it waits, and the step can turn several times slower than on one
thread (see the threads part of bench/data_path.py). `OMP_NUM_THREADS=1 python bench/wall_time.py`
gives both sides one thread, which is steadier there.

The last line is JSON {"bare_s": .., "gpu_train_s": .., "ratio": ..}: the median wall times over
rounds and ratio = gpu_train_s / bare_s; the target is <= 1.1. This is a measurement, not a
test: it exits 0 whether or not the target is met.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.1
SIDES = ("bare", "gpu_train")

BARE_SCRIPT = '''\
"""A hand-written training loop, as a user would write it (written and run by bench/wall_time.py)."""
import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models
from torchvision import transforms as T

p = argparse.ArgumentParser()
for flag in ("--data-dir", "--model", "--out"):
    p.add_argument(flag)
for flag in ("--epochs", "--batch-size", "--workers", "--seed"):
    p.add_argument(flag, type=int)
p.add_argument("--lr", type=float)
args = p.parse_args()

torch.manual_seed(args.seed)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32
train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(),
                      T.Normalize(mean, std)])
val_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
train_set = datasets.ImageFolder(f"{args.data_dir}/train", train_tf)
val_set = datasets.ImageFolder(f"{args.data_dir}/val", val_tf)
extra = {"persistent_workers": True} if args.workers > 0 else {}
train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          pin_memory=device.type == "cuda", **extra)
val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda", **extra)


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    def __init__(self, num_classes, width=32):
        super().__init__()
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


num_classes = len(train_set.classes)
if args.model == "small_cnn":
    model = SmallCNN(num_classes)
else:
    model = getattr(models, args.model)(num_classes=num_classes)
model = model.to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
criterion = nn.CrossEntropyLoss()
in_epochs = 0.0
for epoch in range(args.epochs):
    started = time.perf_counter()
    model.train()
    seen, loss_sum = 0, 0.0
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * y.shape[0]
        seen += y.shape[0]
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in val_loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.shape[0]
    seconds = time.perf_counter() - started
    in_epochs += seconds
    print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, val acc {correct / total:.4f}, "
          f"{seconds:.1f} s", flush=True)
torch.save(model.state_dict(), f"{args.out}/model.pth")
print(f"epochs_s={in_epochs:.6f}")
'''


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10, help="classes, 2-10 (default 10)")
    p.add_argument("--per-class", type=int, default=100, help="training images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=25, help="validation images per class (default 25)")
    p.add_argument("--model", default="small_cnn",
                   help="small_cnn (default) or a torchvision name, e.g. resnet18")
    p.add_argument("--epochs", type=int, default=5, help="default 5")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of both sides (default: gpu_train's default on this machine)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-cache", action="store_true",
                   help="let gpu_train reuse its data cache file from the previous run")
    p.add_argument("--workdir", default=None, help="folder for the data and the runs (default: temporary)")
    args = p.parse_args(argv)
    if not 2 <= args.classes <= 10:
        p.error("--classes must be between 2 and 10")
    if min(args.per_class, args.val_per_class, args.epochs, args.batch_size, args.rounds) < 1:
        p.error("--per-class, --val-per-class, --epochs, --batch-size and --rounds must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def default_workers() -> int:
    """gpu_train's --num-workers default on this machine (common.device.default_num_workers)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from common.device import default_num_workers

    return default_num_workers(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def make_dataset(root: Path, classes: int, per_class: int, seed: int, size: int = 32) -> None:
    """root/class_<k>/<i>.png: noise with a bright square whose place depends on the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        row, col = divmod(c, 4)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            y = int(np.clip(row * 8 + 2 + rng.integers(-2, 3), 0, size - 6))
            x = int(np.clip(col * 8 + 2 + rng.integers(-2, 3), 0, size - 6))
            img[y:y + 6, x:x + 6] = rng.integers(170, 256, 3)
            Image.fromarray(img).save(folder / f"{c}_{i:04d}.png")


@dataclass
class Run:
    side: str
    round: int
    wall: float      # process start to end
    epochs: float    # inside the epochs (training + validation)
    files: list[str]  # what the run left in its output folder

    @property
    def outside(self) -> float:
        return self.wall - self.epochs


def commands(args: argparse.Namespace, data: Path, out: Path, script: Path,
             workers: int) -> dict[str, list[str]]:
    same = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--seed", str(args.seed)]
    return {"bare": [sys.executable, str(script), "--data-dir", str(data), "--model", args.model,
                     "--out", str(out), "--workers", str(workers), *same],
            "gpu_train": [sys.executable, str(ROOT / "gpu_train.py"), "--data-dir", str(data),
                          "--model", args.model, "--img-size", "32", "--output", str(out),
                          "--num-workers", str(workers), *same]}


def run_side(side: str, command: list[str], out: Path, r: int) -> Run:
    out.mkdir(parents=True)
    env = dict(os.environ, MPLBACKEND="Agg")
    log = out.parent / f"{out.name}.log"
    with open(log, "w", encoding="utf-8") as fh:
        started = time.perf_counter()
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
        wall = time.perf_counter() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(command)} exited with {code}:\n{tail}")
    if side == "bare":
        found = re.findall(r"^epochs_s=([\d.]+)$", text, flags=re.MULTILINE)
        epochs = float(found[-1]) if found else float("nan")
    else:
        with open(out / "metrics.csv", newline="", encoding="utf-8") as fh:
            epochs = sum(float(row["epoch_time"]) for row in csv.DictReader(fh))
    files = sorted(p.name for p in out.iterdir())
    print(f"  round {r} {side}: {wall:.2f} s", flush=True)
    return Run(side, r, wall, epochs, files)


def report(runs: Sequence[Run]) -> dict[str, float]:
    print()
    print(f"{'side':11}{'round':>7}{'wall_s':>10}{'epochs_s':>10}{'outside_s':>11}")
    for run in runs:
        print(f"{run.side:11}{run.round:>7}{run.wall:10.3f}{run.epochs:10.3f}{run.outside:11.3f}")
    medians = {}
    for side in SIDES:
        mine = [run for run in runs if run.side == side]
        medians[side] = statistics.median(run.wall for run in mine)
        print(f"{side:11}{'median':>7}{medians[side]:10.3f}{statistics.median(r.epochs for r in mine):10.3f}"
              f"{statistics.median(r.outside for r in mine):11.3f}")
    ratio = medians["gpu_train"] / medians["bare"]
    print()
    gpu_files = next(run.files for run in runs if run.side == "gpu_train")
    print(f"gpu_train wrote: {', '.join(gpu_files)}")
    print(f"ratio = gpu_train / bare median wall time: {ratio:.3f}; target <= {TARGET:g} "
          f"({'met' if ratio <= TARGET else 'NOT met'})")
    result = {"bare_s": round(medians["bare"], 4), "gpu_train_s": round(medians["gpu_train"], 4),
              "ratio": round(ratio, 4)}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{args.model}, 32 px, {args.classes} classes x ({args.per_class} train + {args.val_per_class} "
          f"val), {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, {workers} workers, "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}", flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        data = root / "data"
        make_dataset(data / "train", args.classes, args.per_class, args.seed + 1)
        make_dataset(data / "val", args.classes, args.val_per_class, args.seed + 2)
        script = root / "bare_loop.py"
        script.write_text(BARE_SCRIPT, encoding="utf-8")
        runs = []
        for r in range(1, args.rounds + 1):
            for side in (SIDES if r % 2 == 1 else SIDES[::-1]):
                if side == "gpu_train" and not args.keep_cache:
                    shutil.rmtree(data / ".toolkit_cache", ignore_errors=True)
                out = root / f"run{r}_{side}"
                runs.append(run_side(side, commands(args, data, out, script, workers)[side], out, r))
        report(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
