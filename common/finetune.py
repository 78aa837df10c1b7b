"""Fine-tuning recipe (finetune_gpu.py): continue training a saved classifier with a small
learning rate, optional freezing, light augmentation and early stopping on validation loss.

It is the classification recipe's data and the one engine (run_job); what it adds is where
the model comes from (any checkpoint, or a file made elsewhere), fitting the classifier to the
data's classes, freezing, the starting model as the one to beat, and the lineage of rounds.
"""
from __future__ import annotations

import argparse
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt_lib
from .classify import ClassificationData, Preparation, build_data
from .cli import check_positive, inheritable, resolve
from .data.images import light_transform, preprocessing, train_transform
from .device import resolve_channels_last
from .distributed import restart_count
from .engine import TrainState, evaluate
from .errors import UserError
from .freeze import apply_freezing, freeze_batchnorm
from .inference import ALL_TASKS, load_for_inference
from .models import build_model, head_name, model_from_spec, permute_head, replace_head
from .preflight import check_training_memory
from .session import Session
from .tasks import ClassificationTask
from .trainer import Job, close_job, in_session, place_model, run_job

TASK = "classification"
SUFFIX = "_finetuned"
# Settings of the base model's run that decide which images are its validation set.
DATA_KEYS = ("dataset", "data_dir", "val_split", "seed", "no_hflip")


@dataclass
class Source:
    """The model a fresh fine-tune starts from."""
    path: Path
    model: nn.Module
    spec: dict[str, Any]
    classes: list[str] | None      # None: unknown (a file made elsewhere)
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    lineage: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def output_name(model_path: str | Path) -> str:
    """model/mnist_cnn3.pt -> mnist_cnn3_finetuned.pt (a later round keeps one suffix)."""
    return f"{Path(model_path).stem.removesuffix(SUFFIX)}{SUFFIX}.pt"


def resolve_args(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict | None,
                                                                  Source | None]:
    """defaults < --config < the base model's data settings (or the resumed run's config) < argv."""
    first, _ = resolve(parser, argv)
    auto = Path(first.output) / "checkpoint.pth"
    if not first.resume and restart_count() > 0 and auto.is_file():
        first.resume = str(auto)  # torchrun restarted the job: continue it
        argv = [*(argv or []), "--resume", str(auto)]
    if first.resume:
        ckpt = ckpt_lib.load_checkpoint(first.resume, task=TASK, need_train_state=True,
                                        trust=first.trust_checkpoint, start_from="--model-path")
        ckpt_lib.check_inputs(ckpt, first.resume)
        if "finetune" not in ckpt:
            raise UserError(f"{first.resume} is a checkpoint of gpu_train.py, not of a fine-tune; "
                            f"continue it with gpu_train.py --resume, or fine-tune it with --model-path")
        layers = [inheritable(ckpt.get("config", {}), parser), {"output": str(Path(first.resume).parent)}]
        return resolve(parser, argv, layers)[0], ckpt, None
    if not first.model_path:
        raise UserError("pass --model-path FILE: the model to fine-tune (e.g. ./output/best_model.pth), "
                        "or --resume result/checkpoint.pth to continue a fine-tune")
    source = load_source(first)
    layer = {k: source.config[k] for k in DATA_KEYS if source.config.get(k) is not None}
    return resolve(parser, argv, [layer])[0], None, source


def _missing_file_hint(path: Path) -> str:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        return f"; the folder {folder} does not exist either"
    near = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth"))
    return f"; {folder} holds {', '.join(near[:5])}" if near else ""


def load_source(args: argparse.Namespace) -> Source:
    path = Path(args.model_path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist{_missing_file_hint(path)}; pass --model-path "
                        "with a saved model (best_model.pth, checkpoint.pth or a *_finetuned.pt)")
    loaded = load_for_inference(path, torch.device("cpu"), tasks=ALL_TASKS, trust=args.trust_checkpoint,
                                arch=args.arch, num_classes=args.num_classes, img_size=args.img_size or 224)
    if loaded.task != TASK:
        instead = {"segmentation": "continue a U-Net with train_unet.py -f/--load",
                   "timeseries": "train a behaviour model again with run_behavior_classification.py"}
        raise UserError(f"{path} is a {loaded.task} checkpoint; finetune_gpu.py fine-tunes image "
                        f"classifiers ({instead.get(loaded.task, 'use the script that trained it')})")
    model, spec = loaded.model, loaded.spec
    if spec is None:  # a whole pickled model: its architecture must be one we can rebuild
        model, spec = _rebuild_pickled(loaded.model, args.arch, path)
    ckpt = loaded.checkpoint or {}
    entry = {"file": path.name, "path": str(path), "sha256": ckpt_lib.sha256_of(path),
             "metrics": {k: float(v) for k, v in (ckpt.get("metrics") or {}).items()},
             "saved_at": str(ckpt.get("saved_at", "")), "model": str(spec["name"])}
    notes = list(loaded.notes)
    if loaded.checkpoint is not None and args.arch and args.arch != spec["name"]:
        notes.append(f"notice: --arch {args.arch} is ignored: {path.name} records its architecture "
                     f"({spec['name']})")
    if loaded.checkpoint is None and not args.img_size:
        notes.append("notice: the file records no preprocessing; using 224x224 and ImageNet mean/std. "
                     "Pass --img-size N if the model was trained at another size")
    return Source(path, model.train(), dict(spec), list(ckpt["classes"]) if ckpt.get("classes") else None,
                  loaded.preprocessing, dict(ckpt.get("config") or {}),
                  [entry, *list(ckpt.get("lineage") or [])], notes)


