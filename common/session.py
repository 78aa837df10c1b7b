"""What every training script sets up before the data: device, precision, seeds, output folder,
logging; and what it writes after each epoch: checkpoints, metrics.csv, TensorBoard, plots."""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt_lib
from .cli import plain_config, write_config
from .device import (
    configure_backends,
    default_num_workers,
    describe,
    resolve_pin_memory,
    seed_everything,
    select_device,
    set_memory_fraction,
)
from .distributed import DistContext, barrier, context_from_env, init_process_group
from .engine import TrainState
from .errors import UserError, note_checkpoint
from .optim import Schedule
from .outdir import (
    OutputLock,
    check_writable,
    note_previous_runs,
    save_failure,
    sweep_temporary_files,
    write_atomically,
)
from .precision import Precision, make_precision
from .reporting import (
    LOGGER_NAME,
    TensorBoard,
    attach_log_file,
    format_epoch,
    plot_curves,
    setup_logging,
    write_metrics_csv,
)
from .saver import BackgroundSaver, atomic_write, epoch_checkpoint_write

RUN_FILES = ("checkpoint.pth", "best_model.pth", "metrics.csv", "config.json", "curves.png",
             "training.log", "tensorboard", "bad_images.txt", "confusion_matrix.png", "val_samples.png",
             "test_metrics.json", "val_files.txt")


@dataclass
class Session:
    args: argparse.Namespace
    ctx: DistContext
    device: torch.device
    precision: Precision
    output: Path | None
    log: Callable[[str], None]
    num_workers: int
    pin_memory: bool
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # skipped (path, reason)
    # (data folder, its images held out for validation) when val was split off the training folder
    held_out: tuple[Path, list[str]] | None = None
    log_file: bool = True  # open_output starts training.log in the output folder
    # held on each output folder from open_output to close() (a pipeline trains into several)
    locks: list[OutputLock] = field(default_factory=list)

    def close(self) -> None:
        while self.locks:
            self.locks.pop().release()

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main


def start_session(args: argparse.Namespace, output: Path | None = None) -> Session:
    """Device, backends, seeds, precision and console logging. Nothing is written to `output`
    until open_output(), once the inputs have been checked."""
    ctx = context_from_env()
    logger = setup_logging(enabled=ctx.is_main)
    log = logger.info
    device = select_device(args.device, args.gpu_id, args.no_gpu,
                           local_rank=ctx.local_rank if ctx.enabled else None, log=log)
    configure_backends(device, getattr(args, "deterministic", False))
    backend = init_process_group(ctx, device, getattr(args, "dist_timeout", 1800.0))
    if ctx.enabled:
        log(f"distributed: {ctx.world_size} processes on {backend}; this is rank {ctx.rank} "
            "(only rank 0 logs and saves)")
    set_memory_fraction(args.gpu_memory_fraction, device, log)
    seed_everything(getattr(args, "seed", 0) + ctx.rank)
    precision = make_precision(device, args.amp, args.amp_dtype, log)
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    if workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {workers}")
    log(describe(device))
    log(precision.describe())
    return Session(args, ctx, device, precision, output, log, workers,
                   resolve_pin_memory(args.pin_memory, device))


def open_output(s: Session, resuming: bool, run_files: tuple[str, ...] = ()) -> None:
    """Create the output folder (moving an earlier run aside unless resuming) and start
    training.log. Called once data and model are known to be good. run_files: further names
    this recipe writes (moved aside with the rest)."""
    if s.is_main and s.output is not None:
        check_writable(s.output)
        lock = OutputLock(s.output)
        lock.acquire(s.log)  # before anything in the folder is touched
        s.locks.append(lock)
        if not resuming:
            archive_previous_run(s.output, run_files)
        sweep_temporary_files(s.output, s.log)
        if s.log_file:
            attach_log_file(s.output)
        if s.bad_images:
            text = "".join(f"{p}\t{why}\n" for p, why in s.bad_images)
            write_atomically(s.output / "bad_images.txt", lambda fh: fh.write(text))
        if s.held_out is not None:
            from .validation import HELD_OUT, held_out_text

            listing = held_out_text(*s.held_out)
            write_atomically(s.output / HELD_OUT, lambda fh: fh.write(listing))
    barrier()


