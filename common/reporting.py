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
import math
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outdir import PREVIOUS_RUN_PREFIX, disk_size, human_size, previous_runs, removal_command, write_failure

LOGGER_NAME = "toolkit"


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on the first plot: importing
    this module (every script does) does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


class _Console(logging.StreamHandler):
    """The console handler. When the reader of a pipe has gone (`python gpu_train.py | head`),
    the console lines stop and the run goes on, writing training.log: no "Logging error" block
    with a traceback for every later line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            self.setStream(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - lives with the handler
            return
        super().handleError(record)


def setup_logging(enabled: bool = True) -> logging.Logger:
    """Console logging (stdout); lines are also kept until attach_log_file() writes them to
    training.log, so a run that fails on bad input leaves the output folder untouched."""
    logger = logging.getLogger(LOGGER_NAME)
    close_logging()
    logger.setLevel(logging.INFO if enabled else logging.ERROR)
    logger.propagate = False
    console = _Console(sys.stdout)
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


def format_rate(per_second: float) -> str:
    """A throughput as people read it: 0.25 and 1.3 where it is small, 120 where it is not."""
    if per_second < 1:
        return f"{per_second:.2f}"
    return f"{per_second:.1f}" if per_second < 10 else f"{per_second:.0f}"


def _metric_text(record: dict[str, float], prefix: str, iou: bool = True) -> str:
    """The metrics of one split (prefix "train_", "val_", "val_ema_") as the epoch line shows them."""
    parts = []
    if f"{prefix}acc" in record:
        parts.append(f"acc {100 * record[f'{prefix}acc']:.2f}%")
    if f"{prefix}dice" in record:
        parts.append(f"Dice {record[f'{prefix}dice']:.4f}")
    if iou and f"{prefix}iou" in record:
        parts.append(f"IoU {record[f'{prefix}iou']:.4f}")
    return " ".join(parts)


def format_epoch(record: dict[str, float], epochs: int, improved: bool) -> str:
    """One line per epoch: loss and metrics (accuracy in %, or Dice and IoU) per split, lr,
    throughput, time, and `* best` when the monitored validation metric improved."""
    parts = [f"epoch {int(record['epoch'])}/{epochs}"]
    for split in ("train", "val"):
        if f"{split}_loss" in record:
            text = f"{split} loss {record[f'{split}_loss']:.4f}"
            metrics = _metric_text(record, f"{split}_", iou=split == "val")
            text += f" {metrics}" if metrics else ""
            ema = _metric_text(record, f"{split}_ema_", iou=False)
            text += f" (ema {ema.split(' ', 1)[1]})" if ema else ""
            parts.append(text)
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{format_rate(record['samples_per_s'])} img/s")
    parts.append(f"{record['epoch_time']:.1f}s")
    if improved:
        parts.append("* best")
    return " | ".join(parts)


def progress_fields(metrics: dict[str, float], lr: float, per_second: float) -> dict[str, str]:
    """The progress bar's postfix: the training metrics as the epoch line writes them."""
    shown = {}
    for key, value in metrics.items():
        shown[key] = f"{100 * value:.2f}%" if key in ("acc", "top5") else f"{value:.4f}"
    shown.update(lr=f"{lr:.2e}", **{"img/s": format_rate(per_second)})
    return shown


def progress_title(epoch: int, epochs: int, history: Sequence[dict[str, float]]) -> str:
    """The progress bar's description: the epoch, and the last epoch's validation metrics (which
    decide the best model) while this one trains."""
    title = f"epoch {epoch}/{epochs}"
    last = _metric_text(history[-1], "val_") if history else ""
    return f"{title} (last val {last})" if last else title


def format_duration(seconds: float) -> str:
    """42.1s, 3m 12s, 2h 05m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def format_command(argv: Sequence[str]) -> str:
    """A command line to copy into this system's shell (arguments with spaces quoted)."""
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline(list(argv))
    import shlex

    return shlex.join(argv)


