"""Shared fixtures: tiny generated image folders and quick training flags."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")

# Flags that make a classification run take seconds on a CPU.
FAST = ["--model", "small_cnn", "--img-size", "32", "--batch-size", "8", "--num-workers", "0",
        "--lr", "0.005", "--weight-decay", "0", "--log-interval", "2"]


def draw(kind: str, rng: random.Random, size: int = 32) -> Image.Image:
    """An easy two-class picture: bright top half ("top") or bright bottom half ("bottom")."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 60) for _ in range(3)))
    bright = tuple(rng.randint(190, 255) for _ in range(3))
    box = (0, 0, size, size // 2) if kind == "top" else (0, size // 2, size, size)
    img.paste(bright, box)
    return img


def make_folder(root: Path, classes=("bottom", "top"), per_class: int = 12, seed: int = 0,
                size: int = 32, ext: str = "png") -> Path:
    """root/<class>/<n>.<ext> with `per_class` images per class."""
    rng = random.Random(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            kind = name if name in ("top", "bottom") else rng.choice(["top", "bottom"])
            draw(kind, rng, size).save(folder / f"{name}_{i:03d}.{ext}")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """tmp/dataset/{train,val}/{bottom,top}: 16 + 6 images per class."""
    root = tmp_path / "dataset"
    make_folder(root / "train", per_class=16, seed=1)
    make_folder(root / "val", per_class=6, seed=2)
    return root


def make_ten_class(root: Path, per_class: int, seed: int, size: int = 32, classes: int = 10) -> Path:
    """root/class_<k>/*.png: a bright square in one of `classes` grid cells (jittered) on noise.
    Harder than top/bottom: a small CNN needs several epochs, so fine-tuning has room to improve."""
    import numpy as np

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
            Image.fromarray(img).save(folder / f"{c}_{i:03d}.png")
    return root


def make_fake_mnist(root: Path, name: str = "FashionMNIST", train: int = 200, test: int = 50,
                    seed: int = 0) -> Path:
    """torchvision's raw MNIST-format files (idx) for `name` under root/<name>/raw/, with
    28x28 digits-like pictures whose class (0-9) is the position of a bright bar: learnable, tiny."""
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for img, label in zip(images, labels, strict=True):
            row = 2 + int(label) * 2 + int(rng.integers(0, 2))
            img[row:row + 2, 4:24] = 230
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a CUDA device (make test-gpu)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in marked:
        item.add_marker(skip)
