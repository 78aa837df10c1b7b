"""The decode-once data cache: a whole image data set as ONE uint8 tensor.

Why one tensor. Small and medium sets (CIFAR-sized, or a few thousand photos at training
size) cost more to decode every epoch than to train on. Decoded once, resized to the training
size and stacked into a single contiguous uint8 tensor (N, C, S, S), the set is a quarter of
its float32 size, fits in (pinned) RAM or on the GPU, and a batch is one index operation
(`images[idx]`) followed by augmentation on the device for the whole batch. The tensor is
preallocated and filled in place by the decoding threads: there is never a list of N tensors
beside a stacked copy.

What goes in. Classification: `images` (N, 3, S, S) RGB (grayscale files become three equal
channels, as load_rgb does) after fit_square (shorter side to S, centre crop) and `labels`
int64 (N,). Segmentation: `images` (N, C, H, W) resized by -s/--scale and `masks` uint8 (N, H, W)
class indices, made by exactly the functions SegmentationDataset uses; `labels` is empty.

Decoding. decode_rgb_uint8 uses torchvision's libjpeg decoder (fast, GIL released) for 8-bit
JPEG that PIL keeps upright as stored, and PIL (images.load_rgb) for every other file, for any
JPEG with an EXIF orientation to apply and for whatever torchvision refuses, so the pixels equal
load_rgb's and the orientation is applied by one rule (PIL's exif_transpose) everywhere. PNG is
always PIL's (see _torchvision_ok).
Segmentation pairs are decoded with load_image / read_mask as SegmentationDataset does.

The cache file. A cache is written to `<cache_dir or data_root/.toolkit_cache>/` as
`images_<key16>_<size>.pt` (classification) or `pairs_<key16>_<W>x<H>.pt` (segmentation), where
the key is a SHA-256 over the format version, the settings (size; or scale, channels and mask
values) and the list, in the order given, of every file with its label, byte size and mtime_ns.
Any change to a file, the list, its order or the settings gives another key, so a stale cache is
never used; the full key is stored inside the file and checked again on load (weights_only=True).
A file that does not load is rebuilt with a notice. Writes are atomic (checkpoint.atomic_save:
temporary file in the same folder, fsync, rename); a folder that cannot be written only costs
the file, with a one-line notice. Caches for other keys are left in place (train and val
lists, or other sizes, each have their own file).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from ..checkpoint import atomic_save
from ..errors import UserError
from .images import (
    DECODE_ERRORS,
    Sample,
    decode_error,
    describe_error,
    load_rgb,
    open_image,
    orientation,
    upright_size,
)
from .segmentation import (
    Pair,
    _size_problem,
    load_image,
    mask_to_index,
    read_mask,
    resize_nearest,
    scaled_size,
)

try:  # deprecated since torchvision 0.29 (TorchCodec replaces it); without it, PIL decodes everything
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover
    decode_image = None

CACHE_FORMAT = "toolkit-data-cache"
CACHE_VERSION = 2  # 2: EXIF orientation decided by PIL on both decoding paths
CACHE_FOLDER = ".toolkit_cache"
PLACEMENT_MODES = ("auto", "off", "ram", "device")
# what torch.load raises on a damaged or foreign file
_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError,
                TypeError, struct.error, pickle.UnpicklingError)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class ImageCache:
    images: torch.Tensor          # uint8 (N, C, H, W), contiguous
    labels: torch.Tensor          # int64 (N,) class labels; empty for segmentation
    masks: torch.Tensor | None    # uint8 (N, H, W) class indices (segmentation), else None
    file: Path | None             # the cache file used or written (None: not written)
    reused: bool                  # True when read from an earlier run's cache file
    bad: list[tuple[str, str]]    # (path, reason) images skipped at build time

    @property
    def nbytes(self) -> int:
        masks = self.masks.nbytes if self.masks is not None else 0
        return self.images.nbytes + self.labels.nbytes + masks

    def __len__(self) -> int:
        return self.images.shape[0]


# ------------------------------------------------------------------ decoding


def _jpeg_torchvision_ok(data: bytes) -> bool:
    """8-bit JPEG with 1 (grey) or 3 (YCbCr/RGB) components; CMYK/YCCK go to PIL."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF:
            return pos + 10 <= len(data) and data[pos + 4] == 8 and data[pos + 9] in (1, 3)
        if marker == 0xDA or length < 2:  # start of scan before any frame header: odd file
            return False
        pos += 2 + length
    return False


