"""Segmentation recipe (train_unet.py): its flags, its data, the U-Net, and train()."""
from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt_lib
from .cli import check_positive, check_same_architecture, inheritable, resolve
from .data import segmentation as seg
from .data.fast_path import segmentation_batches
from .data.loaders import make_loader
from .device import resolve_channels_last
from .distributed import barrier
from .errors import UserError
from .models import build_model, load_weights_file
from .models.unet import MIN_SIZE
from .preflight import check_scaled_memory
from .reporting import plot_sample_grid
from .session import Session
from .tasks import SegmentationTask
from .trainer import Job, in_session, place_model, run_job

TASK = "segmentation"
# --demo: the generated shapes at full size, a narrow U-Net and settings that reach val Dice
# ~0.94 in about 40 s on 2 CPU cores (the seed is part of it: seed 42 stalls near 0.75).
DEMO_PRESET = {"epochs": 10, "batch_size": 8, "lr": 1e-3, "scale": 1.0, "width": 16,
               "optimizer": "adam", "weight_decay": 0.0, "seed": 0}


def resolve_args(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict | None]:
    """defaults < --config < --demo preset < checkpoint (--resume) < command line."""
    first, _ = resolve(parser, argv)
    layers: list[dict[str, Any]] = [DEMO_PRESET] if first.demo else []
    if not first.resume:
        return resolve(parser, argv, layers)[0], None
    ckpt = ckpt_lib.load_checkpoint(first.resume, task=TASK, need_train_state=True,
                                    trust=first.trust_checkpoint, start_from="-f/--load")
    layers += [inheritable(ckpt.get("config", {}), parser), {"output": str(Path(first.resume).parent)}]
    args, given = resolve(parser, argv, layers)
    check_same_architecture(args, given, ckpt, first.resume, ("width", "bilinear", "classes"))
    return args, ckpt


def inspect_data(args: argparse.Namespace, s: Session):
    """The image/mask pairs, their mask values and their (width, height) sizes, all checked."""
    data_dir = Path(args.data_dir)
    if args.demo:
        if s.is_main:
            seg.make_shapes_dataset(data_dir)
        barrier()
    pairs = seg.find_pairs(data_dir, log=s.log)
    mask_values, sizes = seg.inspect_pairs(pairs, args.check_images, show_progress=s.is_main)
    seg.check_classes(mask_values, args.classes)
    seg.check_min_size(pairs, sizes, args.scale, MIN_SIZE, "the U-Net (four 2x2 poolings)")
    if args.batch_size > 1:
        _check_same_size(pairs, sizes)
    return pairs, mask_values, sizes


def build_data(args: argparse.Namespace, s: Session, pairs, mask_values):
    data_dir = Path(args.data_dir)
    train, val = seg.split_pairs(pairs, args.validation, args.seed)
    s.held_out = (data_dir, [image for image, _ in val])
    loader_args = {"num_workers": s.num_workers, "pin_memory": s.pin_memory,
                   "rank": s.ctx.rank, "world_size": s.ctx.world_size}
    train_set = seg.SegmentationDataset(train, mask_values, args.scale, augment=True)
    val_set = seg.SegmentationDataset(val, mask_values, args.scale, augment=False)
    s.log(f"data: {len(train)} train / {len(val)} val pairs in {data_dir}, mask values {mask_values}, "
          f"scale {args.scale}")
    cached = segmentation_batches(train, val, mask_values, args, s)
    if cached is not None:
        return (*cached, mask_values, val_set)
    return (make_loader(train_set, args.batch_size, train=True, seed=args.seed, **loader_args),
            make_loader(val_set, args.batch_size, train=False, **loader_args), mask_values, val_set)


def _check_same_size(pairs, sizes) -> None:
    """A batch stacks its images: with -b > 1 they must share one size (the upright sizes that
    inspect_pairs read)."""
    a, first = sizes[0], pairs[0][0]
    for (second, _), b in zip(pairs, sizes, strict=True):
        if b != a:
            raise UserError(f"images differ in size ({first} is {a[0]}x{a[1]}, {second} is {b[0]}x{b[1]}); "
                            "batches need one size: pass -b 1, or resize the images and masks")


def build_unet(args: argparse.Namespace, s: Session, channels_last: bool, resuming: bool = False):
    """The U-Net, with -f/--load's weights on a new run. A resumed run never reopens that file: its
    weights come from the checkpoint (the original -f file may have moved since)."""
    model, spec = build_model("unet", args.classes, bilinear=bool(args.bilinear), base=int(args.width))
    if args.load and resuming:
        s.log(f"notice: -f/--load {args.load} ignored: a resumed run continues from the weights in "
              f"{args.resume}")
    elif args.load:
        load_weights_file(model, args.load, s.log, trust=args.trust_checkpoint, task="segmentation",
                          flag="-f/--load", shape_flags="this U-Net (-c/--classes, --bilinear, --width)")
        hint = resume_hint(args.load)
        if hint:
            s.log(hint)
    upsampling = "bilinear" if args.bilinear else "transposed conv"
    trained, plain = place_model(model, args, s, channels_last,
                                 f"U-Net ({upsampling} upsampling, width {args.width})")
    return trained, plain, spec


