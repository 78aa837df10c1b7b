"""run_job(): what every training recipe does once its data, model and task are built --
optimizer, schedule, resume, output folder, the engine, checkpoints. Recipes (classification,
segmentation) differ only in what they hand over in a Job."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import check_training_values
from .distributed import barrier, convert_sync_batchnorm, destroy_process_group, wrap_ddp
from .engine import StepConfig, TrainState, fit
from .errors import UserError, note_checkpoint
from .memory import OOMRecovery, memory_state, restore_memory_state
from .nanguard import NonFiniteGuard, NonFiniteReport, NonFiniteStop
from .optim import Schedule, build_optimizer
from .reporting import run_summary
from .session import EpochWriter, Session, open_output, restore_train_state, save_run_config, start_session
from .validation import HELD_OUT, TEST_HELD_OUT, held_out_root


@dataclass
class Job:
    task: Any                  # ClassificationTask, SegmentationTask, ...
    model: nn.Module           # what trains: maybe wrapped in DDP or compiled
    plain: nn.Module           # the unwrapped model, the one that is saved
    spec: dict[str, Any]       # how to rebuild the model (checkpoint "model")
    meta: dict[str, Any]       # task keys of the checkpoint: classes, preprocessing, mask values
    train_loader: Any
    val_loader: Any
    channels_last: bool = False
    summary: Callable[[TrainState], str] | None = None  # the closing line
    keep_last: int | None = None  # keep checkpoint_epoch{N}.pth files (see EpochWriter)
    extra_output: Callable | None = None  # e.g. an image grid per epoch
    best_name: str = "best_model.pth"
    tb_dir: Path | None = None  # TensorBoard folder (default: OUTPUT/tensorboard)
    # Validation metrics of the model before training (fine-tuning): a fresh run counts them as
    # the best so far, and writes the starting model as the best model before epoch 1.
    start_metrics: dict[str, float] | None = None
    stop_on: str | None = None  # early stopping on this val metric, lower is better (fit's stop_on)
    baseline: dict[str, float] | None = None  # val metrics before training, drawn in curves.png
    batch_transform: Callable | None = None  # MixUp/CutMix on each loaded batch (StepConfig's)


def in_session(args: argparse.Namespace, ckpt: dict | None,
               body: Callable[[argparse.Namespace, dict | None, Session], int]) -> int:
    """Start the session (device, process group, logging), run the recipe, leave the group."""
    check_training_values(args)
    done = ((ckpt or {}).get("train_state") or {}).get("epoch")
    if isinstance(done, int) and args.epochs <= done:  # before the data and the model load
        raise UserError(f"{args.resume} has already trained {done} epochs; pass --epochs above {done} "
                        "to train further")
    started = time.monotonic()
    s = start_session(args, Path(args.output))
    _CLOSING[id(s)] = None
    try:
        code = body(args, ckpt, s)
        closing = _CLOSING.get(id(s))
        if closing is not None and s.is_main:
            for line in closing(time.monotonic() - started):
                s.log(line)
        return code
    finally:
        _CLOSING.pop(id(s), None)
        s.close()
        destroy_process_group()


# id(session) -> the last lines of its run, logged by in_session once the recipe is done (after a
# test-split evaluation or a last sample picture, so that the summary lists those files too)
_CLOSING: dict[int, Callable[[float | None], list[str]] | None] = {}


def finish_run(s: Session, args: argparse.Namespace, done: str, *, task: str, model: Path,
               best: str | None, extra: Sequence[Path] = ()) -> None:
    """End a run that worked: the summary block (best result, time, every output that exists with its
    size, disk used, the next commands with this run's paths) and then `done`, the run's last line
    (scripts and tests read it). model: the file the next commands take; extra: outputs outside the
    output folder. Inside in_session the lines come when the recipe returns, else now."""
    def lines(seconds: float | None) -> list[str]:
        commands = next_commands(task, model, s.output, args) if model.is_file() else []
        return [*run_summary(s.output, best=best, seconds=seconds, commands=commands, extra=extra), done]

    if id(s) in _CLOSING:
        _CLOSING[id(s)] = lines
    elif s.is_main:
        for line in lines(None):
            s.log(line)


def close_job(s: Session, args: argparse.Namespace, job: Job, state: TrainState, done: str) -> None:
    """finish_run for a Job trained by run_job: its best model, monitored metric and TensorBoard."""
    finish_run(s, args, done, task=job.task.name, model=s.output / job.best_name,
               best=best_text(job.task.monitor, state), extra=[job.tb_dir] if job.tb_dir else [])


def best_text(monitor: str, state: TrainState) -> str | None:
    """The best result for the summary, e.g. val accuracy 97.50% at epoch 7 (10 epochs trained);
    for segmentation the Dice with its IoU."""
    if state.best_metric is None:
        return None
    record = next((r for r in state.history if int(r["epoch"]) == state.best_epoch), {})
    split = "train" if f"train_{monitor}" in record and f"val_{monitor}" not in record else "val"
    name = {"acc": "accuracy", "dice": "Dice"}.get(monitor, monitor)
    value = f"{100 * state.best_metric:.2f}%" if monitor == "acc" else f"{state.best_metric:.4f}"
    if monitor == "dice" and f"{split}_iou" in record and not state.best_from_ema:
        value += f" (IoU {record[f'{split}_iou']:.4f})"
    trained = f"{state.epoch} epoch{'s' if state.epoch != 1 else ''} trained"
    if state.best_epoch == 0:
        return f"the starting model, {split} {name} {value}: no epoch beat it ({trained})"
    ema = " (the weights' moving average)" if state.best_from_ema else ""
    return f"{split} {name} {value} at epoch {state.best_epoch}{ema} ({trained})"


_ROOT = Path(__file__).resolve().parent.parent  # the project folder, which holds the scripts


def _script(name: str) -> str:
    """A script as the user can run it from the folder they are in: its bare name in the project
    folder (as the guides write it), else its full path (the data paths are relative to here)."""
    try:
        here = Path.cwd().resolve()
    except OSError:  # the folder was removed
        here = None
    return name if here == _ROOT else str(_ROOT / name)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def next_commands(task: str, model: Path, output: Path, args: argparse.Namespace) -> list[list[str]]:
    """validate.py, predict.py and export_onnx.py for this run's model, on this run's data where the
    scripts can read it (a class folder tree, imgs/ + masks/, recordings), else export only."""
    data = _evaluation_data(task, args)
    commands = []
    lists = [output / name for name in (HELD_OUT, TEST_HELD_OUT)]
    held_out = next((path for path in lists if path.is_file()), lists[0])
    root = held_out_root(held_out) if data is not None and held_out.is_file() else None
    if root is not None and root.is_dir():  # val was split off the training folder: those images only
        commands.append(["python", _script("validate.py"), "--model", str(model), "--data-dir", str(root),
                         "--files", str(held_out)])
    elif data is not None:
        commands.append(["python", _script("validate.py"), "--model", str(model), "--data-dir", str(data)])
    if commands and getattr(args, "skip_bad_images", False):  # the unreadable images are still there
        commands[0].append("--skip-bad-images")
    if data is not None:
        if task == "segmentation":
            images = sorted(p for p in (data / "imgs").glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
            image = images[0] if images else None
            if image is not None:
                commands.append(["python", _script("predict.py"), "-m", str(model), "-i", str(image),
                                 "-o", str(output / f"{image.stem}_mask.png"), "-v"])
        elif data.is_dir() or data.suffix.lower() == ".csv":
            commands.append(["python", _script("predict.py"), "--model", str(model), "--input", str(data),
                             "--output", str(output / "predictions.csv")])
    onnx = output / ("model.onnx" if model.parent == output else f"{model.parent.name}.onnx")
    commands.append(["python", _script("export_onnx.py"), "--model", str(model), "--output", str(onnx)])
    return commands


def _evaluation_data(task: str, args: argparse.Namespace) -> Path | None:
    """The data a validate.py run of this model reads: the test split, else the validation split,
    else the data folder itself (where the split was drawn from it); None where validate.py cannot
    read it (a torchvision set, several merged folders)."""
    if getattr(args, "dataset", None) not in (None, "imagefolder") or getattr(args, "data_glob", None):
        return None
    if not getattr(args, "data_dir", None) or not Path(args.data_dir).exists():
        return None
    root = Path(args.data_dir)
    if task == "segmentation":
        return root if (root / "imgs").is_dir() else None
    return next((root / split for split in ("test", "val") if (root / split).is_dir()), root)


def place_model(model: nn.Module, args: argparse.Namespace, s: Session, channels_last: bool,
                description: str) -> tuple[nn.Module, nn.Module]:
    """(model to train, plain model): on the device, channels_last, DDP under torchrun, compiled
    with --compile. Both share their weights; the plain one is what checkpoints hold."""
    if getattr(args, "sync_bn", False) and s.ctx.enabled:
        model = convert_sync_batchnorm(model, s.device)
    model.to(s.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    s.log(f"model: {description}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    trained = wrap_ddp(model, s.device) if s.ctx.enabled else model
    if args.compile:
        s.log("compiling the model (torch.compile): the first steps take longer"
              + (", on a CPU a minute or more" if s.device.type == "cpu" else ""))
    return (torch.compile(trained) if args.compile else trained), model


def scaled_lr(args: argparse.Namespace, s: Session) -> float:
    """--lr-scale linear: the linear scaling rule against --base-batch-size."""
    per_step = args.batch_size * args.accumulate_grad_batches
    if getattr(args, "lr_scale", "none") != "linear":
        return args.lr
    base = args.base_batch_size or per_step
    lr = args.lr * per_step * s.ctx.world_size / base
    s.log(f"lr scaled linearly: {args.lr:g} x {per_step * s.ctx.world_size}/{base} = {lr:g}")
    return lr


def run_job(args: argparse.Namespace, s: Session, job: Job, ckpt: dict | None) -> TrainState:
    optimizer = build_optimizer(job.plain.parameters(), args.optimizer, scaled_lr(args, s),
                                args.weight_decay, args.momentum, args.amsgrad, fused=_fused(args, s))
    steps = math.ceil(len(job.train_loader) / args.accumulate_grad_batches)
    schedule = Schedule(optimizer, args.scheduler, epochs=args.epochs, steps_per_epoch=steps,
                        warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                        step_size=args.step_size, gamma=args.gamma, t0=args.t0, t_mult=args.t_mult)
    state = _resume(args, ckpt, s, job.plain, optimizer, schedule)
    # resumed in its own folder, the run continues there; into another folder (--output), whatever
    # that folder held is another run's, moved aside as for a new run
    in_place = ckpt is not None and Path(args.resume).resolve().parent == s.output.resolve()
    open_output(s, resuming=in_place, run_files=(job.best_name, NONFINITE_FILE))
    if ckpt is not None:
        _carry_best_model(args, s, job)
    save_run_config(s)
    step_cfg = StepConfig(accumulate=args.accumulate_grad_batches, clip_grad=args.clip_grad,
                          channels_last=job.channels_last, log_interval=args.log_interval,
                          show_progress=s.is_main,
                          recovery=OOMRecovery(args.batch_size, args.accumulate_grad_batches, s.log))
    if ckpt is not None:
        step_cfg.splits = restore_memory_state(ckpt["train_state"], job.plain, args.batch_size, s.log)
    step_cfg.batch_transform = job.batch_transform
    step_cfg.ema = _moving_average(args, ckpt, job.plain, s)
    step_cfg.guard = NonFiniteGuard(s.device, getattr(args, "nan_policy", "stop"),
                                    getattr(args, "nan_max_skips", 10), log=s.log,
                                    on_report=lambda report: _write_report(report, job, s))
    writer = EpochWriter(s, job.plain, task=job.task.name, model_spec=job.spec, meta=job.meta,
                         optimizer=optimizer, schedule=schedule, epochs=args.epochs,
                         extra_state=lambda: _extra_state(job, args, step_cfg),
                         keep_last=job.keep_last, extra_output=job.extra_output,
                         best_name=job.best_name, tb_dir=job.tb_dir, baseline=job.baseline,
                         ema=step_cfg.ema)
    if ckpt is None and job.start_metrics is not None:
        _start_from(state, job, writer)
    try:
        try:
            fit(job.model, job.task, job.train_loader, job.val_loader, optimizer, schedule, s.precision,
                s.device, epochs=args.epochs, state=state, step_cfg=step_cfg, on_epoch_end=writer,
                min_delta=args.min_delta, patience=args.early_stopping_patience, log=s.log,
                eval_model=job.plain, restore_best=getattr(args, "restore_best", False),
                stop_on=job.stop_on)
        finally:
            writer.close()  # the last good epoch's writes finish
    except NonFiniteStop as exc:  # every rank stops at the same read; none leaves before rank 0's writes
        barrier()
        raise NonFiniteStop(exc.report, f"{exc.summary}; {_saved_before(args, s, job, state)}",
                            exc.advice) from None
    if job.summary is not None and state.best_metric is not None:
        close_job(s, args, job, state, job.summary(state))
    return state


NONFINITE_FILE = "nonfinite_batch.json"


def _fused(args: argparse.Namespace, s: Session) -> bool:
    """A fused optimizer on CUDA, and on a CPU for --nan-policy skip: its kernel skips a flagged step
    on the device (an unfused one would need the flag on the host every step)."""
    return s.device.type == "cuda" or (getattr(args, "nan_policy", "stop") == "skip"
                                       and s.device.type == "cpu")


def _write_report(report: NonFiniteReport, job: Job, s: Session) -> str:
    """nonfinite_batch.json (rank 0): the first non-finite step and its samples, with file names where
    the data set has them. Returns the clause the stop message and the skip warnings use."""
    path = s.output / NONFINITE_FILE
    data = report.to_dict()
    samples = [{"rank": rank, "index": i} for rank, ids in (report.indices or {}).items() for i in ids]
    files = _sample_files(job.train_loader)
    for sample in samples:
        sample.update(files(sample["index"]) if files else {})
    data["samples"] = samples
    if samples and files is None:
        data["files"] = "this data set has no files (a torchvision set): the indices are its sample numbers"
    if s.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    if report.indices is None:
        return f"{path} describes it (its samples are not known: the loader's order cannot be replayed)"
    return f"its {len(samples)} sample(s) are listed in {path}"


def _sample_files(loader: Any) -> Callable[[int], dict[str, str]] | None:
    """index -> file names, for the data sets that keep them (image folders, image/mask pairs, on the
    DataLoader path and in the data cache)."""
    cached = getattr(loader, "sample_files", None)
    if isinstance(cached, list):
        return lambda i: cached[i]
    dataset = getattr(loader, "dataset", None)
    samples, pairs = getattr(dataset, "samples", None), getattr(dataset, "pairs", None)
    if isinstance(samples, list):
        return lambda i: {"file": str(samples[i][0])}
    if isinstance(pairs, list):
        return lambda i: {"file": str(pairs[i][0]), "mask": str(pairs[i][1])}
    return None


def _saved_before(args: argparse.Namespace, s: Session, job: Job, state: TrainState) -> str:
    """What a stop leaves: the checkpoint of the last good epoch, untouched."""
    last = s.output / "checkpoint.pth"
    if state.epoch > 0 and last.is_file():
        best = s.output / job.best_name
        also = f" and {best}" if best.is_file() else ""
        return f"{last} (epoch {state.epoch}){also} are intact"
    if getattr(args, "resume", None):
        return f"the checkpoint this run resumed from, {args.resume}, is intact"
    return "nothing was saved (it happened in the first epoch)"


def _carry_best_model(args: argparse.Namespace, s: Session, job: Job) -> None:
    """--resume X --output elsewhere continues in elsewhere with every output there: the best model
    so far comes along (a resumed run that never improves would otherwise name a missing file)."""
    source = Path(args.resume).parent / job.best_name
    target = s.output / job.best_name
    if s.is_main and source.is_file() and not target.exists():
        shutil.copy2(source, target)
        s.log(f"resuming into {s.output}: copied the best model so far from {source}")


def _moving_average(args: argparse.Namespace, ckpt: dict | None, plain: nn.Module, s: Session):
    """--ema: the moving average of the weights (restored on resume)."""
    if not getattr(args, "ema", None):
        return None
    from .ema import EMA

    ema = EMA(plain, args.ema)
    saved = (ckpt or {}).get("train_state", {}).get("ema")
    if saved is not None:
        ema.load_state_dict(saved, args.resume)
    elif ckpt is not None:
        s.log("notice: the checkpoint has no moving average (--ema was off); it starts from the "
              "current weights")
    s.log(f"EMA of the weights, decay {args.ema}: evaluated every epoch, saved as the best model "
          "when it scores higher than the weights themselves")
    return ema


def _extra_state(job: Job, args: argparse.Namespace, step_cfg: StepConfig) -> dict[str, Any]:
    state = memory_state(job.plain, args.batch_size, args.accumulate_grad_batches, step_cfg.splits)
    if step_cfg.ema is not None:
        state["ema"] = step_cfg.ema.state_dict()
    return state


def _start_from(state: TrainState, job: Job, writer: EpochWriter) -> None:
    """The model before training is the one to beat, and the best model until it is beaten."""
    metrics = job.start_metrics or {}
    state.best_metric = metrics.get(f"val_{job.task.monitor}")
    if job.stop_on is not None:
        state.stop_best = metrics.get(f"val_{job.stop_on}")
    writer.save_best(metrics)


def _resume(args, ckpt, s: Session, plain, optimizer, schedule) -> TrainState:
    world = s.ctx.world_size
    per_step = args.batch_size * args.accumulate_grad_batches
    s.log(f"batch {args.batch_size} per process x {world} process(es) x accumulation "
          f"{args.accumulate_grad_batches} = global batch {per_step * world}; "
          f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}; output in {s.output}")
    if ckpt is None:
        return TrainState()
    state = restore_train_state(ckpt, plain, optimizer, schedule, s.precision, args.resume)
    note_checkpoint(args.resume, state.epoch)  # in_session checked that epochs are left
    s.log(f"resumed from {args.resume} at epoch {state.epoch} (step {state.step})")
    return state