def _torchvision_ok(data: bytes) -> bool:
    """JPEG only. PNG goes to PIL: torchvision's PNG decoder is hardly faster than PIL's (libpng and
    zlib do the work in both), and torchvision 0.29 crashes the whole process (SIGSEGV) on a PNG whose
    compressed data is corrupt, where PIL raises an error that names the file."""
    return data.startswith(b"\xff\xd8\xff") and _jpeg_torchvision_ok(data)


def _decode_pil(path: str) -> torch.Tensor:
    """load_rgb's pixels (EXIF orientation applied) as a (3, H, W) tensor."""
    arr = np.array(load_rgb(path), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1)


def _stays_upright(path: str) -> bool:
    """True when PIL applies no EXIF orientation to the JPEG (its header is opened here, which also
    applies PIL's size limit and the notice for a very large image)."""
    with open_image(path) as img:
        return orientation(img) == 1


def decode_rgb_uint8(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB, EXIF orientation applied as load_rgb does. torchvision for 8-bit JPEG that
    PIL keeps as stored; PIL (load_rgb's pixels) for everything else, for any file with an orientation
    to apply (one rule for it everywhere: PIL's exif_transpose, which also reads XMP) and for whatever
    torchvision cannot decode. A corrupt file raises what PIL raises (one of images.DECODE_ERRORS)."""
    path = str(path)
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    if decode_image is not None and _torchvision_ok(data) and _stays_upright(path):
        try:
            image = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=False)
            if image.dtype == torch.uint8 and image.shape[0] == 3:
                return image
        except RuntimeError:
            pass  # PIL decodes it, or raises the error the user should see
    return _decode_pil(path)


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., C, H, W) -> (..., C, size, size): the shorter side to `size` (bilinear, antialias:
    torchvision.transforms.v2's Resize on tensors, whose native uint8 kernel is several times faster
    than v1's float path and within one grey level of PIL's resize, as eval_transform does it;
    untouched when the shorter side already is `size`), then CenterCrop."""
    height, width = image.shape[-2:]
    if min(height, width) != size:
        image = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if tuple(image.shape[-2:]) != (size, size):
        image = TF.center_crop(image, [size, size])
    return image


# ------------------------------------------------------------------ threads, keys, files


def _workers() -> int:
    return min(8, 2 * (os.cpu_count() or 1))


def _in_threads(fn: Callable[[int], Any], n: int, desc: str, show_progress: bool) -> Iterator[Any]:
    """fn(0) ... fn(n - 1) in threads, results in order; on an error the queued calls are dropped."""
    pool = ThreadPoolExecutor(max_workers=_workers())
    try:
        yield from tqdm(pool.map(fn, range(n)), total=n, desc=desc, leave=False,
                        disable=not show_progress or n < 500)  # a small set takes under a second
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]  # missing: decoding reports it
    return [st.st_size, st.st_mtime_ns]


def cache_key(kind: str, settings: Any, entries: Sequence[Any]) -> str:
    """SHA-256 of the format version, the settings and the file entries (in the order given)."""
    text = json.dumps([CACHE_FORMAT, CACHE_VERSION, kind, settings, list(entries)],
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def cache_folder(cache_dir: Path | None, data_root: Path) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(data_root) / CACHE_FOLDER


def _load_cache(file: Path, key: str, check: Callable[[dict[str, Any]], bool],
                log: Callable[[str], None]) -> dict[str, Any] | None:
    """The payload of a cache file of this key; None (with a notice if damaged) otherwise."""
    if not file.is_file():
        return None
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        valid = (isinstance(payload, dict) and payload.get("format") == CACHE_FORMAT
                 and payload.get("version") == CACHE_VERSION and payload.get("key") == key
                 and check(payload))
    except _LOAD_ERRORS as exc:
        log(f"data cache: {file} is unreadable ({' '.join(str(exc).split())[:200]}); rebuilding it")
        return None
    if not valid:
        log(f"data cache: {file} does not hold the expected data; rebuilding it")
        return None
    return payload


def _write_cache(file: Path, payload: dict[str, Any], log: Callable[[str], None]) -> Path | None:
    """Atomic write; a folder that cannot be written means no file, with one line saying so."""
    try:
        atomic_save(payload, file)
    except (OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        log(f"data cache: cannot write {file} ({reason}); the data is cached for this run only "
            "(pass --cache-dir DIR to keep the cache file in a writable folder)")
        return None
    return file


def _payload(key: str, cache: ImageCache) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "images": cache.images,
            "labels": cache.labels, "masks": cache.masks, "bad": [list(b) for b in cache.bad]}


def _from_payload(payload: dict[str, Any], file: Path) -> ImageCache:
    return ImageCache(payload["images"], payload["labels"], payload["masks"], file, True,
                      [(str(p), str(r)) for p, r in payload["bad"]])


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------ classification


def _decode_into(images: torch.Tensor, paths: Sequence[str], size: int) -> Callable[[int], str | None]:
    """A task for slot i: decode, fit_square and copy into images[i]; None, or why it failed."""
    def task(i: int) -> str | None:
        try:
            images[i].copy_(fit_square(decode_rgb_uint8(paths[i]), size))
        except DECODE_ERRORS as exc:
            return describe_error(exc)
        return None
    return task


def _decode_all(samples: Sequence[Sample], size: int, skip_bad: bool, show_progress: bool) -> ImageCache:
    paths = [str(p) for p, _ in samples]
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    labels = torch.tensor([int(label) for _, label in samples], dtype=torch.int64)
    keep = torch.ones(len(paths), dtype=torch.bool)
    bad: list[tuple[str, str]] = []
    results = _in_threads(_decode_into(images, paths, size), len(paths), "caching images", show_progress)
    for i, reason in enumerate(results):
        if reason is not None:
            if not skip_bad:
                results.close()  # drops the queued decodes before raising
                raise decode_error(paths[i], reason)
            bad.append((paths[i], reason))
            keep[i] = False
    if bad:  # rare: one compacted copy
        images, labels = images[keep].contiguous(), labels[keep]
    return ImageCache(images, labels, None, None, False, bad)


def _image_check(n: int, size: int) -> Callable[[dict[str, Any]], bool]:
    def check(p: dict[str, Any]) -> bool:
        images, labels, bad = p.get("images"), p.get("labels"), p.get("bad")
        return (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and tuple(images.shape[1:]) == (3, size, size) and isinstance(labels, torch.Tensor)
                and labels.dtype == torch.int64 and isinstance(bad, list)
                and images.shape[0] == labels.shape[0] == n - len(bad) and p.get("masks") is None)
    return check


def build_image_cache(samples: Sequence[Sample], size: int, *, cache_dir: Path | None, data_root: Path,
                      skip_bad: bool, show_progress: bool = True,
                      log: Callable[[str], None] = print) -> ImageCache:
    """Decode every (path, label) once in threads, fit_square(size), fill one (N, 3, size, size)
    uint8 tensor; reuse or write the cache file (see the module docstring). An undecodable image
    is a UserError, or with skip_bad left out and listed in .bad."""
    samples = [(str(p), int(label)) for p, label in samples]
    key = cache_key("images", {"size": int(size)}, [[p, label, *_stat(p)] for p, label in samples])
    file = cache_folder(cache_dir, data_root) / f"images_{key[:16]}_{int(size)}.pt"
    payload = _load_cache(file, key, _image_check(len(samples), size), log)
    if payload is not None:
        cache = _from_payload(payload, file)
        if cache.bad and not skip_bad:
            raise decode_error(*cache.bad[0])
        log(f"data cache: {len(cache)} images read from {file}")
        return cache
    cache = _decode_all(samples, size, skip_bad, show_progress)
    cache.file = _write_cache(file, _payload(key, cache), log)
    return cache


def build_array_cache(array: Any, labels: Any, size: int | None = None) -> ImageCache:
    """torchvision's in-memory sets -> ImageCache without a file: CIFAR10.data (uint8 N, H, W, 3
    numpy) as it is, MNIST.data (uint8 N, H, W) replicated to 3 channels as ToRGB does. With
    `size`, each image is fit_square'd to it (in chunks, into one preallocated tensor)."""
    data = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if data.dtype != torch.uint8 or data.ndim not in (3, 4):
        raise ValueError(f"expected uint8 (N, H, W) or (N, H, W, C) images, got {data.dtype} "
                         f"{tuple(data.shape)}")
    data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)[:, :3]  # RGBA: alpha dropped
    if data.shape[1] == 2:
        raise ValueError(f"expected 1, 3 or 4 channels, got {tuple(array.shape)}")
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if targets.shape[0] != data.shape[0]:
        raise ValueError(f"{data.shape[0]} images but {targets.shape[0]} labels")
    n, _, height, width = data.shape
    out_size = (height, width) if size is None else (size, size)
    images = torch.empty((n, 3, *out_size), dtype=torch.uint8)
    for start in range(0, n, 4096):
        chunk = data[start:start + 4096]
        images[start:start + 4096] = chunk if size is None else fit_square(chunk, size)
    return ImageCache(images, targets.clone(), None, None, False, [])


# ------------------------------------------------------------------ segmentation


def _header_size(path: str) -> tuple[int, int]:
    """The upright (EXIF orientation applied) size, from the header."""
    try:
        with open_image(path) as img:
            return upright_size(img)
    except DECODE_ERRORS as exc:
        raise UserError(f"image {path} cannot be decoded ({describe_error(exc)}); remove it and its mask, "
                        "or replace it (--check-images full finds every such pair before the first epoch)"
                        ) from None


def pair_cache_size(pairs: Sequence[Pair], scale: float) -> tuple[int, int]:
    """(width, height) that all pairs share after scaling (read from the file headers only)."""
    if not pairs:
        raise UserError("no image/mask pairs to cache")
    sizes: dict[tuple[int, int], str] = {}
    for image_path, _ in pairs:
        sizes.setdefault(scaled_size(_header_size(image_path), scale), image_path)
    if len(sizes) > 1:
        shown = ", ".join(f"{p} -> {w}x{h}" for (w, h), p in list(sizes.items())[:3])
        raise UserError(f"the images have {len(sizes)} different sizes after -s/--scale {scale:g} "
                        f"({shown}); cached batches need one size: resize the images to one size, "
                        "or pass --data-cache off")
    return next(iter(sizes))


def _pair_into(images: torch.Tensor, masks: torch.Tensor, pairs: Sequence[Pair],
               mask_values: list[Any], in_chans: int) -> Callable[[int], None]:
    """A task for slot i, exactly SegmentationDataset.__getitem__ without augmentation."""
    size = (images.shape[3], images.shape[2])

    def task(i: int) -> None:
        image_path, mask_path = pairs[i]
        image = load_image(image_path, 1.0, in_chans)
        mask = read_mask(mask_path)
        if (mask.shape[1], mask.shape[0]) != image.size:
            raise UserError(_size_problem(image_path, image.size, mask_path, (mask.shape[1], mask.shape[0])))
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
            mask = resize_nearest(mask, size)
        arr = np.array(image, dtype=np.uint8)
        images[i].copy_(torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1))
        index = mask_to_index(mask, mask_values, name=f"mask {mask_path}")
        masks[i].copy_(torch.from_numpy(index.astype(np.uint8)))
    return task


def _pair_check(n: int, in_chans: int, width: int, height: int) -> Callable[[dict[str, Any]], bool]:
    def check(p: dict[str, Any]) -> bool:
        images, masks = p.get("images"), p.get("masks")
        return (isinstance(images, torch.Tensor) and isinstance(masks, torch.Tensor)
                and images.dtype == masks.dtype == torch.uint8
                and tuple(images.shape) == (n, in_chans, height, width)
                and tuple(masks.shape) == (n, height, width) and isinstance(p.get("labels"), torch.Tensor)
                and p.get("bad") == [])
    return check


def build_pair_cache(pairs: Sequence[Pair], mask_values: Sequence[Any], scale: float, in_chans: int, *,
                     cache_dir: Path | None, data_root: Path, show_progress: bool = True,
                     log: Callable[[str], None] = print) -> ImageCache:
    """Segmentation pairs decoded and resized as SegmentationDataset does: images uint8 (N, C, H, W),
    masks uint8 (N, H, W) class indices. All pairs must share one scaled size. Cached like images."""
    if in_chans not in (1, 3):
        raise UserError(f"images are read with 1 (grayscale) or 3 (RGB) channels, not {in_chans}")
    values = [list(v) if isinstance(v, (list, tuple)) else int(v) for v in mask_values]
    if len(values) > 256:
        raise UserError(f"the masks hold {len(values)} values; the data cache stores class indices as "
                        "uint8 (at most 256 classes): pass --data-cache off")
    pairs = [(str(i), str(m)) for i, m in pairs]
    width, height = pair_cache_size(pairs, scale)
    settings = {"scale": float(scale), "in_chans": int(in_chans), "mask_values": values}
    key = cache_key("pairs", settings, [[i, *_stat(i), m, *_stat(m)] for i, m in pairs])
    file = cache_folder(cache_dir, data_root) / f"pairs_{key[:16]}_{width}x{height}.pt"
    payload = _load_cache(file, key, _pair_check(len(pairs), in_chans, width, height), log)
    if payload is not None:
        log(f"data cache: {len(pairs)} image/mask pairs read from {file}")
        return _from_payload(payload, file)
    images = torch.empty((len(pairs), in_chans, height, width), dtype=torch.uint8)
    masks = torch.empty((len(pairs), height, width), dtype=torch.uint8)
    task = _pair_into(images, masks, pairs, values, in_chans)
    for _ in _in_threads(task, len(pairs), "caching images and masks", show_progress):
        pass
    cache = ImageCache(images, torch.empty(0, dtype=torch.int64), masks, None, False, [])
    cache.file = _write_cache(file, _payload(key, cache), log)
    return cache


# ------------------------------------------------------------------ placement


def estimate_bytes(n: int, channels: int, height: int, width: int) -> int:
    """Bytes of an (n, channels, height, width) uint8 cache plus its int64 labels. For
    segmentation pass channels + 1 (the uint8 masks are one more plane)."""
    return int(n) * int(channels) * int(height) * int(width) + 8 * int(n)


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable, sysconf, Windows API)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        return _windows_available_ram()
    try:  # macOS and other POSIX systems
        pages = os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names \
            else os.sysconf("SC_PHYS_PAGES") // 2
        return int(pages) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _windows_available_ram() -> int | None:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong) for name in ("total_phys", "avail_phys", "total_page",
                                                    "avail_page", "total_virtual", "avail_virtual",
                                                    "avail_extended")]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.avail_phys)