def archive_previous_run(output: Path, run_files: tuple[str, ...] = ()) -> None:
    """A new run in a folder that holds an earlier run moves that run aside, never over it."""
    present = [name for name in dict.fromkeys((*RUN_FILES, *run_files)) if (output / name).exists()]
    present += [p.name for p in output.glob("checkpoint_epoch*.pth")]
    if not present:
        return
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    archive = output / f"previous_run_{stamp}"
    archive.mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.move(str(output / name), str(archive / name))
    logging.getLogger(LOGGER_NAME).info(f"notice: {output} held an earlier run; moved its files to {archive}")
    note_previous_runs(output, logging.getLogger(LOGGER_NAME).info)


class EpochWriter:
    """on_epoch_end for fit(): checkpoint.pth (resume state), best_model.pth, metrics.csv,
    TensorBoard scalars, curves.png and the epoch's log line. Only rank 0 writes.

    curves.png takes matplotlib a good part of a second, so it is drawn after the first epoch,
    then at most once a minute, and at the end (close()), not between every two epochs."""

    PLOT_EVERY_S = 60.0

    def __init__(self, session: Session, model: nn.Module, *, task: str,
                 model_spec: dict[str, Any], meta: dict[str, Any], optimizer: torch.optim.Optimizer,
                 schedule: Schedule, epochs: int, extra_state: Callable[[], dict] | None = None,
                 keep_last: int | None = None, extra_output: Callable | None = None,
                 best_name: str = "best_model.pth", tb_dir: Path | None = None,
                 baseline: dict[str, float] | None = None, ema: Any = None):
        """keep_last: also write checkpoint_epoch{N}.pth (weights and metadata, no train state) and
        keep the last K of them and the best epoch's (0: all; None: none).
        extra_output(state, tensorboard): task-specific output after each epoch (rank 0).
        best_name: file name of the best model in the output folder; tb_dir: TensorBoard folder
        (default: OUTPUT/tensorboard); baseline: val metrics before training, shown in curves.png."""
        self.s = session
        self.model, self.task, self.spec, self.meta = model, task, model_spec, meta
        self.optimizer, self.schedule, self.epochs = optimizer, schedule, epochs
        self.extra_state, self.keep_last, self.extra_output = extra_state, keep_last, extra_output
        self.best_name, self.baseline, self.ema = best_name, baseline, ema
        self.history: list[dict[str, float]] = []
        self.plotted = float("-inf")  # the first epoch draws curves.png; later ones once a minute
        self.tb_dir = tb_dir if tb_dir is not None else (session.output or Path(".")) / "tensorboard"
        self.tb = None
        # Reused host buffers: pinned on CUDA, plain (still far cheaper than fresh copies) on a CPU.
        self.saver = BackgroundSaver(pin_memory=True)

    def __call__(self, state: TrainState, record: dict[str, float], improved: bool) -> None:
        if self.s.is_main:
            metrics = {k: v for k, v in record.items() if k != "epoch"}
            config = plain_config(self.s.args)
            payload = self._payload(metrics, config, self.train_state(state))
            best = self._best_payload(payload, metrics, state.best_from_ema) if improved else None
            plot = time.monotonic() - self.plotted >= self.PLOT_EVERY_S
            # One host copy of everything the writes need; training goes on while they run.
            snap = self._saving(self.saver.snapshot, {"checkpoint": payload, "best": best,
                                                      "history": state.history})
            self._saving(self.saver.submit, self._writes(snap, state.epoch, plot, state.best_epoch))
            if plot:
                self.plotted = time.monotonic()
            if self.tb is None:
                self.tb = TensorBoard(self.tb_dir, self.s.log, purge_step=state.epoch)
            self.tb.scalars(record)
            self.history = state.history
            if self.extra_output is not None:
                self.extra_output(state, self.tb)
            self.s.log(format_epoch(record, self.epochs, improved))
        barrier()

    def _writes(self, snap: dict[str, Any], epoch: int, plot: bool, best_epoch: int | None = None) -> list:
        """In this order: the best model before the checkpoint that names it, the epoch's weights file,
        metrics.csv, curves.png."""
        out = self.s.output
        writes = [atomic_write(snap["best"], out / self.best_name)] if snap["best"] is not None else []
        writes.append(atomic_write(snap["checkpoint"], out / "checkpoint.pth"))
        writes.append(("(noting the save)", lambda: note_checkpoint(out / "checkpoint.pth", epoch)))
        if self.keep_last is not None:
            writes.append(epoch_checkpoint_write(snap["checkpoint"], out, epoch, self.keep_last, best_epoch))
        writes.append((str(out / "metrics.csv"),
                       lambda: write_metrics_csv(snap["history"], out / "metrics.csv")))
        if plot:
            writes.append((str(out / "curves.png"),
                           lambda: plot_curves(snap["history"], out / "curves.png", self.baseline)))
        return writes

    def _best_payload(self, payload: dict[str, Any], metrics: dict[str, float],
                      from_ema: bool) -> dict[str, Any]:
        """best_model.pth: the checkpoint without its train state (the same tensors, copied once),
        or the moving average's weights when they are the better (--ema)."""
        if from_ema and self.ema is not None:  # its metrics are the ones of the weights it holds
            metrics = {**metrics, **{k.replace("val_ema_", "val_"): v for k, v in metrics.items()
                                     if k.startswith("val_ema_")}}
            return self._payload(metrics, payload["config"], None, self.ema.module)
        return {k: v for k, v in payload.items() if k != "train_state"}

    def save_best(self, metrics: dict[str, float]) -> None:
        """The model as it is now, as the best model (rank 0 only; before the first epoch)."""
        if self.s.is_main:
            payload = self._payload(metrics, plain_config(self.s.args), None)
            payload = self._saving(self.saver.snapshot, payload)
            self._saving(self.saver.submit, [atomic_write(payload, self.s.output / self.best_name)])

    def _saving(self, call: Callable, *args: Any) -> Any:
        """A saver call; a write of this run that failed (now or in the background) becomes one line
        saying which file, why, and that the previous checkpoint is intact."""
        try:
            return call(*args)
        except OSError as exc:
            last = self.s.output / "checkpoint.pth"
            needed = last.stat().st_size if last.is_file() else None
            raise save_failure(exc, self.s.output, needed) from None

    def _payload(self, metrics, config, train_state, model: nn.Module | None = None) -> dict[str, Any]:
        return ckpt_lib.make_payload(model or self.model, task=self.task, model_spec=self.spec,
                                     meta=self.meta, metrics=metrics, config=config,
                                     train_state=train_state, to_host=False)  # the saver copies

    def train_state(self, state: TrainState) -> dict[str, Any]:
        data = state.to_dict()
        data.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                    scaler=self.s.precision.scaler.state_dict(), rng=ckpt_lib.rng_state())
        if self.extra_state is not None:
            data.update(self.extra_state())
        return data

    def _plot(self) -> None:
        if self.history:
            plot_curves(self.history, self.s.output / "curves.png", self.baseline)
        self.plotted = time.monotonic()

    def close(self) -> None:
        """Wait for the writes in flight (raising their error), then the final curves.png (also
        after an interruption or early stopping)."""
        try:
            self._saving(self.saver.close)
        finally:
            if self.s.is_main:
                self._plot()
            if self.tb is not None:
                self.tb.close()


def restore_train_state(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        schedule: Schedule, precision: Precision, source: str) -> TrainState:
    """Put weights, optimizer, schedule, scaler and RNG back as they were at the save."""
    ckpt_lib.load_state_dict_checked(ckpt_lib.unwrap_model(model), ckpt["state_dict"], source)
    ts = ckpt["train_state"]
    try:
        optimizer.load_state_dict(ts["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"optimizer state in {source} does not fit (--optimizer changed?): "
                        f"{exc}; resume with the original --optimizer") from None
    schedule.load_state_dict(ts["schedule"])
    if ts.get("scaler"):
        precision.scaler.load_state_dict(ts["scaler"])
    ckpt_lib.set_rng_state(ts["rng"])
    return TrainState.from_dict(ts)


def save_run_config(session: Session) -> None:
    if session.is_main:
        write_config(session.args, session.output / "config.json")
