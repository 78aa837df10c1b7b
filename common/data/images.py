"""Folders of images: scanning class folders, checking files before training, robust
decoding (grayscale, RGBA, palette, 16-bit and CMYK become RGB), and the transforms."""
from __future__ import annotations

import logging
import os
import random
import re
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T
from tqdm.auto import tqdm

from ..errors import UserError
from ..reporting import LOGGER_NAME
from .png_check import png_data_problem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Sample = tuple[str, int]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# Split folders a data set may hold, in the order a missing one's stand-in is suggested.
SPLIT_NAMES = ("test", "val", "valid", "validation", "train")


def missing_folder_error(root: Path, flag: str = "--data-dir", typed: str | None = None) -> UserError:
    """A data folder that does not exist: which one, and the split folders beside it when there are
    some (the guide's `--data-dir ./dataset/test` on a set with train/ and val/ only). typed: the
    folder as the user wrote it, so that the suggestion keeps its spelling (./dataset/val)."""
    parent = root.parent
    siblings = []
    if parent.is_dir():
        siblings = [name for name in SPLIT_NAMES if name != root.name and (parent / name).is_dir()]
    if not siblings:
        return UserError(f"data folder {root} does not exist; pass {flag} with one folder per class "
                         "(e.g. dataset/train/cat/*.jpg)")
    held = ", ".join(f"{name}/" for name in siblings)
    best = next((n for n in SPLIT_NAMES if n in siblings and n != "train"), siblings[0])
    shown, where, suggestion = str(root), str(parent), str(parent / best)
    bare = (typed or "").rstrip("/\\")
    if typed and Path(bare) == root and bare.endswith(root.name):
        head = bare[: len(bare) - len(root.name)]
        shown, where, suggestion = typed, head.rstrip("/\\") or ".", head + best
    return UserError(f"data folder {shown} does not exist ({where} holds {held}); to use {best}/ "
                     f"instead, pass {flag} {suggestion}")


def scan_class_folders(root: Path, classes: Sequence[str] | None = None
                       ) -> tuple[list[str], list[Sample]]:
    """Classes (sorted folder names, or the given order) and (path, label) samples."""
    if not root.exists():
        raise missing_folder_error(root)
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder; pass the folder holding the class folders")
    found = class_folders(root)
    if not found:
        raise UserError(f"no class folders in {root}; put each class's images in its own "
                        f"sub-folder, e.g. {root}/cat/ and {root}/dog/")
    names = list(classes) if classes is not None else found
    index = {name: i for i, name in enumerate(names)}
    samples: list[Sample] = []
    for name in found:
        images = list_images(root / name)
        if not images:
            raise UserError(f"class folder {root / name} holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it")
        if name in index:
            samples += [(str(p), index[name]) for p in images]
    return names, samples


def samples_for_classes(root: Path, classes: Sequence[str]) -> list[Sample]:
    """Samples of `root` labelled with a model's class names; a class folder the model does not
    know is an error naming it (a folder may hold fewer classes than the model)."""
    if root.is_dir():
        unknown = sorted(set(class_folders(root)) - set(classes))
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            known = ", ".join(list(classes)[:10]) + (" ..." if len(classes) > 10 else "")
            raise UserError(f"class folders in {root} unknown to the model: {shown} "
                            f"(the model knows: {known}); remove or rename them")
    return scan_class_folders(root, classes)[1]


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Split off `fraction` of each class (at least one image per class) with a fixed seed."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        n_val = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


@dataclass
class FolderSplits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    description: str
    drawn_from: Path | None = None  # the folder val was split off (its images train too), else None