def resume_hint(path: str) -> str | None:
    """After -f/--load of one of this toolkit's checkpoints (always: the guide calls -f resuming, and
    an epoch checkpoint holds no train state), the line that says how to continue that run. The file
    is only peeked at (memory-mapped); None for other files."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError):
        return None  # a legacy (non-zip) or pickled file: load_weights_file has taken its weights
    if not isinstance(raw, dict) or raw.get("format") != ckpt_lib.FORMAT:
        return None
    target = Path(path) if isinstance(raw.get("train_state"), dict) else Path(path).parent / "checkpoint.pth"
    where = f"here: --resume {target}" if target.is_file() else "with that run's checkpoint.pth"
    return (f"notice: weights loaded; to continue the run with its optimizer and epoch, use --resume "
            f"({where}); -f/--load starts a new run at epoch 1")


SAMPLE_TITLES = ("image", "true mask", "predicted")


def sample_rows(model: torch.nn.Module, task: SegmentationTask, images: torch.Tensor,
                masks: torch.Tensor, device: torch.device) -> list[list[np.ndarray]]:
    """Per sample: input, true mask and predicted mask, as uint8 RGB pictures."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        pred = task.predictions(model(images.to(device))).cpu()
    model.train(was_training)
    top = max(task.num_classes - 1, 1)
    rows = []
    for img, true, guess in zip(images, masks, pred, strict=True):
        picture = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        if picture.shape[2] == 1:
            picture = np.repeat(picture, 3, axis=2)
        as_rgb = [np.repeat((m.numpy() * 255 // top).astype(np.uint8)[..., None], 3, axis=2)
                  for m in (true, guess)]
        rows.append([picture, *as_rgb])
    return rows


class ValSamples:
    """extra_output of a run: the first validation images with their true and predicted masks, as
    the TensorBoard image val/input_true_predicted every epoch and as val_samples.png (columns
    titled SAMPLE_TITLES, panels large enough to read). matplotlib takes a good part of a second,
    so the PNG is drawn after the first epoch, then at most once a minute, and by finish()."""

    EVERY_S = 60.0

    def __init__(self, model: torch.nn.Module, task: SegmentationTask, images: torch.Tensor,
                 masks: torch.Tensor, device: torch.device, path: Path):
        self.model, self.task, self.images, self.masks = model, task, images, masks
        self.device, self.path = device, path
        self.drawn = float("-inf")
        self.pending: list[list[np.ndarray]] | None = None  # the latest rows not yet drawn

    def __call__(self, state, tb) -> None:
        rows = sample_rows(self.model, self.task, self.images, self.masks, self.device)
        if tb is not None and tb.writer is not None:
            grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
            tb.writer.add_image("val/input_true_predicted", grid, state.epoch, dataformats="HWC")
        self.pending = rows
        if time.monotonic() - self.drawn >= self.EVERY_S:
            self.finish()

    def finish(self) -> None:
        if self.pending is not None:
            plot_sample_grid(self.pending, self.path, SAMPLE_TITLES)
            self.pending = None
            self.drawn = time.monotonic()


def train(args: argparse.Namespace, ckpt: dict | None) -> int:
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval", "classes",
                   "width")
    if not 0 < args.scale <= 1:
        raise UserError(f"-s/--scale must be in (0, 1], got {args.scale}")
    if args.keep_last < 0:
        raise UserError(f"--keep-last must be 0 (keep every epoch's file) or more, got {args.keep_last}")
    return in_session(args, ckpt, _train)


def _train(args: argparse.Namespace, ckpt: dict | None, s: Session) -> int:
    pairs, mask_values, sizes = inspect_data(args, s)
    if ckpt is not None and ckpt.get("mask_values") != mask_values:
        raise UserError(f"mask values in {args.resume} ({ckpt.get('mask_values')}) differ from those of "
                        f"{args.data_dir} ({mask_values}); resume on the same data")
    channels_last = resolve_channels_last(args.channels_last, s.device, s.log)
    model, plain, spec = build_unet(args, s, channels_last, resuming=ckpt is not None)
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    # before the data cache decodes every image: a size that cannot fit is one line, not exit 137
    check_scaled_memory(plain, height, width, args.scale, 3, args.batch_size, s.device, s.log)
    train_loader, val_loader, mask_values, val_set = build_data(args, s, pairs, mask_values)
    task = SegmentationTask(args.classes)
    samples = [val_set[i] for i in range(min(4, len(val_set)))]
    images = torch.stack([x for x, _ in samples])
    masks = torch.stack([y for _, y in samples])
    extra_output = ValSamples(plain, task, images, masks, s.device, s.output / "val_samples.png")
    meta: dict[str, Any] = {"mask_values": mask_values, "classes": [str(v) for v in mask_values],
                            "preprocessing": seg.preprocessing(args.scale)}
    job = Job(task=task, model=model, plain=plain, spec=spec, meta=meta, train_loader=train_loader,
              val_loader=val_loader, channels_last=channels_last, keep_last=args.keep_last,
              extra_output=extra_output,
              summary=lambda st: (f"done: best val Dice {st.best_metric:.4f} at epoch {st.best_epoch}; "
                                  f"best model {s.output / 'best_model.pth'}"))
    args.restore_best = True
    run_job(args, s, job, ckpt)
    if s.is_main:
        extra_output.finish()  # the last epoch's samples, if the minute had not come round
    return 0