# What each file of a run's folder is, in the order the summary lists them.
_OUTPUT_FILES = {
    "best_model.pth": "the best model: validate.py, predict.py and export_onnx.py take it",
    "checkpoint.pth": "resume state of the last epoch (--resume)",
    "checkpoint_epoch*.pth": "weights of epoch",
    "metrics.csv": "one row per epoch",
    "curves.png": "loss, metric and learning rate per epoch",
    "val_samples.png": "validation images, true and predicted masks",
    "val_files.txt": "the images held out for validation (validate.py --files)",
    "test_files.txt": "the recordings no model trained on (validate.py --files)",
    "confusion_matrix.png": "confusion matrix",
    "test_metrics.json": "the best model on the test split",
    "report.md": "the models compared",
    "results.json": "every model's results",
    "splits.json": "which recording went to which split",
    "training.log": "this log",
    "config.json": "the settings of this run",
    "tensorboard": "TensorBoard scalars: tensorboard --logdir {path}",
    "bad_images.txt": "unreadable images that were skipped",
    "nonfinite_batch.json": "the first step with a non-finite loss or gradient",
}


def run_outputs(output: Path) -> list[tuple[str, int, str]]:
    """(name, bytes, what it is) of each thing a run left in its folder, as it is on disk now (the
    folders of earlier runs and hidden files aside); the epoch weights files are one entry."""
    try:
        present = sorted(p for p in output.iterdir() if not p.name.startswith((".", PREVIOUS_RUN_PREFIX)))
    except OSError:
        return []
    epochs = sorted((p for p in present if p.is_file() and re.fullmatch(r"checkpoint_epoch\d+\.pth", p.name)),
                    key=lambda p: int(p.stem.removeprefix("checkpoint_epoch")))
    entries: dict[str, tuple[int, str]] = {}
    if epochs:
        numbers = ", ".join(p.stem.removeprefix("checkpoint_epoch") for p in epochs)
        entries["checkpoint_epoch*.pth"] = (sum(disk_size(p) for p in epochs),
                                            f"weights of epoch{'s' if len(epochs) > 1 else ''} {numbers}")
    for path in (p for p in present if p not in epochs):
        what = _OUTPUT_FILES.get(path.name, "").format(path=path)
        if not what and path.is_dir():
            inside = sorted(q.name for q in path.iterdir() if not q.name.startswith("."))
            what = ", ".join(inside[:4]) + (", ..." if len(inside) > 4 else "")
        entries[f"{path.name}/" if path.is_dir() else path.name] = (disk_size(path), what)
    order = [name.rstrip("/") for name in _OUTPUT_FILES]
    ranked = sorted(entries, key=lambda n: (order.index(n.rstrip("/")) if n.rstrip("/") in order
                                            else len(order), n))
    return [(name, *entries[name]) for name in ranked]


def run_summary(output: Path, *, best: str | None, seconds: float | None,
                commands: Sequence[Sequence[str]] = (), extra: Sequence[Path] = ()) -> list[str]:
    """The block that ends a run (before its "done: ..." line): the best result and its epoch, the
    time, each output that exists with its size, the disk the run's outputs use, the earlier runs kept
    in the folder, and the commands to run next."""
    lines = ["summary:"]
    if best:
        lines.append(f"  best: {best}")
    if seconds is not None:
        lines.append(f"  time: {format_duration(seconds)}")
    entries = run_outputs(output)
    outside = [p for p in dict.fromkeys(extra) if p.exists() and output.resolve() not in p.resolve().parents]
    used = sum(size for _, size, _ in entries) + sum(disk_size(p) for p in outside)
    lines.append(f"  disk used by this run's outputs: {human_size(used)}")
    lines.append(f"  outputs in {output}:")
    width = max((len(name) for name, _, _ in entries), default=0)
    for name, size, what in entries:
        lines.append(f"    {name:<{width}}  {human_size(size):>8}  {what}".rstrip())
    for path in outside:
        lines.append(f"  also {path}{'/' if path.is_dir() else ''} ({human_size(disk_size(path))})")
    runs = previous_runs(output)
    if runs:
        lines.append(f"  earlier runs kept in {output}: {len(runs)} {PREVIOUS_RUN_PREFIX}* folder(s), "
                     f"{human_size(sum(disk_size(p) for p in runs))} (remove: {removal_command(output)})")
    if commands:
        lines.append("  next:")
        lines += [f"    {format_command(argv)}" for argv in commands]
    return lines


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


