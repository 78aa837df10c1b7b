"""Image classification recipe shared by gpu_train.py and multi_gpu_train.py: its flags,
its data, its model, and train() which wires them into the engine."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt_lib
from .cli import add_device_args, add_runtime_args, add_training_args, inheritable, resolve
from .data.builtin import TORCHVISION_SETS, make_demo_dataset, torchvision_classes, torchvision_dataset
from .data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    check_images,
    eval_transform,
    folder_splits,
    preprocessing,
    train_transform,
)
from .data.loaders import make_loader
from .device import resolve_channels_last
from .distributed import barrier, restart_count
from .errors import UserError
from .models import build_model, list_models, load_weights_file
from .session import (
    Session,
    check_positive,
)
from .tasks import ClassificationTask
from .trainer import Job, in_session, place_model, run_job

TASK = "classification"
DEMO_PRESET = {"model": "small_cnn", "img_size": 64, "epochs": 12, "batch_size": 32, "lr": 3e-3,
               "weight_decay": 1e-4, "data_dir": "./demo_data", "output": "./demo_output",
               "warmup_epochs": 1.0}


def add_classification_args(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", default="./dataset",
                   help="folder with train/ and val/ class folders (default: ./dataset)")
    d.add_argument("--dataset", choices=["imagefolder", *TORCHVISION_SETS], default="imagefolder",
                   help="imagefolder (default) or a torchvision set read from --data-dir")
    d.add_argument("--download", action="store_true", help="download --dataset (needs internet)")
    d.add_argument("--val-split", type=float, default=0.2,
                   help="fraction of train/ held out when there is no val/ folder (default: 0.2)")
    d.add_argument("--img-size", type=int, default=224, help="input size in pixels (default: 224)")
    d.add_argument("--no-hflip", action="store_true",
                   help="no horizontal flips (for data where mirroring changes the class)")
    d.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                   help="check every image before epoch 1 (default: fast)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="train without unreadable images (listed in bad_images.txt) instead of stopping")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="efficientnet_b0",
                   help="torchvision or timm name, or small_cnn (default: efficientnet_b0)")
    m.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: counted from the class folders)")
    m.add_argument("--pretrained", action="store_true",
                   help="start from the library's weights (needs network)")
    m.add_argument("--weights", metavar="PATH", help="start from weights in a local file")
    m.add_argument("--list-models", action="store_true", help="list the model names and exit")
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="./output", help="output folder (default: ./output)")
    o.add_argument("--demo", action="store_true",
                   help="write a small built-in two-class image set and train on it")
    o.add_argument("--demo-images", type=int, default=200,
                   help="images per class of the --demo set (default: 200)")
    add_training_args(parser, batch_size=32, epochs=50, lr=1e-3)
    add_device_args(parser)
    add_runtime_args(parser)
    add_distributed_args(parser)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Settings that matter under torchrun (harmless in a single process)."""
    g = parser.add_argument_group("distributed (under torchrun)")
    g.add_argument("--sync-bn", action="store_true",
                   help="batch-norm statistics over all processes (SyncBatchNorm)")
    g.add_argument("--lr-scale", choices=["none", "linear"], default="none",
                   help="linear: multiply --lr by global batch / --base-batch-size (default: none)")
    g.add_argument("--base-batch-size", type=int, default=None,
                   help="batch size --lr was tuned for (default: --batch-size x accumulation, "
                        "so --lr-scale linear scales by the number of processes)")
    g.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a process waits for the others before the job fails (1800)")


def resolve_args(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict | None]:
    """Layers: defaults < --config < presets (--demo, --dataset) < checkpoint (--resume) < argv."""
    first, given = resolve(parser, argv)
    layers: list[dict[str, Any]] = []
    if first.demo:
        layers.append(DEMO_PRESET)
    if first.dataset in TORCHVISION_SETS:
        layers.append({"img_size": TORCHVISION_SETS[first.dataset][3]})
    ckpt = None
    auto = Path(resolve(parser, argv, layers)[0].output) / "checkpoint.pth"  # with the presets
    if not first.resume and restart_count() > 0 and auto.is_file():
        first.resume = str(auto)  # torchrun restarted the job (--max-restarts): continue it
        argv = [*(argv or []), "--resume", str(auto)]
    if first.resume:
        ckpt = ckpt_lib.load_checkpoint(first.resume, task=TASK, need_train_state=True)
        layers.append(inheritable(ckpt.get("config", {}), parser))
        layers.append({"output": str(Path(first.resume).parent)})
    args, _ = resolve(parser, argv, layers)
    return args, ckpt


@dataclass
class Preparation:
    """How build_data prepares images when not as for training from scratch (fine-tuning):
    the preprocessing to use instead of the data set's default, and the training transform
    built from it instead of the training recipe's augmentation."""
    pre: dict[str, Any] | None = None
    train_transform: Callable[[dict[str, Any]], Any] | None = None


@dataclass
class ClassificationData:
    classes: list[str]
    train_loader: DataLoader
    val_loader: DataLoader
    preprocessing: dict[str, Any]
    description: str


def _train_tf(args, prep: Preparation, pre: dict[str, Any]):
    if prep.train_transform is not None:
        return prep.train_transform(pre)
    return train_transform(pre, hflip=not args.no_hflip)