def _rebuild_pickled(module: nn.Module, arch: str | None, path: Path) -> tuple[nn.Module, dict]:
    if not arch:
        raise UserError(f"{path} is a whole pickled model; pass --arch NAME (its architecture, "
                        "see gpu_train.py --list-models) so every tool can rebuild the fine-tuned model")

    classes = module.get_submodule(head_name(module)).out_features
    model, spec = build_model(arch, classes)
    ckpt_lib.load_state_dict_checked(model, module.state_dict(), f"{path} (read as --arch {arch})")
    return model, spec


def train(args: argparse.Namespace, ckpt: dict | None, source: Source | None) -> int:
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.early_stopping_patience is not None and args.early_stopping_patience < 0:
        raise UserError(f"--patience must be 0 (off) or more, got {args.early_stopping_patience}")
    if args.early_stopping_patience == 0:
        args.early_stopping_patience = None  # 0: no early stopping
    return in_session(args, ckpt, lambda a, c, s: _finetune(a, c, s, source))


def _preparation(args: argparse.Namespace, base: dict[str, Any]) -> Preparation:
    """The base model's preprocessing (size, mean/std), at --img-size when given."""
    pre = dict(base)
    if args.img_size and args.img_size != pre.get("img_size"):
        crop = pre["img_size"] / pre["resize_size"] if pre.get("resize_size") else 0.875
        pre = preprocessing(args.img_size, pre["mean"], pre["std"], crop_pct=crop)
    if args.augment:
        return Preparation(pre, lambda p: train_transform(p, hflip=not args.no_hflip), "standard")
    return Preparation(pre, light_transform, "light")


def _data(args: argparse.Namespace, s: Session, base_pre: dict[str, Any], recorded: str | None
          ) -> ClassificationData:
    args.dataset = args.dataset or "imagefolder"
    args.data_dir = args.data_dir or "./dataset"
    if not Path(args.data_dir).exists():
        if args.data_dir == recorded:
            raise UserError(f"data folder {args.data_dir} does not exist (the data the model was trained "
                            "on, as recorded in its checkpoint, seen from this folder); pass --data-dir "
                            "(and --dataset) for the data to fine-tune on")
        raise UserError(f"data folder {args.data_dir} does not exist; check --data-dir")
    # --num-classes is checked against the data below (for a plain state_dict it means its classes)
    data = build_data(argparse.Namespace(**{**vars(args), "num_classes": None}), s,
                      _preparation(args, base_pre))
    s.log(f"data: {data.description}")
    return data


def fit_classes(source: Source, data: ClassificationData, args: argparse.Namespace,
                log) -> dict[str, Any]:
    """Make the model's outputs the data's classes; returns the spec of the result."""
    model, spec, have, want = source.model, dict(source.spec), source.classes, data.classes
    where = args.data_dir
    if have == want:
        return spec
    if have is None and spec["kwargs"]["num_classes"] == len(want):
        log(f"classes: the model's class names are unknown; taking those of {where}: {', '.join(want[:10])}")
        return spec
    if have is not None and sorted(have) == sorted(want):
        permute_head(model, [have.index(c) for c in want])
        log(f"classes: {where} orders the classes differently; the classifier's outputs were reordered")
        return spec
    if args.num_classes is None and have is not None:
        raise UserError(f"classes of {where} ({', '.join(want[:10])}) differ from the model's "
                        f"({', '.join(have[:10])}); pass --num-classes {len(want)} to replace the "
                        "classifier head with a new one, or point --data-dir at data with the model's "
                        "classes")
    if args.num_classes is not None and have is not None and args.num_classes != len(want):
        raise UserError(f"--num-classes {args.num_classes} but {where} has {len(want)} classes "
                        f"({', '.join(want[:10])}); pass --num-classes {len(want)}")
    replace_head(model, len(want), always=True)
    spec["kwargs"] = {**spec["kwargs"], "num_classes": len(want)}
    before = len(have) if have else source.spec["kwargs"]["num_classes"]
    log(f"classes: new classifier head for the {len(want)} classes of {where} "
        f"({', '.join(want[:10])}); the model had {before}")
    return spec


