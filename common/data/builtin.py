"""Built-in data: the procedurally drawn demo set, and torchvision's CIFAR-10 / (Fashion)MNIST."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError

DEMO_CLASSES = ("horizontal", "vertical")
DEMO_MARKER = "demo_dataset.json"

# name -> (torchvision class, mean, std, native image size)
TORCHVISION_SETS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], int]] = {
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32),
    "mnist": ("MNIST", (0.1307,) * 3, (0.3081,) * 3, 28),
    "fashionmnist": ("FashionMNIST", (0.2860,) * 3, (0.3530,) * 3, 28),
}


def _draw_shape(rng: random.Random, kind: str, size: int) -> Image.Image:
    """Stripes of random colours, period and phase, horizontal or vertical (+-20 degrees)."""
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    while True:  # a stripe colour clearly different from the background
        fg = tuple(rng.randint(0, 255) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) > 150:
            break
    big = size * 2  # draw larger, rotate, then crop the centre: no empty corners
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    period = rng.uniform(0.12, 0.25) * size
    width = max(1, int(period * rng.uniform(0.3, 0.6)))
    offset = rng.uniform(0, period)
    while offset < big:
        draw.rectangle([0, offset, big, offset + width], fill=fg)
        offset += period
    angle = rng.uniform(-20, 20) + (90 if kind == "vertical" else 0)
    img = img.rotate(angle, resample=Image.BILINEAR)
    left = (big - size) // 2
    img = img.crop((left, left, left + size, left + size))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):  # distractor lines
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def generated_set_present(root: Path, marker_name: str, spec: dict[str, Any],
                          owned: list[Path], what: str) -> bool:
    """True when root already holds a generated set of this spec (its marker file says so).
    A set of another spec has its `owned` folders removed (the marker proves they are ours);
    a folder holding anything else is refused, never overwritten."""
    marker = root / marker_name
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == spec:
                return True
        except json.JSONDecodeError:
            pass
        for folder in owned:
            shutil.rmtree(folder, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} already holds files that are not {what}; pass another "
                        "--data-dir for --demo, or remove the folder")
    return False


def make_demo_dataset(root: Path, images_per_class: int = 200, size: int = 64,
                      val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write train/ and val/ folders of horizontal and vertical stripes; reuse them if already there."""
    spec = {"classes": list(DEMO_CLASSES), "images_per_class": images_per_class, "size": size,
            "val_fraction": val_fraction, "seed": seed}
    owned = [root / split / kind for split in ("train", "val") for kind in DEMO_CLASSES]
    if generated_set_present(root, DEMO_MARKER, spec, owned, "the demo set"):
        return root
    rng = random.Random(seed)
    n_val = max(1, round(images_per_class * val_fraction))
    for kind in DEMO_CLASSES:
        for i in range(images_per_class):
            split = "val" if i < n_val else "train"
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            _draw_shape(rng, kind, size).save(folder / f"{kind}_{i:04d}.png")
    (root / DEMO_MARKER).write_text(json.dumps(spec), encoding="utf-8")
    return root


def torchvision_dataset(name: str, root: Path, train: bool, download: bool, transform: Any):
    """CIFAR-10 / MNIST / FashionMNIST from torchvision, with a clear error when absent."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_SETS[name][0])
    try:
        return cls(str(root), train=train, download=download, transform=transform)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise UserError(f"{name} not found in {root}; pass --download (needs internet) or "
                            f"copy the dataset files into {root}") from None
        raise
    except OSError as exc:
        raise UserError(f"could not download {name} into {root} ({exc}); check the network or "
                        "copy the dataset files there by hand") from None


def torchvision_classes(dataset: Any) -> list[str]:
    return [str(c) for c in dataset.classes]
