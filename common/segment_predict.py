"""Masks from a segmentation checkpoint: what predict.py does for U-Net models. Masks are
written at the original image size with the original mask values (a 0/1 set stays 0/1), and
--viz writes a visible overlay beside each mask, so a mask never looks "all black" by surprise."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import segmentation as seg
from .errors import UserError
from .inference import LoadedModel

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)


def check_flags(loaded: LoadedModel, classes: int | None, bilinear: bool) -> None:
    """-c and --bilinear are taken from the checkpoint; given, they must agree with it."""
    kwargs = (loaded.spec or {}).get("kwargs", {})
    if classes is not None and classes != kwargs.get("num_classes"):
        raise UserError(f"-c {classes} contradicts {loaded.path}, trained with "
                        f"{kwargs.get('num_classes')} classes; drop -c (it is read from the checkpoint)")
    if bilinear and not kwargs.get("bilinear", False):
        raise UserError(f"--bilinear contradicts {loaded.path}, trained with transposed-conv upsampling; "
                        "drop --bilinear (it is read from the checkpoint)")


def output_paths(inputs: Sequence[Path], outputs: Sequence[str] | None) -> list[Path]:
    if not outputs:
        return [p.with_name(f"{p.stem}_OUT.png") for p in inputs]
    if len(outputs) != len(inputs):
        raise UserError(f"{len(inputs)} input image(s) but {len(outputs)} output name(s); give one -o "
                        "per input, or none for <name>_OUT.png")
    return [Path(o) for o in outputs]


@torch.inference_mode()
def predict_index(loaded: LoadedModel, path: Path, scale: float, threshold: float, device, precision
                  ) -> tuple[np.ndarray, Image.Image]:
    """Class index per pixel at the image's original size, and the original image."""
    channels = loaded.preprocessing.get("channels", 3)
    original = seg.load_image(str(path), 1.0, channels)
    image = seg.load_image(str(path), scale, channels)
    with precision.autocast():
        logits = loaded.model(seg.to_tensor(image).unsqueeze(0).to(device)).float()
    if logits.shape[1] == 1:
        index = (torch.sigmoid(logits[0, 0]) > threshold).long()
    else:
        index = logits[0].argmax(dim=0)
    return seg.resize_nearest(index.cpu().numpy(), original.size), original


def overlay(image: Image.Image, index: np.ndarray) -> Image.Image:
    """The image with each foreground class tinted in its own colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = PALETTE[np.asarray(index) % len(PALETTE)].astype(np.float32)
    mixed = np.where(np.asarray(index)[..., None] > 0, 0.45 * rgb + 0.55 * colours, rgb)
    return Image.fromarray(mixed.astype(np.uint8))


def run(loaded: LoadedModel, inputs: Sequence[Path], args, s) -> int:
    check_flags(loaded, args.classes, args.bilinear)
    mask_values = loaded.checkpoint["mask_values"] if loaded.checkpoint else [0, 255]
    scale = args.scale if args.scale is not None else loaded.preprocessing.get("scale", 0.5)
    targets = output_paths(inputs, args.output)
    for path, target in zip(inputs, targets, strict=True):
        index, original = predict_index(loaded, path, scale, args.mask_threshold, s.device, s.precision)
        share = float((index > 0).mean())
        line = f"{path}: foreground {100 * share:.1f}% of pixels"
        if not args.no_save:
            mask = seg.index_to_mask(index, mask_values)
            Image.fromarray(mask).save(target)
            line += f" -> {target}"
        if args.viz:
            viz = target.with_name(f"{target.stem}_viz.png")
            overlay(original, index).save(viz)
            line += f" (overlay {viz})"
        print(line)
    return 0
