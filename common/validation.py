"""validate.py's work: a classifier on class folders, a U-Net on imgs/ + masks/, and the list of
images a training run held out for validation.

A run that draws its validation images from the training folder (--val-split of one folder,
train_unet.py's -v percent) writes that draw to val_files.txt in its output folder, so that
`validate.py --files out/val_files.txt` measures the model on images it did not train on: the
same folder without the list holds the training images too, and its score is not a held-out one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .data.images import IMAGE_EXTENSIONS
from .errors import UserError

HELD_OUT = "val_files.txt"
TEST_HELD_OUT = "test_files.txt"  # the behaviour pipeline's final split: recording ids
_ROOT_TAG = "# data-dir: "

T = TypeVar("T")


def _relative(path: str | os.PathLike, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def held_out_text(root: Path, paths: Iterable[str | os.PathLike], *, ids: bool = False,
                  what: str = "the images this run held out for validation") -> str:
    """val_files.txt: a header naming the folder the paths are relative to, then one image per line
    (ids=True: recording ids as the data loader names them, already relative to root)."""
    lines = [f"{_ROOT_TAG}{root}",
             f"# {what}; evaluate on them only with",
             f"#   python validate.py --model <best_model.pth> --data-dir {root} --files <this file>"]
    return "\n".join(lines + sorted(str(p) if ids else _relative(p, root) for p in paths)) + "\n"


def held_out_root(listing: Path) -> Path | None:
    """The data folder a val_files.txt is relative to (its header), or None."""
    try:
        with open(listing, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n")
    except OSError:
        return None
    return Path(first[len(_ROOT_TAG):]) if first.startswith(_ROOT_TAG) else None


def read_held_out(listing: Path, images: bool = True) -> list[str]:
    """The relative paths (recording ids with images=False) a --files list names (blank lines and
    # comments left out)."""
    if not listing.is_file():
        raise UserError(f"--files {listing} does not exist; pass the val_files.txt that training wrote "
                        "in its output folder")
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--files {listing} cannot be read ({exc}); pass a text file with one "
                        "image path per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise UserError(f"--files {listing} lists no images; pass the val_files.txt that training wrote")
    if images and not any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in names):
        raise UserError(f"--files {listing} names no image file (its first line: {names[0][:60]!r}); pass "
                        "the val_files.txt that training wrote, one image path per line")
    return names


def keep_listed(items: Sequence[T], path_of: Callable[[T], str], data_dir: Path,
                listing: Path) -> list[T]:
    """The items whose image (relative to data_dir) the --files list names; every listed image must
    be there, or it is one line saying how many are missing and which --data-dir the list is for."""
    names = read_held_out(listing)
    found = {_relative(path_of(item), data_dir): item for item in items}
    check_all_listed(names, found, listing, data_dir, "image")
    return [found[n] for n in dict.fromkeys(names)]


def check_all_listed(names: Sequence[str], found: Collection[str], listing: Path, data_dir: Path,
                     kind: str) -> None:
    """Every name a --files list holds is among `found`, or one line saying how many are missing
    and which --data-dir the list is for (its header)."""
    missing = [n for n in names if n not in found]
    if missing:
        root = held_out_root(listing)
        where = (f"; the list is for --data-dir {root}" if root is not None and root != data_dir
                 else "; pass the --data-dir the model was trained on")
        raise UserError(f"--files {listing}: {len(missing)} of {len(names)} listed {kind}(s) are not in "
                        f"{data_dir}, e.g. {missing[0]}{where}")


def readable_samples(samples: list[tuple[str, int]], args) -> list[tuple[str, int]]:
    from .data.images import check_images

    bad = check_images([p for p, _ in samples], args.check_images)
    if bad and not args.skip_bad_images:
        raise UserError(f"{len(bad)} unreadable image(s), e.g. {bad[0][0]}: {bad[0][1]}; remove them "
                        "or pass --skip-bad-images")
    dropped = {p for p, _ in bad}
    return [s for s in samples if s[0] not in dropped]


def report(metrics: dict, scores: dict, classes: Sequence[str], count: int, unit: str = "images") -> str:
    lines = [f"{unit}: {count}", f"loss: {metrics['loss']:.4f}",
             f"top-1 accuracy: {100 * metrics['acc']:.2f}%"]
    if "top5" in metrics:
        lines.append(f"top-5 accuracy: {100 * metrics['top5']:.2f}%")
    width = max(8, *(len(c) for c in classes))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}}  {scores['precision'][i]:9.4f}  {scores['recall'][i]:6.4f}  "
                     f"{scores['f1'][i]:6.4f}  {scores['support'][i]:7d}")
    return "\n".join(lines)


