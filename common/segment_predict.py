"""Masks from a segmentation checkpoint: what predict.py does for U-Net models. Masks are
written at the original image size with the original mask values (a 0/1 set stays 0/1), and
--viz writes a visible overlay beside each mask, so a mask never looks "all black" by surprise.
--no-save writes no file at all (neither masks nor overlays): the console lines remain."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import segmentation as seg
from .data.images import DECODE_ERRORS, describe_error, load_rgb
from .errors import UserError
from .inference import LoadedModel
from .outdir import write_atomically

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


MASK_FORMATS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
LOSSY = (".jpg", ".jpeg")  # written, with a notice: JPEG compression changes mask values


def output_paths(inputs: Sequence[Path], outputs: Sequence[str] | None) -> list[Path]:
    if not outputs:
        return [p.with_name(f"{p.stem}{seg.PREDICT_SUFFIXES[0]}.png") for p in inputs]
    if len(outputs) != len(inputs):
        raise UserError(f"{len(inputs)} input image(s) but {len(outputs)} output name(s); give one -o "
                        "per input, or none for <name>_OUT.png")
    wrong = next((o for o in outputs if Path(o).suffix.lower() not in MASK_FORMATS), None)
    if wrong is not None:
        raise UserError(f"-o {wrong}: a mask is written as an image; give a file name ending in "
                        f"{', '.join(MASK_FORMATS)} (PNG keeps the mask values exactly)")
    return [Path(o) for o in outputs]


def read_input(path: Path, channels: int) -> Image.Image | str:
    """The image as load_image decodes it (EXIF orientation applied), or why it cannot be read."""
    try:
        image = load_rgb(path)
    except DECODE_ERRORS as exc:
        return describe_error(exc)
    return image.convert("L") if channels == 1 else image


@torch.inference_mode()
def predict_index(loaded: LoadedModel, original: Image.Image, scale: float, threshold: float, device,
                  precision) -> np.ndarray:
    """Class index per pixel of `original` (decoded by read_input), at its size."""
    image = seg.rescale(original, scale)
    with precision.autocast():
        logits = loaded.model(seg.to_tensor(image).unsqueeze(0).to(device)).float()
    if logits.shape[1] == 1:
        index = (torch.sigmoid(logits[0, 0]) > threshold).long()
    else:
        index = logits[0].argmax(dim=0)
    return seg.resize_nearest(index.cpu().numpy(), original.size)


def overlay(image: Image.Image, index: np.ndarray) -> Image.Image:
    """The image with each foreground class tinted in its own colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = PALETTE[np.asarray(index) % len(PALETTE)].astype(np.float32)
    mixed = np.where(np.asarray(index)[..., None] > 0, 0.45 * rgb + 0.55 * colours, rgb)
    return Image.fromarray(mixed.astype(np.uint8))


def notices(loaded: LoadedModel, args, given: Collection[str] = ()) -> list[str]:
    """What the flags do not do for this model, said once before the first image: -t with a
    softmax model (argmax decides, no threshold), --viz with --no-save (nothing is written)."""
    lines = []
    channels = (loaded.spec or {}).get("kwargs", {}).get("num_classes")
    if "mask_threshold" in given and channels is not None and channels > 1:
        lines.append(f"notice: -t/--mask-threshold {args.mask_threshold:g} is not used: {loaded.path} has "
                     f"{channels} output channels (one per class) and each pixel takes the most likely "
                     "class; a threshold applies to one-channel models (train_unet.py -c 1)")
    if args.no_save and args.viz:
        lines.append("notice: -n/--no-save writes no files, the overlays of -v/--viz neither; drop -n to "
                     "write the masks and their overlays")
    return lines


def run(loaded: LoadedModel, inputs: Sequence[Path], args, s, given: Collection[str] = ()) -> int:
    """A mask (and overlay) per readable input; an unreadable one is listed and skipped. Exit 0 when
    at least one image was predicted; none is a UserError. given: the flags typed on the command line."""
    check_flags(loaded, args.classes, args.bilinear)
    if not 0 < args.mask_threshold < 1:
        raise UserError(f"-t/--mask-threshold is a probability between 0 and 1, got {args.mask_threshold:g}")
    for line in notices(loaded, args, given):
        s.log(line)
    mask_values = loaded.mask_values or [0, 255]
    scale = args.scale if args.scale is not None else loaded.preprocessing.get("scale", 0.5)
    seg.check_scale(scale)
    channels = loaded.preprocessing.get("channels", 3)
    targets = output_paths(inputs, args.output)
    lossy = [str(t) for t in targets if t.suffix.lower() in LOSSY]
    if lossy and not args.no_save:
        s.log(f"notice: {lossy[0]}{' and others' if len(lossy) > 1 else ''}: JPEG compression changes "
              "some mask values; name the masks .png to keep them exact")
    bad: list[tuple[Path, str]] = []
    for path, target in zip(inputs, targets, strict=True):
        original = read_input(path, channels)
        if isinstance(original, str):
            bad.append((path, original))
            print(f"{path}: unreadable ({original})")
            continue
        index = predict_index(loaded, original, scale, args.mask_threshold, s.device, s.precision)
        print(_write_outputs(path, target, original, index, mask_values, args))
    report_skipped(len(inputs), bad)
    return 0


def _write_outputs(path: Path, target: Path, original: Image.Image, index: np.ndarray, mask_values,
                   args) -> str:
    """Mask (unless --no-save) and overlay (--viz); the console line saying what was written."""
    line = f"{path}: foreground {100 * float((index > 0).mean()):.1f}% of pixels"
    if not args.no_save:
        mask = Image.fromarray(seg.index_to_mask(index, mask_values))
        write_atomically(target, lambda fh: mask.save(fh, format=_format(target)), binary=True)
        line += f" -> {target}"
    if args.viz and not args.no_save:
        viz = target.with_name(f"{target.stem}_viz.png")
        picture = overlay(original, index)
        write_atomically(viz, lambda fh: picture.save(fh, format="PNG"), binary=True)
        line += f" (overlay {viz})"
    return line


def _format(path: Path) -> str:
    """PIL's format name for a mask file's extension (PNG when it has none PIL knows)."""
    Image.init()
    return Image.EXTENSION.get(path.suffix.lower(), "PNG")


def report_skipped(total: int, bad: Sequence[tuple[Path | str, str]]) -> None:
    """The summary line of a prediction run; no input predicted at all is a UserError (exit 2)."""
    if bad and len(bad) == total:
        first, why = bad[0]
        more = f" (and {total - 1} more, listed above)" if total > 1 else ""
        raise UserError(f"none of the {total} input image(s) could be read: {first}: {why}{more}; "
                        "pass image files (JPEG, PNG, ...) that open in an image viewer")
    print(f"{total - len(bad)} image(s) predicted" + (f", {len(bad)} unreadable and skipped" if bad else ""))