def _too_big(what: str, nbytes: int, limit: float, total: int, asked: str) -> UserError:
    other = "--data-cache ram, or --data-cache off" if asked == "device" else "--data-cache off"
    return UserError(f"the data cache needs {_human(nbytes)}, more than {limit:.0%} of the "
                     f"{_human(total)} of {what} (--data-cache {asked}); pass {other} to read the "
                     "files every epoch, or use a smaller --img-size")


def choose_placement(mode: str, nbytes: int, device: torch.device, *, free_bytes: int | None = None,
                     ram_bytes: int | None = None, device_fraction: float = 0.5,
                     ram_fraction: float = 0.5) -> tuple[str, str]:
    """(placement "device" | "ram" | "off", one line for the log). auto: the GPU when CUDA is used and
    the cache takes at most device_fraction of its free memory, else RAM within ram_fraction of the
    available RAM, else off. device on a machine without CUDA falls back to RAM with a notice;
    device or ram asked but too big is a UserError."""
    if mode not in PLACEMENT_MODES:
        raise UserError(f"--data-cache must be one of {', '.join(PLACEMENT_MODES)}, got {mode!r}")
    if mode == "off":
        return "off", "data cache: off (--data-cache off); images are decoded from the files every epoch"
    size = _human(nbytes)
    note = ""
    if device.type == "cuda" and mode in ("auto", "device"):
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else int(free_bytes)
        if nbytes <= device_fraction * free:
            return "device", f"data cache: on the GPU ({size} of {_human(free)} free)"
        if mode == "device":
            raise _too_big("free GPU memory", nbytes, device_fraction, free, "device")
        note = f"; more than {device_fraction:.0%} of the {_human(free)} free on the GPU"
    elif mode == "device":
        note = f"; --data-cache device needs a CUDA GPU, this run uses {device.type}"
    ram = available_ram() if ram_bytes is None else int(ram_bytes)
    if ram is not None and nbytes <= ram_fraction * ram:
        return "ram", f"data cache: in RAM ({size} of {_human(ram)} available{note})"
    if mode in ("ram", "device"):
        raise _too_big("available RAM", nbytes, ram_fraction, ram or 0, mode)
    known = f"more than {ram_fraction:.0%} of the {_human(ram)} of available RAM" if ram is not None \
        else "the available RAM is unknown"
    return "off", f"data cache: off ({size} is {known}{note}); images are decoded from the files every epoch"


def place(cache: ImageCache, placement: str, device: torch.device, *, pin: bool,
          log: Callable[[str], None] | None = None) -> ImageCache:
    """Move images/labels/masks to the device ("device"), or keep them in RAM ("ram"), pinned when
    `pin` and CUDA is used (a failed pin keeps them pageable, with a notice). "off": unchanged."""
    if placement == "device":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)
    elif placement == "ram" and pin and device.type == "cuda" and torch.cuda.is_available():
        def move(t: torch.Tensor) -> torch.Tensor:
            return t if t.is_pinned() else t.pin_memory()
    elif placement in ("ram", "off"):
        return cache
    else:
        raise ValueError(f"placement must be device, ram or off, not {placement!r}")
    try:
        masks = move(cache.masks) if cache.masks is not None else None
        return replace(cache, images=move(cache.images), labels=move(cache.labels), masks=masks)
    except RuntimeError as exc:
        if placement == "device":
            raise
        if log is not None:
            log(f"data cache: cannot pin {_human(cache.nbytes)} of RAM ({' '.join(str(exc).split())[:120]}); "
                "keeping it in pageable memory")
        return cache