_SPLITS = (("train", "train"), ("val", "val"), ("val_ema", "val (EMA)"))


def _metric_panels(keys: set[str]) -> list[tuple[str, tuple[str, ...], float]]:
    """(title, metrics, scale) of the panels between loss and lr: accuracy in % as the console
    writes it, or Dice and IoU for segmentation."""
    def has(metric: str) -> bool:
        return any(f"{split}_{metric}" in keys for split, _ in _SPLITS)

    panels = []
    if has("acc"):
        panels.append(("accuracy (%)", ("acc",), 100.0))
    if has("dice") or has("iou"):
        panels.append(("Dice / IoU", tuple(m for m in ("dice", "iou") if has(m)), 1.0))
    return panels


def plot_curves(history: Sequence[dict[str, float]], path: Path,
                baseline: dict[str, float] | None = None):
    """curves.png: loss, the task's metric (accuracy in %, or Dice and IoU) and the learning rate per
    epoch, on integer epoch ticks with every epoch's point marked when there are few.
    baseline: validation metrics of the model before training (fine-tuning), drawn as a dashed line.
    Returns the (closed) figure, whose lines hold the plotted numbers."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    keys = {k for r in history for k in r}
    panels = [("loss", ("loss",), 1.0), *_metric_panels(keys)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4), squeeze=False)
    style = {"marker": "o", "markersize": 4} if len(epochs) <= 30 else {}
    for ax, (title, metrics, scale) in zip(axes[0], panels, strict=False):
        for metric in metrics:
            for colour, (split, label) in enumerate(_SPLITS):
                key = f"{split}_{metric}"
                if key in keys:
                    name = f"{label} {'IoU' if metric == 'iou' else 'Dice'}" if len(metrics) > 1 else label
                    ax.plot(epochs, [scale * r.get(key, float("nan")) for r in history], label=name,
                            color=f"C{colour}", linestyle="--" if metric == "iou" else "-", **style)
            if baseline and f"val_{metric}" in baseline:
                ax.axhline(scale * baseline[f"val_{metric}"], color="tab:gray", linestyle=":",
                           label="val before training")
        ax.set_title(title)
        ax.legend()
    _plot_lr(axes[0][-1], epochs, [r.get("lr", float("nan")) for r in history], style)
    for ax in axes[0]:
        _epoch_axis(ax, epochs)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _plot_lr(ax, epochs: list[float], lrs: list[float], style: dict[str, Any]) -> None:
    """The lr at the end of each epoch: on a log scale when it spans more than a decade (and never
    reaches 0), else on a linear one from 0 with plain tick labels; a constant lr says so."""
    from matplotlib.ticker import FuncFormatter

    ax.plot(epochs, lrs, color="tab:green", **style)
    finite = [v for v in lrs if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    if low > 0 and high / low > 10:
        ax.set_yscale("log")
        ax.set_title("learning rate (log scale)")
        return
    ax.set_ylim(0, high * 1.15 if high > 0 else 1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_title(f"learning rate (constant {high:.3g})" if finite and low == high else "learning rate")


def _epoch_axis(ax, epochs: list[float]) -> None:
    """Whole epochs as ticks, and an x range of at least one epoch (one epoch: 0.5 .. 1.5)."""
    from matplotlib.ticker import MaxNLocator

    first, last = min(epochs), max(epochs)
    pad = 0.5 if last - first <= 10 else 0.03 * (last - first)
    ax.set_xlim(first - pad, last + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


# Fonts with the glyphs of Chinese (and Japanese, Korean) names, the most common first; any other
# installed font that has every character is tried after these.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans SC",
             "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "Microsoft YaHei", "PingFang SC",
             "SimHei", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Hiragino Sans GB", "Heiti SC", "SimSun",
             "Droid Sans Fallback", "Arial Unicode MS", "Noto Sans")


@functools.cache
def _charmap(fname: str, index: int = 0) -> frozenset[int]:
    """The code points a font file has glyphs for (empty when the file cannot be read)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(fname, face_index=index).get_charmap())
    except (OSError, RuntimeError, ValueError, TypeError):
        return frozenset()


