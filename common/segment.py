"""Segmentation recipe (train_unet.py): its flags, its data, the U-Net, and train()."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt_lib
from .cli import inheritable, resolve
from .data import segmentation as seg
from .data.fast_path import segmentation_batches
from .data.loaders import make_loader
from .device import resolve_channels_last
from .distributed import barrier
from .errors import UserError
from .models import build_model, load_weights_file
from .reporting import save_png
from .session import Session, check_positive
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
    return resolve(parser, argv, layers)[0], ckpt


def build_data(args: argparse.Namespace, s: Session):
    data_dir = Path(args.data_dir)
    if args.demo:
        if s.is_main:
            seg.make_shapes_dataset(data_dir)
        barrier()
    pairs = seg.find_pairs(data_dir, log=s.log)
    mask_values = seg.check_pairs(pairs, args.check_images, show_progress=s.is_main)
    seg.check_classes(mask_values, args.classes)
    if args.batch_size > 1:
        _check_same_size(pairs)
    train, val = seg.split_pairs(pairs, args.validation, args.seed)
    loader_args = {"num_workers": s.num_workers, "pin_memory": s.pin_memory,
                   "rank": s.ctx.rank, "world_size": s.ctx.world_size}
    train_set = seg.SegmentationDataset(train, mask_values, args.scale, augment=True)
    val_set = seg.SegmentationDataset(val, mask_values, args.scale, augment=False)
    s.log(f"data: {data_dir}: {len(train)} train / {len(val)} val pairs, mask values {mask_values}, "
          f"scale {args.scale}")
    cached = segmentation_batches(train, val, mask_values, args, s)
    if cached is not None:
        return (*cached, mask_values, val_set)
    return (make_loader(train_set, args.batch_size, train=True, seed=args.seed, **loader_args),
            make_loader(val_set, args.batch_size, train=False, **loader_args), mask_values, val_set)


def _check_same_size(pairs) -> None:
    """A batch stacks its images: with -b > 1 they must share one size (headers only are read)."""
    from PIL import Image

    sizes: dict[tuple[int, int], str] = {}
    for image, _ in pairs:
        with Image.open(image) as img:
            sizes.setdefault(img.size, image)
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise UserError(f"images differ in size ({first} is {a[0]}x{a[1]}, {second} is {b[0]}x{b[1]}); "
                            "batches need one size: pass -b 1, or resize the images and masks")


def build_unet(args: argparse.Namespace, s: Session, channels_last: bool):
    model, spec = build_model("unet", args.classes, bilinear=bool(args.bilinear), base=int(args.width))
    if args.load:
        load_weights_file(model, args.load, s.log, trust=args.trust_checkpoint)
    upsampling = "bilinear" if args.bilinear else "transposed conv"
    trained, plain = place_model(model, args, s, channels_last,
                                 f"U-Net ({upsampling} upsampling, width {args.width})")
    return trained, plain, spec


def sample_grid(model: torch.nn.Module, task: SegmentationTask, images: torch.Tensor,
                masks: torch.Tensor, device: torch.device) -> np.ndarray:
    """Rows of input | true mask | predicted mask, as one uint8 RGB picture."""
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
        rows.append(np.concatenate([picture, *as_rgb], axis=1))
    return np.concatenate(rows, axis=0)


def train(args: argparse.Namespace, ckpt: dict | None) -> int:
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval", "classes")
    if not 0 < args.scale <= 1:
        raise UserError(f"-s/--scale must be in (0, 1], got {args.scale}")
    return in_session(args, ckpt, _train)


def _train(args: argparse.Namespace, ckpt: dict | None, s: Session) -> int:
    train_loader, val_loader, mask_values, val_set = build_data(args, s)
    if ckpt is not None and ckpt.get("mask_values") != mask_values:
        raise UserError(f"mask values in {args.resume} ({ckpt.get('mask_values')}) differ from those of "
                        f"{args.data_dir} ({mask_values}); resume on the same data")
    channels_last = resolve_channels_last(args.channels_last, s.device, s.log)
    model, plain, spec = build_unet(args, s, channels_last)
    task = SegmentationTask(args.classes)
    samples = [val_set[i] for i in range(min(4, len(val_set)))]
    images = torch.stack([x for x, _ in samples])
    masks = torch.stack([y for _, y in samples])

    def extra_output(state, tb) -> None:
        grid = sample_grid(plain, task, images, masks, s.device)
        save_png(grid, s.output / "val_samples.png")
        if tb is not None and tb.writer is not None:
            tb.writer.add_image("val/input_true_predicted", grid, state.epoch, dataformats="HWC")

    meta: dict[str, Any] = {"mask_values": mask_values, "classes": [str(v) for v in mask_values],
                            "preprocessing": seg.preprocessing(args.scale)}
    job = Job(task=task, model=model, plain=plain, spec=spec, meta=meta, train_loader=train_loader,
              val_loader=val_loader, channels_last=channels_last, keep_last=args.keep_last,
              extra_output=extra_output,
              summary=lambda st: (f"done: best val Dice {st.best_metric:.4f} at epoch {st.best_epoch}; "
                                  f"best model {s.output / 'best_model.pth'}"))
    args.restore_best = True
    run_job(args, s, job, ckpt)
    return 0
