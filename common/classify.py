"""Image classification recipe shared by gpu_train.py and multi_gpu_train.py: its flags,
its data, its model, and train() which wires them into the engine."""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt_lib
from .classify_args import DEMO_PRESET, add_classification_args, add_distributed_args  # noqa: F401
from .cli import check_positive, check_same_architecture, inheritable, resolve
from .data.builtin import TORCHVISION_SETS, make_demo_dataset, torchvision_classes, torchvision_dataset
from .data.fast_path import classification_batches
from .data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    check_images,
    eval_transform,
    folder_splits,
    preprocessing,
    samples_for_classes,
    train_transform,
)
from .data.loaders import make_loader
from .device import resolve_channels_last
from .distributed import barrier, restart_count
from .engine import evaluate
from .errors import UserError
from .mixing import make_mixer
from .models import (
    also_in,
    build_model,
    calibrate_batchnorm,
    designed_size,
    input_size_problem,
    list_models,
    load_weights_file,
    parameter_count,
    resolve_name,
    tame_head,
)
from .preflight import check_input_size, check_training_memory
from .recipes import describe_recipes, describe_resolved, recipe_layer
from .session import Session
from .tasks import ClassificationTask
from .trainer import Job, in_session, place_model, run_job

TASK = "classification"
def resolve_args(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict | None]:
    """Layers: defaults < --recipe < --config < presets (--demo, --dataset) < checkpoint (--resume)
    < argv."""
    first, given = resolve(parser, argv)
    base = recipe_layer(first.recipe, parser)
    if base:
        first, given = resolve(parser, argv, base=base)
    layers: list[dict[str, Any]] = []
    if first.demo:
        layers.append(DEMO_PRESET)
    if first.dataset in TORCHVISION_SETS:
        layers.append({"img_size": TORCHVISION_SETS[first.dataset][3]})
    ckpt = None
    auto = Path(resolve(parser, argv, layers, base=base)[0].output) / "checkpoint.pth"  # with the presets
    if not first.resume and restart_count() > 0 and auto.is_file():
        first.resume = str(auto)  # torchrun restarted the job (--max-restarts): continue it
        argv = [*(argv or []), "--resume", str(auto)]
    if first.resume:
        ckpt = ckpt_lib.load_checkpoint(first.resume, task=TASK, need_train_state=True,
                                        trust=first.trust_checkpoint, start_from="--weights")
        layers.append(inheritable(ckpt.get("config", {}), parser))
        layers.append({"output": str(Path(first.resume).parent)})
    args, given = resolve(parser, argv, layers, base=base)
    if ckpt is not None:
        check_same_architecture(args, given, ckpt, first.resume, ("model",))
    args._given = given  # a set: kept out of config.json, read for the recipe's log line
    return args, ckpt


@dataclass
class Preparation:
    """How build_data prepares images when not as for training from scratch (fine-tuning):
    the preprocessing to use instead of the data set's default, and the training transform
    built from it instead of the training recipe's augmentation."""
    pre: dict[str, Any] | None = None
    train_transform: Callable[[dict[str, Any]], Any] | None = None
    batch_kind: str | None = None  # the same augmentation on the cached path (data/fast_path.py)


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
    return train_transform(pre, hflip=not args.no_hflip, kind=getattr(args, "augment", "standard"))


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
    if splits.drawn_from is not None:
        s.held_out = (splits.drawn_from, [p for p, _ in val])
    pre = prep.pre or preprocessing(args.img_size, IMAGENET_MEAN, IMAGENET_STD)
    skip = bool(args.skip_bad_images)  # a file that fails later, while training, is skipped too
    return (splits.classes, ImageDataset(train, _train_tf(args, prep, pre), skip_bad=skip),
            ImageDataset(val, eval_transform(pre), skip_bad=skip), pre, splits.description)


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
    check_input_size("--img-size", img_size, img_size, 3, args.batch_size, s.device)
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
    kind = prep.batch_kind or getattr(args, "augment", "standard")
    cached = classification_batches(train, val, pre, args, s, kind)
    if cached is not None:
        train_loader, val_loader = cached
        sizes = f"{cached[0].dataset_size} train / {cached[1].dataset_size} val"
    else:
        loader_args = {"num_workers": s.num_workers, "pin_memory": s.pin_memory,
                       "rank": s.ctx.rank, "world_size": s.ctx.world_size}
        train_loader = make_loader(train, args.batch_size, train=True, seed=args.seed, **loader_args)
        val_loader = make_loader(val, args.batch_size, train=False, **loader_args)
        sizes = f"{len(train)} train / {len(val)} val"
    return ClassificationData(classes=classes, train_loader=train_loader, val_loader=val_loader,
                              preprocessing=pre,
                              description=(f"{description}: {sizes} images, {len(classes)} classes, "
                                           f"input {pre['img_size']} px"))


