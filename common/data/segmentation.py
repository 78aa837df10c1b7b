"""Image/mask pairs for U-Net: data_dir/imgs/ + data_dir/masks/, as in Pytorch-UNet.

A mask is matched to its image by file name: the same stem, optionally followed by a suffix
such as `_mask` (imgs/cat1.jpg <-> masks/cat1_mask.gif or masks/cat1.png).

Mask values. Every distinct value found in the masks is a class; the sorted list of values
(`mask_values`, stored in the checkpoint) maps a pixel to its class index:
- grayscale masks (L, 1-bit, 16-bit) and class-index PNGs (mode P: the palette index is the
  value, the palette colours are ignored) give ints, e.g. [0, 255] or [0, 1, 2];
- colour masks (RGB, RGBA) give [r, g, b] lists, e.g. [[0, 0, 0], [128, 0, 0], [0, 128, 0]];
  an RGB file whose three channels are equal counts as grayscale.

-c/--classes must agree with the masks (check_classes): with C >= 2, the masks hold exactly
C values and the model has C output channels (softmax + cross entropy). C = 1 is the binary
case with one foreground channel (sigmoid + BCE): the masks hold exactly 2 values, the lower
one is background (index 0), the higher one foreground (index 1).
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..errors import UserError
from .builtin import generated_set_present
from .images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    check_image,
    describe_error,
    is_image_file,
    load_rgb,
    open_image,
    upright_size,
)

Pair = tuple[str, str]
MaskValue = Any  # int, or [r, g, b]
MASK_SUFFIXES = ("", "_mask", "-mask", "_masks", "_label", "_labels", "_gt", "_seg")
SHAPES_MARKER = "shapes_dataset.json"
_SHOW = 5  # how many names an error message lists


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")


# ------------------------------------------------------------------ pairing


def _image_files(folder: Path, data_dir: Path) -> list[Path]:
    layout = (f"put the images in {data_dir}/imgs/ and their masks in {data_dir}/masks/ "
              "(e.g. imgs/cat1.jpg with masks/cat1_mask.png)")
    if not folder.is_dir():
        raise UserError(f"no {folder.name}/ folder in {data_dir} ({folder} is missing); {layout}")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); {layout}")
    return files


# the stems of predict.py's outputs (<name>_OUT.png, and its --viz overlay <name>_OUT_viz.png)
PREDICT_SUFFIXES = ("_OUT", "_OUT_viz")


def find_pairs(data_dir: Path, mask_suffix: str | None = None,
               log: Callable[[str], None] | None = None) -> list[Pair]:
    """(image, mask) paths, sorted by image name. mask_suffix=None accepts the image's stem
    followed by any of MASK_SUFFIXES (case-insensitive); a string accepts only that suffix."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; put the images in {data_dir}/imgs/ "
                        f"and their masks in {data_dir}/masks/ (or try the built-in set with --demo)")
    images = _image_files(data_dir / "imgs", data_dir)
    masks = _image_files(data_dir / "masks", data_dir)
    by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        by_stem.setdefault(mask.stem.lower(), []).append(mask)
    suffixes = MASK_SUFFIXES if mask_suffix is None else (mask_suffix,)
    pairs: list[Pair] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    used: set[Path] = set()
    predicted: list[str] = []
    for image in images:
        found = [m for s in suffixes for m in by_stem.get(image.stem.lower() + s.lower(), [])]
        if not found and image.stem.endswith(PREDICT_SUFFIXES):
            predicted.append(image.name)  # predict.py's mask of an image of this folder, not an image
        elif not found:
            missing.append(image.name)
        elif len(found) > 1:
            ambiguous.append(f"{image.name} -> {' and '.join(m.name for m in found)}")
        else:
            pairs.append((str(image), str(found[0])))
            used.add(found[0])
    if missing:
        raise UserError(f"{len(missing)} of {len(images)} images in {data_dir / 'imgs'} have no mask in "
                        f"{data_dir / 'masks'}: {_listing(missing)}; name each mask like its image, "
                        f"optionally followed by _mask (e.g. {Path(missing[0]).stem}_mask.png), "
                        "or remove the image")
    if ambiguous:
        raise UserError(f"several masks match the same image: {_listing(ambiguous)}; keep one mask "
                        f"per image in {data_dir / 'masks'}")
    if predicted and log is not None:
        log(f"notice: ignored {len(predicted)} file(s) in {data_dir / 'imgs'} that predict.py wrote "
            f"(<name>_OUT.png, without a mask): {_listing(predicted)}; move them out of imgs/")
    if not pairs and not missing and predicted:
        raise UserError(f"{data_dir / 'imgs'} holds only files predict.py wrote ({_listing(predicted)}); "
                        "put the images in imgs/ and their masks in masks/")
    unused = [m.name for m in masks if m not in used]
    if unused and log is not None:
        log(f"ignored {len(unused)} masks without an image in {data_dir / 'imgs'}: {_listing(unused)}")
    return pairs