def _needed(texts: Sequence[str]) -> frozenset[int]:
    return frozenset(ord(c) for text in texts for c in text if c.isprintable() and not c.isspace())


def _missing(texts: Sequence[str]) -> frozenset[int]:
    """The characters of `texts` that matplotlib's default font has no glyph for."""
    from matplotlib import font_manager

    return _needed(texts) - _charmap(font_manager.findfont(font_manager.FontProperties()))


def _default_covers(texts: Sequence[str]) -> bool:
    return not _missing(texts)


def font_family_for(texts: Sequence[str]) -> list[str] | None:
    """The font.family under which every character of `texts` has a glyph: [] when matplotlib's
    default font has them all; else the default families followed by an installed font that has the
    rest (the CJK fonts of CJK_FONTS first; matplotlib takes each glyph from the first font of the
    list that has it); None when no installed font has them."""
    missing = _missing(texts)
    if not missing:
        return []
    from matplotlib import font_manager, rcParams

    entries = font_manager.fontManager.ttflist
    found = _covering_font(missing, tuple((e.name, e.fname, e.index) for e in entries))
    return None if found is None else [*rcParams["font.family"], found]


@functools.lru_cache(maxsize=32)
def _covering_font(needed: frozenset[int], entries: tuple[tuple[str, str, int], ...]) -> str | None:
    rank = {name: i for i, name in enumerate(CJK_FONTS)}
    for name, fname, index in sorted(entries, key=lambda e: (rank.get(e[0], len(rank)), e[0])):
        # matplotlib's "Last Resort" font maps every character to a placeholder box: not a glyph
        if not name.startswith("Last Resort") and needed <= _charmap(fname, index):
            return name
    return None


_NAMED: set[tuple[str, ...]] = set()  # class-name lists already named in a notice


def _class_labels(classes: Sequence[str], title: str, path: Path) -> tuple[list[str], list[str], str, str]:
    """(tick labels, font.family, title, x label) for a confusion matrix. Names no installed font can
    draw become their class index ("3", or "3: cat" where the name is drawable), and the index -> name
    list is written to <picture>_classes.txt beside the picture (a notice in the log says so): the
    picture has no boxes for the missing glyphs, and matplotlib prints no warnings."""
    family = font_family_for([*classes, title])
    if family is not None:
        return list(classes), family, title, "predicted"
    labels = [f"{i}: {name}" if _default_covers([name]) else str(i) for i, name in enumerate(classes)]
    listing = path.with_name(f"{path.stem}_classes.txt")
    tmp = listing.with_name(f".{listing.name}.tmp")
    try:
        tmp.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(classes)), encoding="utf-8")
        os.replace(tmp, listing)
    except OSError as exc:
        _discard(tmp)
        raise write_failure(exc, listing) from None
    if tuple(classes) not in _NAMED:
        _NAMED.add(tuple(classes))
        logging.getLogger(LOGGER_NAME).info(
            f"notice: no installed font has the characters of the class names ({', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}); {path.name} labels them by class index, listed in "
            f"{listing} (install a font such as Noto Sans CJK SC to see the names in the picture)")
    drawable_title = title if _default_covers([title]) else "confusion matrix"
    return labels, [], drawable_title, f"predicted\nclass index -> name: {listing.name}"


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: Path, title: str = "confusion matrix"):
    """confusion_matrix.png: counts per (true, predicted) class, the class names drawn with a font that
    has their glyphs (see _class_labels). Returns the (closed) figure."""
    plt = _pyplot()
    labels, family, title, xlabel = _class_labels(classes, title, path)
    n = len(classes)
    size = min(max(4.0, 0.5 * n + 2), 20.0)
    with plt.rc_context({"font.family": family} if family else {}):
        note = max(len(line) for line in xlabel.splitlines())  # the fallback's file name fits
        fig, ax = plt.subplots(figsize=(max(size, 0.08 * note + 0.8), size))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel(xlabel, fontsize=9 if "\n" in xlabel else None)
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
    return fig


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