def build_classifier(args: argparse.Namespace, num_classes: int, s: Session, channels_last: bool,
                     img_size: int | None = None, from_scratch: bool = False
                     ) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(model to train, plain model, spec). The first may be compiled; both share weights.
    img_size: the training input size (a timm model of one fixed size is built for it).
    from_scratch: no --pretrained, --weights or --resume (a library head scaled for 1000 classes
    is then re-initialised, models.tame_head)."""
    model, spec = build_model(args.model, num_classes, pretrained=args.pretrained, img_size=img_size)
    tamed = tame_head(model) if from_scratch and spec["source"] != "local" else None
    if args.weights:
        load_weights_file(model, args.weights, s.log, trust=args.trust_checkpoint)
    trained, plain = place_model(model, args, s, channels_last, describe_model(args.model, spec))
    if tamed:
        s.log(tamed)
    return trained, plain, spec


def describe_model(asked: str, spec: dict[str, Any]) -> str:
    """'efficientnet_b0 (timm; torchvision's: --model torchvision/efficientnet_b0)': the name, the
    library it came from, and how to ask for another library's model of the same name."""
    name, source = spec["name"], spec["source"]
    others = [] if "/" in asked else [o for o in also_in(source, name) if o != "local"]
    note = "".join(f"; {o}'s: --model {o}/{name}" for o in others)
    return f"{name} ({source}{note})"


def check_model_input(plain: nn.Module, name: str, size: int) -> None:
    """A model that cannot take --img-size inputs is one line before the first epoch."""
    problem = input_size_problem(plain, size)
    if problem is None:
        return
    need = designed_size(plain)
    fix = (f"use --img-size {need}" if need and need != size else
           "use a larger --img-size (224 is what most models are made for)")
    raise UserError(f"--img-size {size}: {name} does not take {size} x {size} px inputs ({problem}); {fix}")


# Notice for a large model trained from scratch on a small set (see scratch_notice).
LARGE_MODEL_PARAMETERS = 2_000_000
FEW_IMAGES_PER_CLASS = 1000
SMALL_MODEL = "small_cnn"


def scratch_notice(plain: nn.Module, name: str, train_images: int, num_classes: int) -> str | None:
    """For a model trained from scratch: the notice when it has more than 2M parameters and the
    set fewer than 1000 training images per class, else None.

    1000 per class: the sets these architectures are trained from scratch on hold more (ImageNet
    ~1300 per class, CIFAR-10 5000), and below that fine-tuning pretrained weights is the usual
    advice. Measured on a generated 2-class digit set (150 training images per class, 64 px, this
    recipe): efficientnet_b0 from scratch reached 56% validation accuracy after 8 epochs and 61-68%
    after 20, where small_cnn reached 72% after 8 (98% on the simpler set of the issue)."""
    count = parameter_count(plain)
    if count <= LARGE_MODEL_PARAMETERS or train_images >= FEW_IMAGES_PER_CLASS * num_classes:
        return None
    per_class = train_images / max(1, num_classes)
    return (f"notice: {name} ({count / 1e6:.1f}M parameters) is trained from scratch on {train_images} "
            f"images (about {per_class:.0f} per class); a model this large usually needs pretrained "
            f"weights to be useful on so few images: add --pretrained (downloads the library's "
            f"weights once), or train a small model such as --model {SMALL_MODEL}, which learns "
            "from scratch on a few hundred images")


def start_batchnorm(plain: nn.Module, loader: Any, channels_last: bool, device, log) -> None:
    """A model trained from scratch: BatchNorm's running statistics start from one training batch
    (models.calibrate_batchnorm says why). The random number streams of the run are left as they
    were, so the run's shuffling and augmentation do not change."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()):
        return
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            inputs = _first_inputs(loader).to(device, non_blocking=True)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            layers, used = _calibrate_within_memory(plain, inputs)
    finally:
        random.setstate(python_state)
    if used == 0:
        log("batch norm: not even one image fits for the start statistics (out of memory); the running "
            "statistics start as usual")
        return
    log(f"batch norm: running statistics of {layers} layers start from a training batch of "
        f"{used} (a model trained from scratch)")


def _calibrate_within_memory(plain: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """calibrate_batchnorm on the batch, or on its first half, quarter ... where the device runs out
    of memory (the training step has its own recovery, which has not started yet). Returns the
    layers set and the images used (0: none fitted)."""
    count = inputs.shape[0]
    while count >= 1:
        try:
            return calibrate_batchnorm(plain, inputs[:count]), count
        except torch.OutOfMemoryError:
            if inputs.is_cuda:
                torch.cuda.empty_cache()
            count //= 2
    return 0, 0


def _first_inputs(loader: Any) -> torch.Tensor:
    """The inputs of the training loader's first batch (a DataLoader's are read here, in this
    process, so that no worker starts for them)."""
    if isinstance(loader, DataLoader):
        order = list(loader.sampler)[: loader.batch_size or 1]
        return torch.stack([torch.as_tensor(loader.dataset[i][0]) for i in order])
    return next(iter(loader))[0]


def train(args: argparse.Namespace, ckpt: dict | None) -> int:
    if args.recipe == "list":
        print(describe_recipes())
        return 0
    if args.list_models:
        print(describe_model_list(list_models()))
        return 0
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval")
    return in_session(args, ckpt, _train)


def describe_model_list(names: dict[str, list[str]]) -> str:
    """--list-models: one line per library in the order a bare name resolves, and the names that
    need a prefix to reach a later library's model."""
    order = list(names)
    lines = [f"a bare --model name comes from the first of {', '.join(order)} that has it; "
             "timm/NAME or torchvision/NAME picks the library (e.g. --model torchvision/efficientnet_b0)"]
    taken: set[str] = set()
    for source, listed in names.items():
        lines.append(f"{source} ({len(listed)}): {' '.join(listed)}")
        shadowed = sorted(taken.intersection(listed))
        if shadowed:
            lines.append(f"  {len(shadowed)} of these are also in an earlier library; for {source}'s, "
                         f"prefix {source}/: {' '.join(f'{source}/{n}' for n in shadowed)}")
        taken.update(listed)
    return "\n".join(lines)