def _torchvision_data(args, s: Session, prep: Preparation) -> tuple[list[str], Any, Any, dict[str, Any], str]:
    _, mean, std, _ = TORCHVISION_SETS[args.dataset]
    pre = prep.pre or preprocessing(args.img_size, mean, std, crop_pct=1.0)
    root = Path(args.data_dir)
    train = torchvision_dataset(args.dataset, root, True, args.download, _train_tf(args, prep, pre))
    val = torchvision_dataset(args.dataset, root, False, False, eval_transform(pre))
    return torchvision_classes(train), train, val, pre, f"{args.dataset} in {root}"


def _folder_data(args, s: Session, prep: Preparation) -> tuple[list[str], Any, Any, dict[str, Any], str]:
    splits = folder_splits(Path(args.data_dir), args.val_split, args.seed)
    train, val = _drop_bad_images(splits.train, splits.val, args, s)
    pre = prep.pre or preprocessing(args.img_size, IMAGENET_MEAN, IMAGENET_STD)
    return (splits.classes, ImageDataset(train, _train_tf(args, prep, pre)),
            ImageDataset(val, eval_transform(pre)), pre, splits.description)


def _drop_bad_images(train, val, args, s: Session):
    bad = check_images([p for p, _ in train + val], args.check_images, show_progress=s.is_main)
    if not bad:
        return train, val
    listing = "; ".join(f"{p}: {why}" for p, why in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if not args.skip_bad_images:
        raise UserError(f"{len(bad)} unreadable image(s): {listing}. Remove or replace them, or "
                        "pass --skip-bad-images to train without them")
    s.bad_images = bad
    s.log(f"skipping {len(bad)} unreadable image(s); they are listed in bad_images.txt")
    dropped = {p for p, _ in bad}
    train = [x for x in train if x[0] not in dropped]
    val = [x for x in val if x[0] not in dropped]
    if not train or not val:
        raise UserError("no readable images left after --skip-bad-images; see bad_images.txt")
    return train, val


def build_data(args: argparse.Namespace, s: Session, prep: Preparation | None = None) -> ClassificationData:
    prep = prep or Preparation()
    img_size = prep.pre["img_size"] if prep.pre else args.img_size
    if img_size < 8:
        raise UserError(f"--img-size must be at least 8, got {img_size}")
    if getattr(args, "demo", False):
        if s.is_main:
            make_demo_dataset(Path(args.data_dir), images_per_class=args.demo_images)
        barrier()
    builder = _torchvision_data if args.dataset in TORCHVISION_SETS else _folder_data
    classes, train, val, pre, description = builder(args, s, prep)
    if args.num_classes is not None and args.num_classes != len(classes):
        raise UserError(f"--num-classes {args.num_classes} but {args.data_dir} has {len(classes)} "
                        f"classes ({', '.join(classes[:10])}); drop --num-classes or fix the folders")
    if len(classes) < 2:
        raise UserError(f"{args.data_dir} has only one class ({classes[0]}); classification needs "
                        "at least two class folders")
    loader_args = {"num_workers": s.num_workers, "pin_memory": s.pin_memory,
                   "rank": s.ctx.rank, "world_size": s.ctx.world_size}
    return ClassificationData(
        classes=classes,
        train_loader=make_loader(train, args.batch_size, train=True, seed=args.seed, **loader_args),
        val_loader=make_loader(val, args.batch_size, train=False, **loader_args),
        preprocessing=pre,
        description=f"{description}: {len(train)} train / {len(val)} val images, {len(classes)} classes")


def build_classifier(args: argparse.Namespace, num_classes: int, s: Session,
                     channels_last: bool) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(model to train, plain model, spec). The first may be compiled; both share weights."""
    model, spec = build_model(args.model, num_classes, pretrained=args.pretrained)
    if args.weights:
        load_weights_file(model, args.weights, s.log)
    trained, plain = place_model(model, args, s, channels_last, f"{args.model} ({spec['source']})")
    return trained, plain, spec


def train(args: argparse.Namespace, ckpt: dict | None) -> int:
    if args.list_models:
        for source, names in list_models().items():
            print(f"{source} ({len(names)}): {' '.join(names)}")
        return 0
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval")
    return in_session(args, ckpt, _train)


def _train(args: argparse.Namespace, ckpt: dict | None, s: Session) -> int:
    data = build_data(args, s)
    s.log(f"data: {data.description}")
    if ckpt is not None and list(ckpt["classes"]) != data.classes:
        raise UserError(f"classes in {args.resume} ({', '.join(ckpt['classes'])}) differ from "
                        f"{args.data_dir} ({', '.join(data.classes)}); resume on the same data")
    channels_last = resolve_channels_last(args.channels_last, s.device, s.log)
    model, plain, spec = build_classifier(args, len(data.classes), s, channels_last)
    job = Job(task=ClassificationTask(len(data.classes), args.label_smoothing), model=model,
              plain=plain, spec=spec, meta={"classes": data.classes, "preprocessing": data.preprocessing},
              train_loader=data.train_loader, val_loader=data.val_loader, channels_last=channels_last,
              summary=lambda st: (f"done: best val accuracy {100 * st.best_metric:.2f}% at epoch "
                                  f"{st.best_epoch}; best model {s.output / 'best_model.pth'}, "
                                  f"resume state {s.output / 'checkpoint.pth'}"))
    run_job(args, s, job, ckpt)
    return 0