def split_pairs(pairs: Sequence[Pair], val_percent: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val): val_percent (the guide's -v, 0-100) of the pairs, at least one, fixed seed."""
    if not 0.0 < val_percent < 100.0:
        raise UserError(f"-v/--validation is a percentage between 0 and 100 (e.g. 10), got {val_percent}")
    if len(pairs) < 2:
        raise UserError(f"found {len(pairs)} image/mask pair(s); at least 2 are needed to keep one for "
                        "validation; add more images")
    items = sorted(pairs)
    random.Random(seed).shuffle(items)
    n_val = min(len(items) - 1, max(1, int(len(items) * val_percent / 100.0)))
    return sorted(items[n_val:]), sorted(items[:n_val])


# ------------------------------------------------------------------ masks


def _mask_array(img: Image.Image) -> np.ndarray | str:
    """HxW values, or HxWx3 for colour masks; a string says why the mask is unusable."""
    if img.mode == "1":
        return np.array(img, dtype=np.uint8)
    if img.mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        return np.array(img)
    if img.mode in ("LA", "PA"):
        return np.array(img)[..., 0]
    if img.mode == "F":
        arr = np.array(img)
        if not np.array_equal(arr, np.round(arr)):
            return "holds fractional values (a mask holds one whole number per class)"
        return arr.astype(np.int64)
    arr = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return arr[..., 0]
    return arr


def _decode_mask(path: str) -> np.ndarray | str:
    """The mask's values, upright by its EXIF orientation as images are (load_rgb)."""
    try:
        with open_image(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _mask_array(img)
    except DECODE_ERRORS as exc:
        return check_image(path, "full") or f"cannot be decoded ({describe_error(exc)})"


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a mask file to an HxW array of values (HxWx3 for colour); UserError if unusable."""
    mask = _decode_mask(str(path))
    if isinstance(mask, str):
        raise UserError(f"mask {path}: {mask}; replace or remove it (and its image)")
    return mask


def _keys(mask: np.ndarray) -> np.ndarray:
    """Colour pixels as one int each (r << 16 | g << 8 | b); grey values v as (v, v, v)."""
    m = mask.astype(np.int64)
    if m.ndim == 2:
        return m * 0x010101
    return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def _unique(mask: np.ndarray) -> tuple[bool, np.ndarray]:
    """(is colour, distinct values; colour as _keys)."""
    if mask.ndim == 3:
        return True, np.unique(_keys(mask))
    if mask.dtype == np.uint8:
        return False, np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    return False, np.unique(mask)


def _merge(uniques: Sequence[tuple[bool, np.ndarray]]) -> list[MaskValue]:
    if not any(colour for colour, _ in uniques):
        return [int(v) for v in np.unique(np.concatenate([v for _, v in uniques]))]
    grey_max = max((int(v.max()) for colour, v in uniques if not colour and v.size), default=0)
    if grey_max > 255:
        raise UserError("the masks mix colour (RGB) files with 16-bit grayscale ones; save all masks "
                        "in one format")
    keys = np.unique(np.concatenate([v if colour else v.astype(np.int64) * 0x010101
                                     for colour, v in uniques]))
    return [[int(k >> 16) & 255, int(k >> 8) & 255, int(k) & 255] for k in keys]


def _in_threads(fn: Callable[[Any], Any], items: Sequence[Any], desc: str, show_progress: bool) -> list[Any]:
    workers = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, leave=False,
                         disable=not show_progress or len(items) < 500))


def _unique_of_file(path: str) -> tuple[bool, np.ndarray]:
    return _unique(read_mask(path))


def discover_mask_values(mask_paths: Sequence[str], show_progress: bool = True) -> list[MaskValue]:
    """The sorted distinct values of all masks: ints, or [r, g, b] lists for colour masks."""
    if not mask_paths:
        raise UserError("no masks to read the class values from")
    return _merge(_in_threads(_unique_of_file, list(mask_paths), "reading mask values", show_progress))


def _inspect_pair(pair: Pair, mode: str) -> tuple[str | None, tuple[bool, np.ndarray] | None,
                                                 tuple[int, int] | None]:
    """(problem, None, None) or (None, the mask's distinct values, the upright image size)."""
    image_path, mask_path = pair
    why = check_image(image_path, mode) if mode != "off" else None
    if why is None:
        try:
            with open_image(image_path) as img:
                image_size = upright_size(img)  # what load_image gives
        except DECODE_ERRORS as exc:
            why = f"cannot be decoded ({describe_error(exc)})"
    if why is not None:
        return f"image {image_path}: {why}", None, None
    mask = _decode_mask(mask_path)
    if isinstance(mask, str):
        return f"mask {mask_path}: {mask}", None, None
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size != image_size:
        return _size_problem(image_path, image_size, mask_path, mask_size), None, None
    return None, _unique(mask), image_size


def _size_problem(image_path: str, image_size: tuple[int, int], mask_path: str,
                  mask_size: tuple[int, int]) -> str:
    return (f"image {image_path} is {image_size[0]}x{image_size[1]} but its mask {mask_path} is "
            f"{mask_size[0]}x{mask_size[1]}")


def check_pairs(pairs: Sequence[Pair], check: str = "fast", show_progress: bool = True) -> list[MaskValue]:
    """Check every pair (image decodes with check_image's `check` mode, mask decodes, same size)
    and return the sorted mask values. Problems are gathered and raised as one UserError."""
    return inspect_pairs(pairs, check, show_progress)[0]


def inspect_pairs(pairs: Sequence[Pair], check: str = "fast", show_progress: bool = True
                  ) -> tuple[list[MaskValue], list[tuple[int, int]]]:
    """check_pairs' mask values, and the (width, height) of each image as loading gives it
    (upright), in the order of `pairs`: one pass over the files for both."""
    if not pairs:
        raise UserError("no image/mask pairs to check")
    results = _in_threads(lambda p: _inspect_pair(p, check), list(pairs), "checking images and masks",
                          show_progress)
    problems = [why for why, _, _ in results if why is not None]
    if problems:
        raise UserError(f"{len(problems)} of {len(results)} image/mask pairs are unusable: "
                        f"{_listing(problems)}; fix or remove them (an image and its mask must both "
                        "decode and have the same width and height)")
    return _merge([values for _, values, _ in results]), [size for _, _, size in results]


def smallest_scale(side: int, minimum: int) -> float | None:
    """The smallest -s (two decimals) that scales a side of `side` pixels to `minimum` or more
    (scaled_size rounds down); None when even -s 1 leaves it smaller."""
    if side < minimum:
        return None
    scale = math.ceil(100 * minimum / side) / 100
    while scaled_size((side, side), scale)[0] < minimum:
        scale = round(scale + 0.01, 2)
    return min(scale, 1.0)


def check_min_size(pairs: Sequence[Pair], sizes: Sequence[tuple[int, int]], scale: float,
                   minimum: int, network: str) -> None:
    """Every image, scaled by -s, must keep `minimum` pixels per side (a U-Net's four poolings);
    otherwise one UserError naming the smallest image and the smallest -s that works for all."""
    if not sizes:
        return
    index = min(range(len(sizes)), key=lambda i: min(sizes[i]))
    width, height = sizes[index]
    scaled = scaled_size((width, height), scale)
    if min(scaled) >= minimum:
        return
    image = pairs[index][0]
    needed = smallest_scale(min(width, height), minimum)
    if needed is None:
        raise UserError(f"image {image} is {width}x{height} pixels, smaller than the {minimum}x{minimum} "
                        f"that {network} needs even at -s 1; remove it and its mask, or use larger images")
    raise UserError(f"-s {scale:g} scales image {image} ({width}x{height}) to {scaled[0]}x{scaled[1]} "
                    f"pixels, below the {minimum}x{minimum} that {network} needs; pass -s {needed:g} or "
                    "more (the smallest scale that works for these images)")


def check_classes(mask_values: Sequence[MaskValue], classes: int) -> None:
    """-c/--classes against the masks: C >= 2 needs C mask values; C = 1 (one foreground channel,
    BCE) needs exactly 2: the lower is background, the higher foreground."""
    n = len(mask_values)
    shown = _listing(list(mask_values))
    if classes < 1:
        raise UserError(f"-c/--classes must be 1 (binary, one output channel) or the number of classes "
                        f"(>= 2), got {classes}; the masks hold {n} values: {shown}")
    if n < 2:
        raise UserError(f"all masks hold the single value {shown}; a mask marks background and at "
                        "least one class with different values")
    needed = 2 if classes == 1 else classes
    if n == needed:
        return
    fix = f"pass -c {n}" + (" (or -c 1 for one foreground channel)" if n == 2 else "")
    hint = ""
    if n > 20:
        hint = ("; that many values usually means lossy (JPEG) or anti-aliased masks: save masks as PNG "
                "or GIF with exact class values")
    raise UserError(f"-c/--classes {classes} expects {needed} distinct mask values, but the masks hold "
                    f"{n}: {shown}; {fix}{hint}")


def mask_to_index(mask: np.ndarray, mask_values: Sequence[MaskValue], name: str = "mask") -> np.ndarray:
    """HxW int64 class indices: the position of each pixel's value in mask_values."""
    mask = np.asarray(mask)
    colour = bool(mask_values) and isinstance(mask_values[0], (list, tuple))
    if colour:
        table = np.array([(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in mask_values], np.int64)
        values = _keys(mask)
    else:
        if mask.ndim == 3:
            raise UserError(f"{name} is a colour mask, but the model's mask values are grey levels "
                            f"({_listing(list(mask_values))}); use masks like those it was trained on")
        table = np.asarray(mask_values, dtype=np.int64)
        values = mask
    order = np.argsort(table)
    ordered = table[order]
    pos = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    hit = ordered[pos] == values
    if not hit.all():
        unknown = np.unique(mask[~hit], axis=0).tolist()
        raise UserError(f"{name} holds values {_listing(unknown)} that are not mask values of this "
                        f"model ({_listing(list(mask_values))})")
    return order[pos].astype(np.int64)


def index_to_mask(index: np.ndarray, mask_values: Sequence[MaskValue]) -> np.ndarray:
    """The inverse of mask_to_index: class indices back to mask values (uint8 where they fit)."""
    table = np.asarray(mask_values)
    if table.size and table.min() >= 0 and table.max() <= 255:
        table = table.astype(np.uint8)
    return table[np.asarray(index)]


# ------------------------------------------------------------------ dataset


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) after -s/--scale, as in Pytorch-UNet (at least one pixel)."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def load_image(path: str, scale: float, in_chans: int = 3) -> Image.Image:
    """Decode (any mode -> RGB, or L for in_chans=1; EXIF orientation applied) and resize by scale
    with bicubic. A file that does not decode is a UserError naming it."""
    try:
        image = load_rgb(path)
    except DECODE_ERRORS as exc:
        raise UserError(f"image {path} cannot be decoded ({describe_error(exc)}); remove it and its mask, "
                        "or replace it (--check-images full finds every such pair before the first epoch)"
                        ) from None
    if in_chans == 1:
        image = image.convert("L")
    return rescale(image, scale)


def rescale(image: Image.Image, scale: float) -> Image.Image:
    """Resized by -s/--scale (scaled_size) with bicubic, as load_image does."""
    size = scaled_size(image.size, scale)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """CxHxW float in [0, 1]: the network's input (no mean/std normalisation, as in Pytorch-UNet)."""
    arr = np.array(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (width, height): every output pixel is an input value."""
    h, w = mask.shape[:2]
    new_w, new_h = size
    rows = np.minimum(((np.arange(new_h) + 0.5) * h / new_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * w / new_w).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def preprocessing(scale: float, in_chans: int = 3) -> dict[str, Any]:
    """What a segmentation checkpoint stores so predict.py prepares images as training did."""
    return {"scale": float(scale), "channels": int(in_chans), "mean": [0.0] * in_chans,
            "std": [1.0] * in_chans, "interpolation": "bicubic", "mask_interpolation": "nearest"}


def check_scale(scale: float) -> None:
    if not scale > 0:
        raise UserError(f"-s/--scale must be above 0 (e.g. 0.5), got {scale:g}")


class SegmentationDataset(torch.utils.data.Dataset):
    """(image CxHxW float in [0, 1], mask HxW int64 class indices) per pair, resized by scale.

    augment=True flips image and mask together: horizontally, and vertically too unless
    vflip=False (for scenes with an up and a down). Picklable for spawn workers.
    """

    def __init__(self, pairs: Sequence[Pair], mask_values: Sequence[MaskValue], scale: float = 0.5,
                 augment: bool = False, in_chans: int = 3, vflip: bool = True):
        check_scale(scale)
        if in_chans not in (1, 3):
            raise UserError(f"images are read with 1 (grayscale) or 3 (RGB) channels, not {in_chans}")
        self.pairs = [(str(i), str(m)) for i, m in pairs]
        self.mask_values = [list(v) if isinstance(v, (list, tuple)) else int(v) for v in mask_values]
        self.scale = float(scale)
        self.augment = augment
        self.in_chans = in_chans
        self.vflip = vflip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path, 1.0, self.in_chans)
        mask = read_mask(mask_path)
        if (mask.shape[1], mask.shape[0]) != image.size:
            raise UserError(_size_problem(image_path, image.size, mask_path, (mask.shape[1], mask.shape[0])))
        size = scaled_size(image.size, self.scale)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
            mask = resize_nearest(mask, size)
        x = to_tensor(image)
        y = torch.from_numpy(mask_to_index(mask, self.mask_values, name=f"mask {mask_path}"))
        if self.augment:
            flip_h, flip_v = (torch.rand(2) < 0.5).tolist()
            dims = ([-1] if flip_h else []) + ([-2] if flip_v and self.vflip else [])
            if dims:
                x, y = x.flip(dims), y.flip(dims)
        return x, y


# ------------------------------------------------------------------ generated data


def _draw_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Filled ellipses and rectangles of random colours on a noisy background."""
    bg = rng.integers(0, 256, 3)
    image = bg + rng.normal(0.0, 12.0, (size, size, 3))
    mask = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(max(2.0, 0.1 * size), 0.25 * size, 2)
        if rng.random() < 0.5:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            shape = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - bg).sum() < 150:
            colour = rng.integers(0, 256, 3)
        image[shape] = colour + rng.normal(0.0, 12.0, (int(shape.sum()), 3))
        mask |= shape
    if not mask.any():  # a shape centred off the edge: put one pixel block in
        mask[size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1] = True
        image[mask] = 255 - bg
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def make_shapes_dataset(root: Path, n: int = 300, size: int = 64, seed: int = 0) -> Path:
    """root/imgs/shape_NNNN.png and root/masks/shape_NNNN_mask.png (L, values 0 and 255);
    an existing set of the same spec is reused, a folder holding other files is refused."""
    if size < 8 or n < 1:
        raise ValueError(f"make_shapes_dataset needs n >= 1 and size >= 8, got n={n}, size={size}")
    root = Path(root)
    spec = {"kind": "shapes", "n": n, "size": size, "seed": seed}
    if generated_set_present(root, SHAPES_MARKER, spec, [root / "imgs", root / "masks"],
                             "the generated shapes set"):
        return root
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = _draw_pair(rng, size)
        Image.fromarray(image, "RGB").save(root / "imgs" / f"shape_{i:04d}.png", compress_level=1)
        Image.fromarray(mask, "L").save(root / "masks" / f"shape_{i:04d}_mask.png", compress_level=1)
    (root / SHAPES_MARKER).write_text(json.dumps(spec), encoding="utf-8")
    return root