def _train(args: argparse.Namespace, ckpt: dict | None, s: Session) -> int:
    if args.recipe:
        s.log(describe_resolved(args.recipe, args, getattr(args, "_given", ())))
    resolve_name(args.model)  # a mistyped --model is one line before any image is read
    data = build_data(args, s)
    s.log(f"data: {data.description}")
    if ckpt is not None and list(ckpt["classes"]) != data.classes:
        raise UserError(f"classes in {args.resume} ({', '.join(ckpt['classes'])}) differ from "
                        f"{args.data_dir} ({', '.join(data.classes)}); resume on the same data")
    channels_last = resolve_channels_last(args.channels_last, s.device, s.log)
    size = data.preprocessing["img_size"]
    from_scratch = ckpt is None and not (args.pretrained or args.weights)
    model, plain, spec = build_classifier(args, len(data.classes), s, channels_last, img_size=size,
                                          from_scratch=from_scratch)
    check_training_memory(plain, "--img-size", size, 3, args.batch_size, s.device, s.log)
    check_model_input(plain, spec["name"], size)
    if from_scratch:
        notice = scratch_notice(plain, spec["name"], _dataset_size(data.train_loader), len(data.classes))
        if notice:
            s.log(notice)
        start_batchnorm(plain, data.train_loader, channels_last, s.device, s.log)
    test_loader = _test_loader(args, s, data)
    job = Job(task=ClassificationTask(len(data.classes), args.label_smoothing), model=model,
              plain=plain, spec=spec, meta={"classes": data.classes, "preprocessing": data.preprocessing},
              train_loader=data.train_loader, val_loader=data.val_loader, channels_last=channels_last,
              summary=lambda st: (f"done: best val accuracy {100 * st.best_metric:.2f}% at epoch "
                                  f"{st.best_epoch}; best model {s.output / 'best_model.pth'}, "
                                  f"resume state {s.output / 'checkpoint.pth'}"),
              batch_transform=make_mixer(len(data.classes), args.mixup, args.cutmix, args.mix_prob))
    run_job(args, s, job, ckpt)
    if test_loader is not None:
        evaluate_best_on_test(s, job, test_loader)
    return 0


def _dataset_size(loader: Any) -> int:
    size = getattr(loader, "dataset_size", None)  # the cached path's batches
    return int(size) if size is not None else len(loader.dataset)


def _test_loader(args: argparse.Namespace, s: Session, data: ClassificationData):
    """--test: the test split. A torchvision set's test set is also its validation set here (the
    notes' protocol); a folder's is DATA_DIR/test/ in the model's class order."""
    if not getattr(args, "test", False):
        return None
    if args.dataset in TORCHVISION_SETS:
        s.log(f"--test: {args.dataset} has no separate validation split; val is its test set")
        return data.val_loader
    test_dir = Path(args.data_dir) / "test"
    if not test_dir.is_dir():
        s.log(f"notice: --test: no {test_dir} folder, so no test-set evaluation at the end")
        return None
    samples = samples_for_classes(test_dir, data.classes)
    dataset = ImageDataset(samples, eval_transform(data.preprocessing), skip_bad=bool(args.skip_bad_images))
    return make_loader(dataset, args.batch_size,
                       train=False, num_workers=s.num_workers, pin_memory=s.pin_memory,
                       rank=s.ctx.rank, world_size=s.ctx.world_size)


def evaluate_best_on_test(s: Session, job: Job, loader) -> dict[str, float]:
    """best_model.pth on the test split: a log line and test_metrics.json."""
    best = s.output / job.best_name
    ckpt = ckpt_lib.load_checkpoint(best, task=TASK)
    ckpt_lib.load_state_dict_checked(job.plain, ckpt["state_dict"], str(best))
    totals = evaluate(job.plain, job.task, loader, s.precision, s.device, channels_last=job.channels_last)
    metrics = job.task.summarize(totals)
    metrics["images"] = int(totals["count"])
    if s.is_main:
        (s.output / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        s.log(f"test: accuracy {100 * metrics['acc']:.2f}% (loss {metrics['loss']:.4f}) on "
              f"{metrics['images']} images with {best}; written to {s.output / 'test_metrics.json'}")
    return metrics