def folder_splits(data_dir: Path, val_split: float, seed: int) -> FolderSplits:
    """train/ and val/ under data_dir; without val/, a stratified --val-split of train/.

    A data_dir holding class folders directly (no train/) is split the same way.
    """
    train_dir = data_dir / "train"
    if not 0.0 < val_split < 1.0:  # also where a val/ folder leaves it unused: a typo all the same
        raise UserError(f"--val-split must be between 0 and 1, got {val_split}")
    if not data_dir.exists():
        raise UserError(f"data folder {data_dir} does not exist; put your images in "
                        f"{data_dir}/train/<class>/ and {data_dir}/val/<class>/ "
                        "(or try the built-in set with --demo)")
    if not train_dir.is_dir():
        classes, samples = scan_class_folders(data_dir)
        train, val = stratified_split(samples, val_split, seed)
        return FolderSplits(classes, train, val, f"{data_dir} split {1 - val_split:.0%}/{val_split:.0%}",
                            data_dir)
    classes, samples = scan_class_folders(train_dir)
    val_dir = data_dir / "val"
    if not val_dir.is_dir():
        train, val = stratified_split(samples, val_split, seed)
        return FolderSplits(classes, train, val,
                            f"{train_dir} split {1 - val_split:.0%}/{val_split:.0%} (no val/ folder)",
                            train_dir)
    val_classes = class_folders(val_dir)
    if set(val_classes) != set(classes):
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise UserError(f"class folders of {train_dir} and {val_dir} differ (only in train: "
                        f"{only_train or 'none'}; only in val: {only_val or 'none'}); "
                        "make both hold the same class folders")
    _, val = scan_class_folders(val_dir, classes)
    return FolderSplits(classes, samples, val, f"{train_dir} + {val_dir}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled down, palette/alpha flattened."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


# What decoding a user's file can raise when the file, not the code, is at fault.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                 Image.DecompressionBombError)
_ANNOUNCED: set[tuple[str, str]] = set()
_ANNOUNCED_LOCK = threading.Lock()


def notice(message: str) -> None:
    """A notice line in the run's log (console and training.log), or on stderr where no log is set
    up (a spawned DataLoader worker, a library caller)."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers:
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def once_per_file(path: str | os.PathLike, kind: str, message: str) -> None:
    """notice(message) the first time this process says this kind of thing about `path` (a run is a
    process; DataLoader workers learn of bad files through ImageDataset's shared flags)."""
    key = (kind, str(path))
    with _ANNOUNCED_LOCK:
        if key in _ANNOUNCED:
            return
        _ANNOUNCED.add(key)
    notice(message)


def describe_error(exc: BaseException) -> str:
    """Why a file did not decode, on one line (a decompression bomb in words of our own)."""
    if isinstance(exc, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels, " if found else ""
        return (f"too large to decode safely ({size}more than twice PIL's limit of "
                f"{Image.MAX_IMAGE_PIXELS:,}); resize it")
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file"
    return " ".join(str(exc).split()) or type(exc).__name__


def check_pixels(path: str | os.PathLike, width: int, height: int) -> None:
    """PIL's guard, said our way: above twice Image.MAX_IMAGE_PIXELS, DecompressionBombError (a bad
    image); above it, one notice per file (instead of PIL's warning at every open)."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = max(1, width) * max(1, height)
    if not limit or pixels <= limit:
        return
    if pixels > 2 * limit:
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of "
                                           f"{2 * limit} pixels")
    once_per_file(path, "large", f"notice: {path} is very large ({width} x {height} pixels); it is "
                                 f"decoded in full, which takes about {pixels * 3 / 1e6:.0f} MB of memory "
                                 "for each copy in flight; resize it if memory runs short")


def _quiet_pil_size_warning() -> None:
    """PIL warns at every open of an image above Image.MAX_IMAGE_PIXELS; check_pixels says it once
    instead. Put first in the filters on each open (cheap when already there): a filter set once at
    import is lost to anything that restores the filters later (warnings.catch_warnings)."""
    first = warnings.filters[0] if warnings.filters else None
    if not (first and first[0] == "ignore" and first[2] is Image.DecompressionBombWarning):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Image.open (the header only), with check_pixels' notice for a very large image."""
    _quiet_pil_size_warning()
    img = Image.open(path)
    check_pixels(path, img.width, img.height)
    return img


ORIENTATION = 0x0112  # the EXIF tag


def orientation(img: Image.Image) -> int:
    """The EXIF orientation exif_transpose applies (1: upright as stored), from what PIL read with
    the header: for a PNG, an eXIf chunk after the image data is only seen once decoded."""
    exif = Image.Image.getexif(img) if img.format == "PNG" else img.getexif()  # PNG's own loads it all
    value = exif.get(ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, from the header (see orientation)."""
    return (img.height, img.width) if orientation(img) in (5, 6, 7, 8) else img.size


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decoded, turned upright by its EXIF orientation (photos from phones), as 8-bit RGB. The one
    decoding every path shares: training, validation, prediction, the data cache's PIL side."""
    with open_image(path) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def _fast_problem(img: Image.Image, path: str) -> str | None:
    """fast: what can be proven readable without decoding every pixel at full size. PNG: the
    checksum walk, then the compressed data inflated (png_check); JPEG: a decode at 1/8 scale (all
    the compressed data is read); other formats: a full decode. The EXIF data is parsed too."""
    orientation(img)
    if img.format == "PNG":
        img.verify()
        return png_data_problem(path)
    if img.format == "JPEG":
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()
    return None


def check_image(path: str, mode: str) -> str | None:
    """None when the file decodes; otherwise why not. full: exactly what training does (load_rgb);
    fast: see _fast_problem."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        if mode == "full":
            load_rgb(path)
            return None
        with open_image(path) as img:
            why = _fast_problem(img, path)
        return None if why is None else f"cannot be decoded ({why})"
    except UnidentifiedImageError:
        return "not an image file"
    except DECODE_ERRORS as exc:
        return f"cannot be decoded ({describe_error(exc)})"


def check_images(paths: Sequence[str], mode: str, show_progress: bool = True
                 ) -> list[tuple[str, str]]:
    """Check all files in parallel threads (PIL and zlib release the GIL while decoding)."""
    if mode == "off" or not paths:
        return []
    workers = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda p: check_image(p, mode), paths), total=len(paths),
                            desc=f"checking images ({mode})", leave=False,
                            disable=not show_progress or len(paths) < 500))
    return [(p, why) for p, why in zip(paths, results, strict=True) if why is not None]


BAD_IMAGE_ADVICE = ("remove or replace it, or pass --skip-bad-images to go on without it "
                    "(--check-images full finds every such file before the first epoch)")


def decode_error(path: str, reason: str, advice: str = BAD_IMAGE_ADVICE) -> UserError:
    return UserError(f"image {path} cannot be decoded ({reason}); {advice}")


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples decoded to RGB and transformed; picklable for spawn workers.

    An image that does not decode: with skip_bad=True it is skipped and the next readable sample
    of the list takes its place (every batch keeps its size; the epoch counts the stand-in), said
    once per file in the log; the file is then known bad to every DataLoader worker (a flag in
    shared memory) and not read again. With skip_bad=False it is a UserError naming the file and
    --skip-bad-images; with None (a tool without that flag) the error only says to remove it."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any],
                 skip_bad: bool | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool)
        if skip_bad:
            self.bad.share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for i in ((index % n + step) % n for step in range(n)):
            if self.bad[i]:
                continue
            path, label = self.samples[i]
            try:
                image = load_rgb(path)
            except DECODE_ERRORS as exc:
                self._bad_image(i, path, describe_error(exc))
                continue
            return self.transform(image), label
        raise UserError("no readable images left after --skip-bad-images; every image of the set "
                        "failed to decode")

    def _bad_image(self, i: int, path: str, reason: str) -> None:
        if not self.skip_bad:
            advice = BAD_IMAGE_ADVICE if self.skip_bad is not None else "remove or replace it"
            raise decode_error(path, reason, advice)
        self.bad[i] = True
        once_per_file(path, "bad", f"notice: image {path} cannot be decoded ({reason}); skipped "
                                   "(--skip-bad-images): the next readable image takes its place")


class ToRGB:
    """Transform step for datasets that hand over PIL images in other modes (MNIST)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)


def preprocessing(img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, crop_pct: float = 0.875) -> dict[str, Any]:
    """What a checkpoint stores so every tool prepares images exactly as validation did."""
    return {"img_size": int(img_size), "resize_size": int(round(img_size / crop_pct)),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "channels": 3, "interpolation": "bilinear"}


def eval_transform(pre: dict[str, Any]) -> T.Compose:
    return T.Compose([ToRGB(), T.Resize(pre["resize_size"], antialias=True),
                      T.CenterCrop(pre["img_size"]), T.ToTensor(),
                      T.Normalize(pre["mean"], pre["std"])])


def train_transform(pre: dict[str, Any], hflip: bool = True, kind: str = "standard") -> T.Compose:
    """--augment standard, the guide's: random resized crop, flip, rotation 15 degrees, colour
    jitter; cifar: random crop with 4 pixels of zero padding and flip; none: as for evaluation."""
    if kind == "none":
        return eval_transform(pre)
    if kind == "cifar":
        return T.Compose([ToRGB(), T.Resize(pre["resize_size"], antialias=True),
                          T.CenterCrop(pre["img_size"]), T.RandomCrop(pre["img_size"], padding=4),
                          *([T.RandomHorizontalFlip(0.5)] if hflip else []), T.ToTensor(),
                          T.Normalize(pre["mean"], pre["std"])])
    steps: list[Any] = [ToRGB(), T.RandomResizedCrop(pre["img_size"], scale=(0.6, 1.0), antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip(0.5))
    steps += [T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2),
              T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
    return T.Compose(steps)


def light_transform(pre: dict[str, Any], degrees: float = 10.0) -> T.Compose:
    """Fine-tuning's light augmentation: the evaluation pipeline plus a small random rotation,
    so the features the model already learned are not disturbed."""
    return T.Compose([ToRGB(), T.Resize(pre["resize_size"], antialias=True),
                      T.CenterCrop(pre["img_size"]), T.RandomRotation(degrees), T.ToTensor(),
                      T.Normalize(pre["mean"], pre["std"])])
