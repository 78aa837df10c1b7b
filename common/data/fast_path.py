"""--data-cache: the choice between the decode-once path (data/cache.py + device_batches.py)
and the DataLoader path, and the glue that builds the cached batches for a recipe."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..distributed import barrier
from ..errors import UserError
from .batch_aug import BatchAugment
from .cache import ImageCache, build_array_cache, build_image_cache, choose_placement, estimate_bytes, place
from .device_batches import CachedBatches
from .images import ImageDataset

# --augment (and fine-tuning's light augmentation) -> the batch augmentation's kind
BATCH_KINDS = {"standard": "standard", "cifar": "cifar", "none": "eval", "light": "light"}


def plan(mode: str, nbytes: int, device: torch.device, log: Callable[[str], None]) -> str:
    """'device', 'ram' or 'off', said in one line."""
    placement, reason = choose_placement(mode, nbytes, device)
    log(reason)
    return placement


def _image_cache(dataset: Any, size: int, args, s) -> ImageCache | None:
    """The decoded images of a folder data set or a torchvision set (None: neither)."""
    if isinstance(dataset, ImageDataset):
        cache_dir = Path(args.cache_dir) if getattr(args, "cache_dir", None) else None
        return build_image_cache(dataset.samples, size, cache_dir=cache_dir, data_root=Path(args.data_dir),
                                 skip_bad=bool(getattr(args, "skip_bad_images", False)),
                                 show_progress=s.is_main, log=s.log)
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # torchvision's in-memory sets
        native = tuple(dataset.data.shape[1:3])
        return build_array_cache(dataset.data, dataset.targets, None if native == (size, size) else size)
    return None


def _kept_files(dataset: Any, cache: ImageCache) -> list[dict[str, str]] | None:
    """The file of each cached row of a folder data set (its samples less the skipped ones, in
    order); None for a torchvision set, which has no files."""
    if not isinstance(dataset, ImageDataset):
        return None
    bad = {path for path, _ in cache.bad}
    return [{"file": str(path)} for path, _ in dataset.samples if str(path) not in bad]


def _ordered_build(s, build: Callable[[], Any]) -> Any:
    """Rank 0 decodes and writes the cache file first; the other ranks then read it."""
    if s.ctx.enabled and not s.is_main:
        barrier()
        return build()
    result = build()
    if s.ctx.enabled:
        barrier()
    return result


def classification_batches(train_set: Any, val_set: Any, pre: dict[str, Any], args, s,
                           kind: str) -> tuple[CachedBatches, CachedBatches] | None:
    """Cached train and val batches for image classification, or None for the DataLoader path."""
    mode = getattr(args, "data_cache", "off")
    if mode == "off":
        s.log("data cache: off (--data-cache off): the images are decoded and augmented per image, "
              "every epoch")
        return None
    size = int(pre["resize_size"])
    nbytes = estimate_bytes(len(train_set) + len(val_set), 3, size, size)
    placement = plan(mode, nbytes, s.device, s.log)
    if placement == "off":
        return None
    caches = _ordered_build(s, lambda: (_image_cache(train_set, size, args, s),
                                        _image_cache(val_set, size, args, s)))
    if any(c is None for c in caches):
        if mode != "auto":
            raise UserError(f"--data-cache {mode} does not support this data set; use --data-cache off")
        return None
    _record_bad(caches, s)
    _say_built(caches, s)
    train, val = (place(c, placement, s.device, pin=s.pin_memory) for c in caches)
    mean, std, out = pre["mean"], pre["std"], int(pre["img_size"])
    hflip = not getattr(args, "no_hflip", False)
    train_aug = BatchAugment(out, mean, std, kind=BATCH_KINDS[kind], hflip=hflip,
                             rotation=10.0 if kind == "light" else 15.0)
    eval_aug = BatchAugment(out, mean, std, kind="eval")
    common = {"device": s.device, "rank": s.ctx.rank, "world_size": s.ctx.world_size}
    return (CachedBatches(train.images, train.labels, args.batch_size, augment=train_aug, train=True,
                          seed=args.seed, sample_files=_kept_files(train_set, caches[0]), **common),
            CachedBatches(val.images, val.labels, args.batch_size, augment=eval_aug, train=False, **common))


def _say_built(caches, s) -> None:
    """What was decoded now (the reuse of a cache file is said by the cache itself)."""
    for cache in caches:
        if not cache.reused:
            where = f"saved to {cache.file}" if cache.file is not None else "not saved to a file"
            s.log(f"data cache: decoded {len(cache)} images once ({cache.nbytes / 1e6:.1f} MB, {where})")


def _record_bad(caches, s) -> None:
    bad = [item for cache in caches for item in cache.bad]
    if bad:
        s.bad_images = list(s.bad_images) + bad
        s.log(f"skipping {len(bad)} unreadable image(s) found while caching; listed in bad_images.txt")
    if any(len(cache.labels) == 0 for cache in caches):
        raise UserError("no readable images left after --skip-bad-images; see bad_images.txt")


def segmentation_batches(train_pairs, val_pairs, mask_values, args, s, *, in_chans: int = 3,
                         vflip: bool = True) -> tuple[CachedBatches, CachedBatches] | None:
    """Cached train and val batches for U-Net training (image and mask decoded, scaled and stored
    together; flips applied to both on the device), or None for the DataLoader path."""
    from .cache import build_pair_cache, pair_cache_size

    mode = getattr(args, "data_cache", "off")
    if mode == "off":
        return None
    try:
        width, height = pair_cache_size([*train_pairs, *val_pairs], args.scale)
    except UserError:
        if mode != "auto":
            raise
        s.log("data cache: off (the images differ in size; the cache holds one size)")
        return None
    n = len(train_pairs) + len(val_pairs)
    placement = plan(mode, estimate_bytes(n, in_chans + 1, height, width), s.device, s.log)
    if placement == "off":
        return None
    cache_dir = Path(args.cache_dir) if getattr(args, "cache_dir", None) else None
    options = {"cache_dir": cache_dir, "data_root": Path(args.data_dir), "show_progress": s.is_main,
               "log": s.log}
    caches = _ordered_build(s, lambda: tuple(build_pair_cache(p, mask_values, args.scale, in_chans, **options)
                                             for p in (train_pairs, val_pairs)))
    _say_built(caches, s)
    train, val = (place(c, placement, s.device, pin=s.pin_memory) for c in caches)
    zeros, ones = [0.0] * in_chans, [1.0] * in_chans
    common = {"device": s.device, "rank": s.ctx.rank, "world_size": s.ctx.world_size, "masks": True}
    flips = BatchAugment(None, zeros, ones, kind="flip", hflip=True, vflip=vflip)
    files = [{"file": str(image), "mask": str(mask)} for image, mask in train_pairs]
    return (CachedBatches(train.images, train.masks, args.batch_size, augment=flips, train=True,
                          seed=args.seed, sample_files=files, **common),
            CachedBatches(val.images, val.masks, args.batch_size, train=False,
                          augment=BatchAugment(None, zeros, ones, kind="eval"), **common))
