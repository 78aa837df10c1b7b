"""Logging (console + training.log), metrics.csv, TensorBoard scalars and PNG plots.

A file here that cannot be written (a full disk, a folder without permission) is one UserError
naming it (outdir.write_failure), never a traceback; what the file held before stays as it was
(metrics.csv and the plots are written to a temporary file and renamed over the old one)."""
from __future__ import annotations

import contextlib
import csv
import functools
import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outdir import write_failure

LOGGER_NAME = "toolkit"


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on the first plot: importing
    this module (every script does) does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def setup_logging(enabled: bool = True) -> logging.Logger:
    """Console logging (stdout); lines are also kept until attach_log_file() writes them to
    training.log, so a run that fails on bad input leaves the output folder untouched."""
    logger = logging.getLogger(LOGGER_NAME)
    close_logging()
    logger.setLevel(logging.INFO if enabled else logging.ERROR)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    logger.addHandler(logging.handlers.BufferingHandler(capacity=10_000))
    return logger


def attach_log_file(output_dir: Path) -> None:
    """Start training.log (appended on resume) with the lines logged so far."""
    logger = logging.getLogger(LOGGER_NAME)
    path = output_dir / "training.log"
    try:
        file = _LogFile(path, encoding="utf-8")
    except OSError as exc:
        raise write_failure(exc, path) from None
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.BufferingHandler):
            for record in handler.buffer:
                file.handle(record)
            logger.removeHandler(handler)
            handler.close()
    logger.addHandler(file)


class _LogFile(logging.FileHandler):
    """training.log. A line that cannot be written (a full disk) stops the run with one error line,
    where logging would print a traceback to stderr and go on; the file is silent after that."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # called inside emit's except block
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self.failed = True
        raise write_failure(exc, self.baseFilename) from None

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last lines of a failed file: the console has shown them
            if not self.failed:
                raise


def close_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def format_epoch(record: dict[str, float], epochs: int, improved: bool) -> str:
    parts = [f"epoch {int(record['epoch'])}/{epochs}"]
    for split in ("train", "val"):
        if f"{split}_loss" in record:
            text = f"{split} loss {record[f'{split}_loss']:.4f}"
            if f"{split}_acc" in record:
                text += f" acc {100 * record[f'{split}_acc']:.2f}%"
            if f"{split}_ema_acc" in record:
                text += f" (ema {100 * record[f'{split}_ema_acc']:.2f}%)"
            parts.append(text)
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['samples_per_s']:.0f} img/s")
    parts.append(f"{record['epoch_time']:.1f}s")
    if improved:
        parts.append("* best")
    return " | ".join(parts)


def write_metrics_csv(history: Sequence[dict[str, float]], path: Path) -> None:
    """Rewrite metrics.csv from the run's history (so a resumed run has one row per epoch)."""
    if not history:
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in history:
                writer.writerow({k: _fmt(row.get(k)) for k in columns})
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_failure(exc, path) from None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class TensorBoard:
    """Scalars per epoch; absent tensorboard means a notice, not a crash. An events file that cannot
    be written is one UserError (once: the writer is dropped)."""

    def __init__(self, folder: Path, log, purge_step: int | None = None):
        self.writer = None
        self.folder = folder
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("notice: tensorboard is not installed; no TensorBoard logs "
                "(pip install tensorboard)")
            return
        _quiet_tensorboard_thread()
        try:
            self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        except OSError as exc:
            raise self._failure(exc) from None

    def scalars(self, record: dict[str, float]) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"])
        try:
            for key, value in record.items():
                if key != "epoch":
                    group = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                    self.writer.add_scalar(group, value, step)
            self.writer.flush()
        except OSError as exc:
            raise self._failure(exc) from None

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                raise self._failure(exc) from None

    def _failure(self, exc: OSError):
        """The events file (or, when the error names none, the folder) as one line; the broken writer
        is closed quietly and dropped, so that closing the run does not fail a second time."""
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        if exc.filename is not None:
            return write_failure(exc, os.fsdecode(exc.filename))
        return write_failure(exc, self.folder, f"the TensorBoard log in {self.folder}")


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes its events file on a thread of its own. A failed write is kept for the next
    add or flush in the training thread (where TensorBoard turns it into one line) and re-raised in
    that thread too, whose traceback threading would print: keep that one (an OSError) off stderr."""
    hook = threading.excepthook
    if getattr(hook, "quiet_tensorboard", False):
        return

    def quiet(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            hook(args)

    quiet.quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = quiet


def plot_curves(history: Sequence[dict[str, float]], path: Path,
                baseline: dict[str, float] | None = None) -> None:
    """curves.png: loss, the task's main metric, and the learning rate per epoch.
    baseline: validation metrics of the model before training (fine-tuning), drawn as a dashed line."""
    if not history:
        return
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    metric = next((m for m in ("acc", "dice") if f"val_{m}" in history[0]
                   or f"train_{m}" in history[0]), None)
    panels = ["loss"] + ([metric] if metric else []) + ["lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, name in zip(axes, panels, strict=True):
        if name == "lr":
            ax.plot(epochs, [r["lr"] for r in history], color="tab:green")
            ax.set_yscale("log" if min(r["lr"] for r in history) > 0 else "linear")
        else:
            for split in ("train", "val"):
                key = f"{split}_{name}"
                if key in history[0]:
                    ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker=".",
                            label=split)
            if baseline and f"val_{name}" in baseline:
                ax.axhline(baseline[f"val_{name}"], color="tab:gray", linestyle="--",
                           label="val before training")
            ax.legend()
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: Path, title: str = "confusion matrix") -> None:
    plt = _pyplot()
    n = len(classes)
    size = min(max(4.0, 0.5 * n + 2), 20.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                ax.text(j, i, str(value), ha="center", va="center",
                        color="white" if value > peak / 2 else "black", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_failure(exc, path) from None
    finally:
        _pyplot().close(fig)


def save_png(picture, path: Path) -> None:
    """An HxWx3 uint8 array as a PNG, written atomically."""
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        Image.fromarray(picture).save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_failure(exc, path) from None


def _discard(tmp: Path) -> None:
    """The temporary file of a write that failed (what it replaces is untouched)."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def plot_sample_grid(rows: Sequence[Sequence[Any]], path: Path, titles: Sequence[str],
                     panel_px: int = 240) -> None:
    """A grid of pictures (rows of HxWx3 uint8 arrays, e.g. image | true mask | predicted) with one
    title per column, each panel about panel_px pixels on its shorter side (at most 2.5 times that on
    the longer one) whatever the pictures' own size (small ones are enlarged without smoothing), as a
    PNG written atomically."""
    if not rows:
        return
    plt = _pyplot()
    height, width = rows[0][0].shape[:2]
    inch = panel_px / 100  # _save writes at 100 dpi
    aspect = min(max(height / max(width, 1), 0.4), 2.5)
    panel_w, panel_h = (inch / aspect, inch) if aspect <= 1 else (inch, inch * aspect)
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * panel_w + 0.2, len(rows) * panel_h + 0.5),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            ax = axes[r][c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])  # the frame stays: a white mask beside a white mask keeps its edge
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=12)
    fig.tight_layout(pad=0.3)
    _save(fig, path)
