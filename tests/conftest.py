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