def report_folder(args) -> Path:
    """Where the plots go: --output-dir, else a validation/ folder of our own beside the model (so
    no file the user keeps beside the checkpoint is replaced); created and checked before the work."""
    from .outdir import prepare_output_file

    folder = Path(args.output_dir) if args.output_dir else Path(args.model).parent / "validation"
    if folder.is_file():
        raise UserError(f"--output-dir {folder} is a file; pass a folder for the plots")
    prepare_output_file(folder / "confusion_matrix.png", "--output-dir")
    return folder


def write_results_file(path: str, result: dict) -> None:
    from .outdir import write_atomically

    text = json.dumps(result, indent=2) + "\n"
    write_atomically(path, lambda fh: fh.write(text), name=f"--results-file {path}")


def _scope(args) -> dict[str, Any]:
    return {"files": str(args.files)} if args.files else {}


def validate_segmentation(loaded, args, s) -> int:
    """Dice and IoU (per image, averaged) on data-dir/imgs + data-dir/masks (or the images --files
    lists), at the checkpoint's scale; mask values come from the checkpoint (an unknown value is
    an error naming the file)."""
    from .data import segmentation as seg
    from .data.loaders import make_loader
    from .engine import evaluate
    from .tasks import SegmentationTask

    data_dir = Path(args.data_dir)
    pairs = seg.find_pairs(data_dir, log=s.log)
    if args.files:
        pairs = keep_listed(pairs, lambda pair: pair[0], data_dir, Path(args.files))
    seg.check_pairs(pairs, args.check_images, show_progress=True)
    mask_values = loaded.mask_values
    if not mask_values:
        raise UserError(f"{args.model} has no mask values; use a checkpoint written by train_unet.py")
    scale = args.scale if args.scale is not None else loaded.preprocessing.get("scale", 0.5)
    dataset = seg.SegmentationDataset(pairs, mask_values, scale)
    loader = make_loader(dataset, args.batch_size, train=False, num_workers=s.num_workers,
                         pin_memory=s.pin_memory)
    task = SegmentationTask(loaded.spec["kwargs"]["num_classes"])
    metrics = task.summarize(evaluate(loaded.model, task, loader, s.precision, s.device,
                                      show_progress=True))
    print(f"pairs: {len(pairs)}\nloss: {metrics['loss']:.4f}\nDice: {metrics['dice']:.4f}\n"
          f"IoU: {metrics['iou']:.4f}")
    if args.results_file:
        result = {"checkpoint": str(args.model), "data_dir": str(args.data_dir), **_scope(args),
                  "pairs": len(pairs), "scale": scale, "metrics": metrics, "mask_values": mask_values}
        write_results_file(args.results_file, result)
        print(f"results: {args.results_file}")
    return 0


def validate_classification(loaded, args, s) -> int:
    """Loss, top-1 (top-5), per-class scores and the confusion matrix on data-dir's class folders
    (or the images --files lists)."""
    import torch

    from .data.images import ImageDataset, eval_transform
    from .data.loaders import make_loader
    from .engine import evaluate
    from .inference import folder_samples, output_width
    from .metrics import per_class_scores
    from .reporting import plot_confusion_matrix
    from .tasks import ClassificationTask

    if args.scale is not None:
        s.log("notice: -s/--scale is for U-Net models; ignored for this classifier")
    data_dir = Path(args.data_dir)
    classes, samples, notes = folder_samples(loaded, data_dir, output_width(loaded, s.device))
    for note in notes:
        s.log(f"notice: {note}")
    if args.files:
        samples = keep_listed(samples, lambda sample: sample[0], data_dir, Path(args.files))
    samples = readable_samples(samples, args)
    loader = make_loader(ImageDataset(samples, eval_transform(loaded.preprocessing)), args.batch_size,
                         train=False, num_workers=s.num_workers, pin_memory=s.pin_memory)
    task = ClassificationTask(len(classes))
    predicted: list[torch.Tensor] = []  # argmax per batch, kept on the device until the end
    hook = loaded.model.register_forward_hook(lambda _m, _i, out: predicted.append(out.argmax(1)))
    try:
        totals = evaluate(loaded.model, task, loader, s.precision, s.device, show_progress=True)
    finally:
        hook.remove()
    metrics = task.summarize(totals)
    matrix = totals["confusion"].tolist()
    scores = per_class_scores(totals["confusion"])
    print(report(metrics, scores, classes, len(samples)))
    plot_confusion_matrix(matrix, classes, args.report_dir / "confusion_matrix.png")
    print(f"confusion matrix: {args.report_dir / 'confusion_matrix.png'}")
    if args.results_file:
        labels = torch.cat(predicted).tolist() if predicted else []
        per_image = [{"path": p, "true": classes[t], "predicted": classes[q]}
                     for (p, t), q in zip(samples, labels, strict=True)]
        result = {"checkpoint": str(args.model), "data_dir": str(args.data_dir), **_scope(args),
                  "images": len(samples), "metrics": metrics, "classes": classes, "per_class": scores,
                  "confusion_matrix": matrix, "predictions": per_image}
        write_results_file(args.results_file, result)
        print(f"results: {args.results_file}")
    return 0