def _finetune(args: argparse.Namespace, ckpt: dict | None, s: Session, source: Source | None) -> int:
    base_pre = ckpt["preprocessing"] if ckpt is not None else source.preprocessing
    config = (ckpt if ckpt is not None else {"config": source.config}).get("config") or {}
    for note in ([] if source is None else source.notes):
        s.log(note)
    data = _data(args, s, base_pre, config.get("data_dir"))
    pre = data.preprocessing
    s.log(f"preprocessing: {pre['img_size']}x{pre['img_size']} (resize {pre.get('resize_size')}), mean "
          f"{[round(m, 4) for m in pre['mean']]}, std {[round(v, 4) for v in pre['std']]}; augmentation: "
          f"{'the training recipe' if args.augment else 'random rotation of 10 degrees'}")
    if ckpt is not None:
        if list(ckpt["classes"]) != data.classes:
            raise UserError(f"classes in {args.resume} ({', '.join(ckpt['classes'])}) differ from "
                            f"{args.data_dir} ({', '.join(data.classes)}); resume on the same data")
        model = model_from_spec(ckpt["model"], where=f"checkpoint {args.resume}")
        spec, info = dict(ckpt["model"]), dict(ckpt["finetune"])
        lineage = list(ckpt.get("lineage") or [])
    else:
        spec = fit_classes(source, data, args, s.log)
        model, lineage = source.model, source.lineage
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        info = {"best_file": output_name(source.path), "parent": source.path.name,
                # absolute: a resume from another folder goes on in the same TensorBoard run
                "tensorboard": str((Path(args.log_dir) / f"{info_stem(source)}_{stamp}").resolve())}
    report = apply_freezing(model, conv=args.freeze_conv, bn=args.freeze_bn, until=args.freeze_until)
    s.log(report.line())
    if (args.freeze_conv or args.freeze_until) and not args.freeze_bn:
        s.log("notice: batch-norm running statistics of frozen layers still adapt to the new data; add "
              "--freeze-bn to keep them as they are")
    channels_last = resolve_channels_last(args.channels_last, s.device, s.log)
    trained, plain = place_model(model, args, s, channels_last, f"{spec['name']} ({spec['source']})")
    check_training_memory(plain, "--img-size", pre["img_size"], 3, args.batch_size, s.device, s.log)
    if args.freeze_bn:
        freeze_batchnorm(plain)  # again: --sync-bn put new batch-norm modules in
    task = ClassificationTask(len(data.classes), args.label_smoothing)
    if ckpt is None:
        info["start"] = _evaluate_start(plain, task, data, s, channels_last, source.path)
    best = s.output / info["best_file"]
    job = Job(task=task, model=trained, plain=plain, spec=spec,
              meta={"classes": data.classes, "preprocessing": data.preprocessing, "finetune": info,
                    "lineage": lineage},
              train_loader=data.train_loader, val_loader=data.val_loader, channels_last=channels_last,
              best_name=info["best_file"], tb_dir=Path(info["tensorboard"]),
              start_metrics=info["start"] if ckpt is None else None, stop_on="loss",
              baseline=info["start"])
    state = run_job(args, s, job, ckpt)
    close_job(s, args, job, state, summary(state, info, best, s.output / "checkpoint.pth", args))
    return 0


def info_stem(source: Source) -> str:
    """mnist_cnn3 for model/mnist_cnn3.pt and for result/mnist_cnn3_finetuned.pt."""
    return source.path.stem.removesuffix(SUFFIX)


def _evaluate_start(model: nn.Module, task: ClassificationTask, data: ClassificationData, s: Session,
                    channels_last: bool, path: Path) -> dict[str, float]:
    """The loaded model on the validation data: the numbers fine-tuning has to beat."""
    totals = evaluate(model, task, data.val_loader, s.precision, s.device, channels_last=channels_last,
                      show_progress=s.is_main, desc="val (before)")
    metrics = task.summarize(totals)
    s.log(f"before fine-tuning: val acc {100 * metrics['acc']:.2f}% loss {metrics['loss']:.4f} ({path})")
    return {f"val_{k}": float(v) for k, v in metrics.items()}


def _advice(args: argparse.Namespace, before: float) -> str:
    if before >= 100.0:
        return "the starting model is already right on every validation image"
    tips = [f"a lower --lr (below {args.lr:g})"]
    if not args.freeze_conv:
        tips.append("--freeze-conv")
    if args.augment:
        tips.append("the light augmentation (without --augment)")
    return "try " + " or ".join(tips)


def summary(state: TrainState, info: dict[str, Any], best: Path, resume: Path,
            args: argparse.Namespace) -> str:
    before = 100 * info["start"]["val_acc"]
    if state.best_epoch == 0:
        tried = max((r.get("val_acc", 0.0) for r in state.history), default=0.0)
        return (f"done: before {before:.2f}% -> after {before:.2f}%: no epoch beat the starting model "
                f"(best epoch {100 * tried:.2f}%), so {best} holds the starting weights; "
                f"{_advice(args, before)}")
    return (f"done: before {before:.2f}% -> after {100 * state.best_metric:.2f}% val accuracy (epoch "
            f"{state.best_epoch}); fine-tuned model {best}, resume state {resume}, "
            f"TensorBoard {info['tensorboard']}")
