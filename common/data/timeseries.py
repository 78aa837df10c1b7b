"""Time-series behaviour classification data: wearable recordings (accelerometer, gyroscope)
exported as CSV (or one .npz), cut into fixed-length windows of shape (T, C).

Three layouts, detected from `data_dir` (a folder or a file):

(a) "per-recording": one CSV per recording in class folders, DIR/<class>/*.csv, or with split
    folders DIR/train/<class>/*.csv, DIR/val/<class>/*.csv and optionally DIR/test/<class>/*.csv.
    Rows are time steps, numeric columns are channels. The header row is optional; without one,
    column j is named "ch<j>". Each recording gives one window of `window_size` steps (default:
    the median length): a longer one is cropped around its centre, a shorter one zero-padded at
    the end; with a `stride`, a longer one is cut into several windows instead.
    Recording id: the file's path relative to DIR, e.g. "walk/rec_003.csv" or "train/walk/r.csv".
(b) "long": CSV files with a header (DIR/*.csv, DIR itself one .csv file, or split folders
    DIR/train/*.csv, DIR/val/*.csv): channel columns, a label column (default "label") with the
    class of every row, optionally a group column (recording / subject / session) and a time
    column. Windows of `window_size` steps (default 128, or the shortest group when shorter) are
    cut every `stride` steps (default window_size // 2) within each contiguous run of one group
    of one file; a window's label is its majority label (ties: the first class), and
    `pure_windows` drops windows holding several labels. Group id: "<file>:<group value>", or
    "<file>" without a group column.
(c) "npz": one .npz file (DIR itself, or the only .npz in DIR) holding X (N, T, C) and y (N,)
    with int or string labels. Sample i is the recording "sample_<i>"; channels are "ch0", ...

Columns: numeric columns are channels, except the label, group and time columns (a column named
t, time or timestamp, or `time_column`). Columns without numbers (subject name, date) and unnamed
columns (a row index) are ignored with a note; `channels` names the channel columns explicitly.
Every recording must have the same channels. A stray non-numeric cell or an empty cell in a
channel is an error naming file, line and column; `fill_missing` "ffill" or "zero" fills gaps.

Splits: split folders are kept (train/ and val/ needed, test/ optional). Otherwise recordings
(groups in (b)) are split into train/val/test, stratified by class with a fixed seed; all windows
of one recording or group land in the same split. `data_glob` merges several folders of the same
layout (ids are prefixed with the folder name). Windows come back as float32 (N, T, C), not
normalised: fit_normalizer() on the training windows, then normalize() or SeriesDataset, which
hands (C, T) tensors to the model.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
import re
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

SPLITS = ("train", "val", "test")
TIME_NAMES = ("t", "time", "timestamp")
MISSING = ("", "nan", "na", "n/a", "null", "none")
FILL_MODES = ("ffill", "zero")
DEFAULT_WINDOW = 128
STD_FLOOR = 1e-6
LAYOUT_NAMES = {"per-recording": "one CSV per recording in class folders (layout a)",
                "long": "long CSV recordings with a label column (layout b)",
                "npz": "a .npz file (layout c)"}
LAYOUTS = ("expected one of three layouts: (a) one CSV per recording in class folders "
           "(DIR/<class>/*.csv or DIR/train/<class>/*.csv), (b) long CSV files with a label column "
           "(DIR/*.csv or one .csv file), (c) one .npz file holding X (N, T, C) and y (N,)")
_SHOW = 6  # how many names a message lists


@dataclass
class SeriesSplit:
    X: np.ndarray  # float32 (N, T, C): windows, not normalised
    y: np.ndarray  # int64 (N,)
    ids: list[str]  # recording/group id of each window


@dataclass
class SeriesData:
    classes: list[str]  # sorted class names, label order
    channels: list[str]  # channel column names; "ch0", ... without a header and for .npz
    window_size: int
    splits: dict[str, SeriesSplit]  # "train", "val" and, when there is one, "test"
    split_ids: dict[str, list[str]]  # sorted recording/group ids per split
    layout: str  # "per-recording", "long", "npz"
    notes: list[str]  # lines to log
    options: dict  # plain-typed reading options that prediction needs again


@dataclass
class _Options:
    label_column: str = "label"
    group_column: str | None = None
    time_column: str | None = None
    channels: list[str] | None = None
    window_size: int | None = None
    stride: int | None = None
    pure_windows: bool = False
    fill_missing: str | None = None
    predicting: bool = False


@dataclass
class _Table:
    """A CSV file as text columns; lines[i] is the 1-based line of data row i (as an editor shows)."""
    path: Path
    has_header: bool
    names: list[str]
    columns: list[list[str]]
    lines: list[int]
    decimal_comma: bool


@dataclass
class _Recording:
    id: str
    values: np.ndarray  # float32 (T, C)
    label: str | None = None  # class of the whole recording: layouts (a) and (c)
    row_labels: np.ndarray | None = None  # class of every row: layout (b)
    split: str | None = None  # the split folder it came from


@dataclass
class _Plan:
    """What one data folder (or file) holds: layout and (file, id, class, split) to read."""
    root: Path
    layout: str
    files: list[tuple[Path, str, str | None, str | None]]
    split_folders: bool
    notes: list[str]


@dataclass
class _Windows:
    X: np.ndarray
    labels: list[str]
    ids: list[str]
    window: int
    stride: int | None


def _listing(items: Sequence[Any], limit: int = _SHOW) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _quoted(items: Sequence[str]) -> str:
    return _listing([f"'{i}'" for i in items])


# ------------------------------------------------------------------ reading one CSV file


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); check that the file exists "
                        "and is readable") from None
    if b"\x00" in data[:65536]:
        raise UserError(f"{path} is not a text CSV file (it holds binary data, e.g. an Excel file "
                        "renamed to .csv); export the recording as CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _delimiter(text: str) -> str:
    first = next((line for line in text.splitlines() if line.strip()), "")
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _csv_rows(text: str, delimiter: str, path: Path) -> tuple[list[list[str]], list[int]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, lines = [], []
    try:
        for row in reader:
            if row and (row[0].strip() or any(cell.strip() for cell in row)):
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix that line "
                        "(often an unclosed quote)") from None
    return rows, lines


def _cell_kind(cell: str, decimal_comma: bool) -> str:
    text = cell.strip()
    if text.lower() in MISSING:
        return "missing"
    try:
        float(text.replace(",", ".") if decimal_comma else text)
    except ValueError:
        return "text"
    return "number"


def _has_header(rows: list[list[str]], decimal_comma: bool) -> bool:
    """Row 1 is a header when all its cells are text, or when one of its text cells heads a
    column whose next rows are mostly numbers."""
    kinds = [_cell_kind(c, decimal_comma) for c in rows[0]]
    if all(k == "text" for k in kinds):
        return True
    body = rows[1:21]
    for j, kind in enumerate(kinds):
        if kind != "text":
            continue
        below = [_cell_kind(r[j], decimal_comma) for r in body if j < len(r)]
        if below.count("number") > below.count("text"):
            return True
    return False


def _fit_row(row: list[str], width: int, line: int, path: Path, header: list[str] | None) -> list[str]:
    """Trailing empty cells beyond the width are dropped, cells of unnamed trailing columns added."""
    if len(row) == width:
        return row
    if len(row) > width and not any(c.strip() for c in row[width:]):
        return row[:width]
    if len(row) < width and header is not None and not any(header[len(row):]):
        return row + [""] * (width - len(row))
    expected = f"the header has {width} columns" if header is not None else f"the first row has {width}"
    raise UserError(f"{path} line {line} has {len(row)} cells but {expected}; fix or remove that line")


def _check_unique_names(names: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if name and name in seen:
            raise UserError(f"{path} has two columns named '{name}' (columns {seen[name] + 1} and "
                            f"{j + 1}); rename one of them")
        seen.setdefault(name, j)


def _read_table(path: Path) -> _Table:
    text = _read_text(path)
    delimiter = _delimiter(text)
    rows, lines = _csv_rows(text, delimiter, path)
    if not rows:
        raise UserError(f"{path} is empty; remove it or export the recording again")
    comma = delimiter == ";"
    header = [c.strip() for c in rows[0]] if _has_header(rows, comma) else None
    if header is not None:
        rows, lines = rows[1:], lines[1:]
        if not rows:
            raise UserError(f"{path} has a header row but no data rows; remove it or export the "
                            "recording again")
    width = len(header) if header is not None else len(rows[0])
    rows = [_fit_row(row, width, line, path, header) for row, line in zip(rows, lines, strict=True)]
    names = header if header is not None else [f"ch{j}" for j in range(width)]
    _check_unique_names(names, path)
    return _Table(path, header is not None, names, [list(c) for c in zip(*rows, strict=True)], lines, comma)


# ------------------------------------------------------------------ columns -> channel values


def _is_numeric_column(cells: list[str], decimal_comma: bool) -> bool | None:
    """Whether most of the first 200 filled cells are numbers; None when all cells are empty."""
    numbers = texts = 0
    for cell in cells:
        kind = _cell_kind(cell, decimal_comma)
        numbers += kind == "number"
        texts += kind == "text"
        if numbers + texts >= 200:
            break
    return None if numbers + texts == 0 else numbers > texts


def _explicit_channels(table: _Table, opts: _Options) -> list[int]:
    wanted = opts.channels or []
    missing = [c for c in wanted if c not in table.names]
    if not missing:
        return [table.names.index(c) for c in wanted]
    if opts.predicting and not table.has_header:
        raise UserError(f"{table.path} has no header row, but the model reads the columns "
                        f"{_quoted(wanted)}; add a header line naming the columns as in training")
    hint = (f"the model was trained on the columns {_quoted(wanted)}; name this file's columns the same way"
            if opts.predicting else "pass --channels with names from this list")
    raise UserError(f"{table.path} has no column {_quoted(missing)}; its columns are: "
                    f"{_listing([n or '(unnamed)' for n in table.names], 50)}; {hint}")


def _pick_channels(table: _Table, opts: _Options) -> tuple[list[int], list[str], list[str]]:
    """Indices of the channel columns, the ignored columns and the time columns."""
    if opts.channels:
        return _explicit_channels(table, opts), [], []
    if opts.time_column and opts.time_column not in table.names:
        raise UserError(f"{table.path} has no time column '{opts.time_column}' (its columns: "
                        f"{_listing(table.names, 50)}); fix --time-column or leave it out")
    reserved = {opts.label_column, opts.group_column} if table.has_header else set()
    times = [n for n in table.names
             if table.has_header and (n.lower() in TIME_NAMES or n == opts.time_column)]
    picked, ignored = [], []
    for j, name in enumerate(table.names):
        if name in reserved or name in times:
            continue
        numeric = _is_numeric_column(table.columns[j], table.decimal_comma)
        if numeric is None and not (table.has_header and name):
            continue  # an empty unnamed column (a trailing delimiter)
        if numeric is False or not name:
            ignored.append(name or f"(unnamed column {j + 1})")
        else:
            picked.append(j)
    if not picked:
        raise UserError(f"{table.path} has no numeric channel columns (its columns: "
                        f"{_listing(table.names, 50)}); each row must hold the sensor values as numbers")
    return picked, ignored, times


def _first_bad_cell(cells: np.ndarray, missing: np.ndarray) -> int:
    for i in np.flatnonzero(~missing):
        try:
            if np.isfinite(float(cells[i])):
                continue
        except ValueError:
            pass
        return int(i)
    return 0


def _parse_column(table: _Table, j: int) -> np.ndarray:
    """The column's values as float64, NaN where a cell is empty; a stray text cell is an error."""
    if not table.decimal_comma:
        try:  # the common case, fast: every cell a number (or "nan")
            values = np.array(table.columns[j], dtype=np.float64)
            if not np.isinf(values).any():
                return values
        except ValueError:
            pass
    cells = np.char.strip(np.asarray(table.columns[j], dtype=str))
    if table.decimal_comma:
        cells = np.char.replace(cells, ",", ".")
    missing = np.isin(np.char.lower(cells), MISSING)
    cells = np.where(missing, "nan", cells)
    try:
        values = cells.astype(np.float64)
        if np.isfinite(values[~missing]).all():
            return values
    except ValueError:
        pass
    row = _first_bad_cell(cells, missing)
    raise UserError(f"{table.path} line {table.lines[row]}, column '{table.names[j]}': "
                    f"'{table.columns[j][row].strip()}' is not a number; fix or remove that line "
                    "(or choose the channel columns with --channels)")


def _forward_fill(values: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Each gap takes the previous valid value of its column; leading gaps the first valid one."""
    steps = np.arange(len(values))[:, None]
    last = np.maximum.accumulate(np.where(gaps, -1, steps), axis=0)
    first = np.argmax(~gaps, axis=0)
    source = np.where(last < 0, first[None, :], last)
    return np.take_along_axis(values, source, axis=0)


def _fill_missing(values: np.ndarray, mode: str | None, names: list[str], table: _Table
                  ) -> tuple[np.ndarray, int]:
    gaps = np.isnan(values)
    if not gaps.any():
        return values, 0
    empty = np.flatnonzero(gaps.all(axis=0))
    if empty.size:
        raise UserError(f"column '{names[empty[0]]}' in {table.path} has no values; remove it, or "
                        "choose the channel columns with --channels")
    if mode is None:
        row, col = np.argwhere(gaps)[0]
        raise UserError(f"{table.path} line {table.lines[row]}, column '{names[col]}': missing value "
                        "(empty cell or NaN); fix the file, or fill gaps with --fill-missing ffill "
                        "(repeat the previous value) or --fill-missing zero")
    filled = np.where(gaps, 0.0, values) if mode == "zero" else _forward_fill(values, gaps)
    return filled, int(gaps.sum())


def _channel_values(table: _Table, opts: _Options) -> tuple[list[str], np.ndarray, list[str], list[str], int]:
    """(channel names, float32 (T, C), ignored columns, time columns, filled cells)."""
    picked, ignored, times = _pick_channels(table, opts)
    names = [table.names[j] for j in picked]
    values = np.stack([_parse_column(table, j) for j in picked], axis=1)
    values, filled = _fill_missing(values, opts.fill_missing, names, table)
    return names, values.astype(np.float32), ignored, times, filled


class _Reader:
    """Reads the CSV files of one data folder with one set of options: checks that all files have
    the first file's channels and gathers what is worth a note."""

    def __init__(self, opts: _Options):
        self.opts = opts
        self.channels: list[str] | None = None
        self.first_file = ""
        self.ignored: dict[tuple[str, ...], list[str]] = {}
        self.times: set[str] = set()
        self.filled = [0, 0]  # cells, files
        self.headerless = 0

    def values(self, table: _Table) -> np.ndarray:
        names, values, ignored, times, filled = _channel_values(table, self.opts)
        self._check_channels(names, table.path)
        if ignored:
            self.ignored.setdefault(tuple(ignored), []).append(str(table.path))
        self.times.update(times)
        self.filled = [self.filled[0] + filled, self.filled[1] + (filled > 0)]
        self.headerless += not table.has_header
        return values

    def _check_channels(self, names: list[str], path: Path) -> None:
        if self.channels is None:
            self.channels, self.first_file = names, str(path)
        elif names != self.channels:
            raise UserError(f"{path} has {len(names)} channels ({_listing(names)}) but {self.first_file} "
                            f"has {len(self.channels)} ({_listing(self.channels)}); all recordings need the "
                            "same channel columns (or name them with --channels)")

    def notes(self) -> list[str]:
        notes = []
        for columns, files in self.ignored.items():
            more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
            notes.append(f"ignored non-numeric columns in {files[0]}{more}: {', '.join(columns)}")
        if self.times:
            notes.append(f"time column {_quoted(sorted(self.times))} is the time index, not a channel")
        if self.headerless:
            notes.append(f"{self.headerless} files without a header row: channels named ch0, ch1, ...")
        if self.filled[0]:
            notes.append(f"filled {self.filled[0]} missing cells in {self.filled[1]} files "
                         f"(--fill-missing {self.opts.fill_missing})")
        return notes


# ------------------------------------------------------------------ layout (b): long recordings


def _text_column(table: _Table, name: str, flag: str, what: str) -> np.ndarray:
    if name not in table.names:
        raise UserError(f"{table.path} has no {what} column '{name}' (its columns: "
                        f"{_listing(table.names, 50)}); name the {what} column with {flag}")
    cells = np.char.strip(np.asarray(table.columns[table.names.index(name)], dtype=str))
    empty = np.flatnonzero(cells == "")
    if empty.size:
        raise UserError(f"{table.path} line {table.lines[empty[0]]}: empty {what} cell in column "
                        f"'{name}'; give every row a {what} or remove the row")
    return cells


def _runs(groups: np.ndarray | None, n: int) -> list[tuple[int, int, str | None]]:
    """(start, stop, group value) of each contiguous run of one group."""
    if groups is None:
        return [(0, n, None)]
    starts = [0, *(np.flatnonzero(groups[1:] != groups[:-1]) + 1).tolist()]
    stops = [*starts[1:], n]
    return [(a, b, str(groups[a])) for a, b in zip(starts, stops, strict=True)]


def _long_recordings(reader: _Reader, table: _Table, rid: str, split: str | None) -> list[_Recording]:
    opts = reader.opts
    if not table.has_header:
        raise UserError(f"{table.path} has no header row; long recordings (layout b) need column names, "
                        f"with a '{opts.label_column}' column holding the class of every row")
    labels = _text_column(table, opts.label_column, "--label-column", "label")
    groups = (_text_column(table, opts.group_column, "--group-column", "group")
              if opts.group_column else None)
    values = reader.values(table)
    return [_Recording(rid if group is None else f"{rid}:{group}", values[a:b],
                       row_labels=labels[a:b], split=split)
            for a, b, group in _runs(groups, len(labels))]


# ------------------------------------------------------------------ layout (c): .npz


def _npz_key(keys: list[str], name: str, path: Path) -> str:
    for key in (name, name.lower(), name.upper()):
        if key in keys:
            return key
    raise UserError(f"{path} holds no array '{name}' (it holds: {_listing(keys) or 'nothing'}); save "
                    "it with np.savez(path, X=windows, y=labels), X shaped (N, T, C)")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            X, y = archive[_npz_key(keys, "X", path)], archive[_npz_key(keys, "y", path)]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} cannot be read as .npz ({' '.join(str(exc).split())}); save it with "
                        "np.savez(path, X=windows, y=labels) using number or string arrays "
                        "(not Python objects)") from None
    if X.ndim == 2:
        X = X[..., None]
    if X.ndim != 3 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise UserError(f"X in {path} has shape {X.shape} and type {X.dtype}; it must hold numbers "
                        "shaped (N, T, C): N windows of T time steps and C channels")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or len(y) != len(X):
        raise UserError(f"y in {path} has shape {y.shape} but X holds {len(X)} windows; y must hold "
                        "one class label per window, shaped (N,)")
    return X.astype(np.float32), y


def _npz_labels(y: np.ndarray, path: Path) -> list[str]:
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise UserError(f"y in {path} holds fractional or missing numbers; class labels must be "
                            "whole numbers or strings")
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "UbS"):
        raise UserError(f"y in {path} has type {y.dtype}; class labels must be ints or strings")
    labels = [v.decode() if isinstance(v, bytes) else str(v).strip() for v in y.tolist()]
    if "" in labels:
        raise UserError(f"y in {path} has an empty label (window {labels.index('')}); give every "
                        "window a class")
    return labels


def _npz_fill(X: np.ndarray, mode: str | None, path: Path) -> np.ndarray:
    gaps = np.isnan(X)
    if not gaps.any():
        return X
    i, t, c = np.argwhere(gaps)[0]
    if mode is None:
        raise UserError(f"X in {path} has missing values (NaN), first in window {i}, step {t}, channel "
                        f"{c}; fix the file, or fill gaps with --fill-missing ffill or --fill-missing zero")
    if mode == "zero":
        return np.where(gaps, np.float32(0), X)
    for i in np.flatnonzero(gaps.any(axis=(1, 2))):
        if gaps[i].all(axis=0).any():
            raise UserError(f"window {i} of X in {path} has a channel without any value; fix the "
                            "file or use --fill-missing zero")
        X[i] = _forward_fill(X[i], gaps[i])
    return X


def _npz_recordings(path: Path, reader: _Reader) -> list[_Recording]:
    X, y = _load_npz(path)
    labels = _npz_labels(y, path)
    if not np.isfinite(X[~np.isnan(X)]).all():
        raise UserError(f"X in {path} holds infinite values; fix the file")
    X = _npz_fill(X, reader.opts.fill_missing, path)
    names = [f"ch{j}" for j in range(X.shape[2])]
    if reader.opts.channels:
        missing = [c for c in reader.opts.channels if c not in names]
        if missing:
            raise UserError(f"{path} has no channel {_quoted(missing)}; the channels of a .npz file are "
                            f"named {_listing(names)}; pass --channels with names from this list")
        X = X[:, :, [names.index(c) for c in reader.opts.channels]]
        names = list(reader.opts.channels)
    reader.channels, reader.first_file = names, str(path)
    return [_Recording(f"sample_{i}", X[i], label=label) for i, label in enumerate(labels)]


# ------------------------------------------------------------------ layout detection


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _csv_files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() == ".csv" and p.is_file() and _visible(p, folder))


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_plan(root: Path, folder: Path, split: str | None
                ) -> list[tuple[Path, str, str | None, str | None]]:
    classes = _subfolders(folder)
    if not classes:
        raise UserError(f"{folder} holds no class folders; put each class's recordings in its own "
                        f"folder, e.g. {folder}/walk/*.csv and {folder}/run/*.csv")
    items: list[tuple[Path, str, str | None, str | None]] = []
    for name in classes:
        files = _csv_files(folder / name, recursive=True)
        if not files:
            raise UserError(f"class folder {folder / name} holds no CSV files; add recordings of "
                            f"'{name}' or remove the folder")
        items += [(f, f.relative_to(root).as_posix(), name, split) for f in files]
    return items


def _split_dirs(root: Path) -> dict[str, Path]:
    subs = _subfolders(root)
    present = [s for s in SPLITS if s in subs]
    if not present:
        return {}
    others = [s for s in subs if s not in SPLITS]
    if others:
        raise UserError(f"{root} mixes split folders ({', '.join(present)}) with other folders "
                        f"({_listing(others)}); put every class folder inside {root}/train/ and "
                        f"{root}/val/ (test/ optional), or remove the split folders to split automatically")
    for needed in ("train", "val"):
        if needed not in present:
            raise UserError(f"{root} has split folders ({', '.join(present)}) but no {needed}/ folder; "
                            f"add {root}/{needed}/, or put the class folders directly in {root} to "
                            "split automatically")
    return {s: root / s for s in present}


def _folder_kind(folder: Path) -> str:
    if any(_csv_files(folder / s, recursive=True) for s in _subfolders(folder)):
        return "per-recording"
    if _csv_files(folder):
        return "long"
    raise UserError(f"split folder {folder} holds no CSV files; add recordings ({folder}/<class>/*.csv "
                    f"or {folder}/*.csv) or remove it")


def _check_split_classes(plans: dict[str, list]) -> None:
    train = sorted({item[2] for item in plans["train"]})
    for split, items in plans.items():
        classes = sorted({item[2] for item in items})
        if classes != train:
            only_train = sorted(set(train) - set(classes))
            only_other = sorted(set(classes) - set(train))
            raise UserError(f"the class folders of train/ and {split}/ differ (only in train: "
                            f"{_listing(only_train) or 'none'}; only in {split}: "
                            f"{_listing(only_other) or 'none'}); make both hold the same class folders")


def _split_plan(root: Path, splits: dict[str, Path]) -> _Plan:
    kinds = {s: _folder_kind(d) for s, d in splits.items()}
    if len(set(kinds.values())) > 1:
        shown = ", ".join(f"{s}/ holds {LAYOUT_NAMES[k]}" for s, k in kinds.items())
        raise UserError(f"the split folders of {root} differ: {shown}; use one layout in all of them")
    layout = kinds["train"]
    if layout == "long":
        files = [(f, f.relative_to(root).as_posix(), None, s)
                 for s, d in splits.items() for f in _csv_files(d)]
        return _Plan(root, layout, files, True, [])
    per_split = {s: _class_plan(root, d, s) for s, d in splits.items()}
    _check_split_classes(per_split)
    return _Plan(root, layout, [item for items in per_split.values() for item in items], True, [])


def _folder_plan(root: Path) -> _Plan:
    if any(_csv_files(root / s, recursive=True) for s in _subfolders(root)):
        splits = _split_dirs(root)
        if splits:
            return _split_plan(root, splits)
        loose = _csv_files(root)
        notes = ([f"ignored {len(loose)} CSV files directly in {root} (layout a reads the class folders)"]
                 if loose else [])
        return _Plan(root, "per-recording", _class_plan(root, root, None), False, notes)
    csvs = _csv_files(root)
    if csvs:
        return _Plan(root, "long", [(f, f.name, None, None) for f in csvs], False, [])
    npzs = sorted(p for p in root.iterdir() if p.suffix.lower() == ".npz" and not p.name.startswith("."))
    if len(npzs) == 1:
        return _Plan(root, "npz", [(npzs[0], npzs[0].name, None, None)], False, [])
    if npzs:
        raise UserError(f"{root} holds {len(npzs)} .npz files ({_listing([p.name for p in npzs])}); pass "
                        "one of them as --data-dir")
    raise UserError(f"no CSV or .npz files in {root} or its sub-folders; {LAYOUTS}")


def _detect(path: Path) -> _Plan:
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass --data-dir with your recordings ({LAYOUTS})")
    if path.is_dir():
        return _folder_plan(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npz"):
        raise UserError(f"{path} is neither a folder, a .csv nor a .npz file; {LAYOUTS}")
    layout = "npz" if suffix == ".npz" else "long"
    return _Plan(path.parent, layout, [(path, path.name, None, None)], False, [])


def _read_plan(plan: _Plan, opts: _Options) -> tuple[list[_Recording], _Reader]:
    reader = _Reader(opts)
    if plan.layout == "npz":
        return _npz_recordings(plan.files[0][0], reader), reader
    recordings: list[_Recording] = []
    for path, rid, label, split in plan.files:
        table = _read_table(path)
        if plan.layout == "long":
            recordings += _long_recordings(reader, table, rid, split)
        else:
            recordings.append(_Recording(rid, reader.values(table), label=label, split=split))
    return recordings, reader


# ------------------------------------------------------------------ several folders (--data-glob)


def _sources(data_dir: str | Path | None, data_glob: str | None) -> list[tuple[str | None, Path]]:
    """(id prefix, path) of every data folder; the prefix is None without data_glob."""
    if data_glob is None:
        if data_dir is None:
            raise UserError("no data given; pass --data-dir (a folder or a .csv/.npz file) or --data-glob")
        return [(None, Path(data_dir))]
    pattern = data_glob if data_dir is None or os.path.isabs(data_glob) else str(Path(data_dir) / data_glob)
    matches = sorted(p for p in glob.glob(pattern) if not Path(p).name.startswith("."))
    if not matches:
        raise UserError(f"--data-glob {pattern} matches no folder or file; check the pattern (it is "
                        f"relative to {'--data-dir' if data_dir is not None else 'the current folder'})")
    names = [Path(p).name for p in matches]
    unique = len(set(names)) == len(names)
    return [(name if unique else Path(p).as_posix(), Path(p)) for name, p in zip(names, matches, strict=True)]


def _check_plans(plans: list[_Plan]) -> None:
    first = plans[0]
    for plan in plans[1:]:
        if plan.layout != first.layout:
            raise UserError(f"{plan.root} holds {LAYOUT_NAMES[plan.layout]} but {first.root} holds "
                            f"{LAYOUT_NAMES[first.layout]}; --data-glob merges folders of one layout")
        if plan.split_folders != first.split_folders:
            has, lacks = (plan, first) if plan.split_folders else (first, plan)
            raise UserError(f"{has.root} has train/val split folders but {lacks.root} has none; use "
                            "split folders in all merged folders or in none")


def _check_channels(plans: list[_Plan], readers: list[_Reader]) -> None:
    for plan, reader in zip(plans[1:], readers[1:], strict=True):
        if reader.channels != readers[0].channels:
            raise UserError(f"the channels of {plan.root} ({_listing(reader.channels or [])}, e.g. in "
                            f"{reader.first_file}) differ from those of {plans[0].root} "
                            f"({_listing(readers[0].channels or [])}); merged folders need the same channels")


def _read_sources(sources: list[tuple[str | None, Path]], opts: _Options
                  ) -> tuple[str, bool, list[_Recording], list[str], list[str]]:
    """(layout, split folders?, recordings, channels, notes) of all sources together."""
    plans = [_detect(path) for _, path in sources]
    _check_plans(plans)
    recordings, readers, notes = [], [], []
    for (prefix, _), plan in zip(sources, plans, strict=True):
        recs, reader = _read_plan(plan, opts)
        for rec in recs:
            rec.id = rec.id if prefix is None else f"{prefix}/{rec.id}"
        recordings += recs
        readers.append(reader)
        notes += plan.notes + reader.notes()
    _check_channels(plans, readers)
    if len(sources) > 1:
        notes.append(f"merged {len(sources)} data folders: {_listing([str(p) for _, p in sources])}")
    return plans[0].layout, plans[0].split_folders, recordings, list(readers[0].channels or []), notes


# ------------------------------------------------------------------ windows


def _fit(values: np.ndarray, window: int) -> np.ndarray:
    """Crop around the centre, or zero-pad at the end, to `window` steps."""
    n = len(values)
    if n >= window:
        start = (n - window) // 2
        return values[start:start + window]
    return np.concatenate([values, np.zeros((window - n, values.shape[1]), values.dtype)])


def _cut(values: np.ndarray, window: int, stride: int | None, cover_end: bool = False
         ) -> tuple[np.ndarray, list[int]]:
    """Windows (W, window, C) and their start rows: one cropped/padded window when the recording is
    not longer than `window` (or without a stride), else every `stride` steps; `cover_end` adds a
    last window ending on the last row."""
    n = len(values)
    if n <= window or stride is None:
        return _fit(values, window)[None], [max(0, (n - window) // 2)]
    starts = list(range(0, n - window + 1, stride))
    if cover_end and starts[-1] != n - window:
        starts.append(n - window)
    return np.stack([values[s:s + window] for s in starts]), starts


def _whole_windows(recordings: list[_Recording], opts: _Options, notes: list[str]) -> _Windows:
    """Layouts (a) and (c): one window per recording (several with a stride)."""
    lengths = np.array([len(r.values) for r in recordings])
    window = opts.window_size or int(np.median(lengths))
    if opts.window_size is None and lengths.min() != lengths.max():
        notes.append(f"window_size {window}: the median recording length (lengths {lengths.min()} to "
                     f"{lengths.max()})")
    windows, labels, ids = [], [], []
    for rec in recordings:
        cut, _ = _cut(rec.values, window, opts.stride)
        windows.append(cut)
        labels += [rec.label] * len(cut)
        ids += [rec.id] * len(cut)
    longer = int((lengths > window).sum())
    padded = int((lengths < window).sum())
    if longer and opts.stride is None:
        notes.append(f"{longer} of {len(lengths)} recordings cropped (centre) to {window} steps")
    elif longer:
        notes.append(f"{longer} of {len(lengths)} recordings cut into windows of {window} steps, "
                     f"stride {opts.stride}")
    if padded:
        notes.append(f"{padded} of {len(lengths)} recordings zero-padded (at the end) to {window} steps")
    return _Windows(np.concatenate(windows).astype(np.float32, copy=False), labels, ids, window, opts.stride)


def _long_window_size(recordings: list[_Recording], opts: _Options, notes: list[str]) -> int:
    if opts.window_size is not None:
        longest = max(recordings, key=lambda r: len(r.values))
        if len(longest.values) < opts.window_size:
            raise UserError(f"no window of {opts.window_size} steps fits: the longest group "
                            f"({longest.id}) has {len(longest.values)} rows; lower --window-size")
        return opts.window_size
    shortest = min(recordings, key=lambda r: len(r.values))
    if len(shortest.values) >= DEFAULT_WINDOW:
        return DEFAULT_WINDOW
    notes.append(f"window_size {len(shortest.values)}: the shortest group ({shortest.id}) has "
                 f"{len(shortest.values)} rows (default {DEFAULT_WINDOW}; set --window-size)")
    return len(shortest.values)


def _window_label_counts(codes: np.ndarray, starts: np.ndarray, window: int, n_classes: int) -> np.ndarray:
    """(W, K): how many rows of each class every window holds."""
    counts = np.empty((len(starts), n_classes), np.int64)
    for k in range(n_classes):
        cumulative = np.concatenate([[0], np.cumsum(codes == k)])
        counts[:, k] = cumulative[starts + window] - cumulative[starts]
    return counts


def _segment_windows(rec: _Recording, window: int, stride: int, names: list[str], pure: bool
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """(windows (W, T, C), majority class index of each, windows dropped as mixed)."""
    starts = np.arange(0, len(rec.values) - window + 1, stride)
    uniques, inverse = np.unique(rec.row_labels, return_inverse=True)
    codes = np.array([names.index(u) for u in uniques])[inverse.reshape(-1)]
    counts = _window_label_counts(codes, starts, window, len(names))
    keep = counts.max(axis=1) == window if pure else np.ones(len(starts), bool)
    views = np.lib.stride_tricks.sliding_window_view(rec.values, window, axis=0)[starts[keep]]
    return views.transpose(0, 2, 1), counts[keep].argmax(axis=1), int((~keep).sum())


def _long_windows(recordings: list[_Recording], opts: _Options, notes: list[str]) -> _Windows:
    """Layout (b): windows every `stride` steps within each group, labelled by majority."""
    window = _long_window_size(recordings, opts, notes)
    stride = opts.stride or max(1, window // 2)
    names = _sorted_classes({str(v) for r in recordings for v in np.unique(r.row_labels)})
    windows, labels, ids, dropped, short = [], [], [], 0, 0
    for rec in recordings:
        if len(rec.values) < window:
            short += 1
            continue
        cut, majority, mixed = _segment_windows(rec, window, stride, names, opts.pure_windows)
        windows.append(cut)
        labels += [names[k] for k in majority]
        ids += [rec.id] * len(cut)
        dropped += mixed
    if short:
        notes.append(f"skipped {short} groups shorter than window_size {window}")
    if opts.pure_windows:
        notes.append(f"pure_windows: dropped {dropped} of {dropped + len(labels)} windows holding "
                     "several labels")
    if not labels:
        raise UserError(f"no window of {window} steps holds a single label; lower --window-size or "
                        "leave out --pure-windows")
    lost = [n for n in names if n not in set(labels)]
    if lost:
        notes.append(f"labels {_quoted(lost)} are the majority of no window and are not classes; "
                     "use a smaller --window-size to keep them")
    return _Windows(np.concatenate(windows).astype(np.float32), labels, ids, window, stride)


def _sorted_classes(names: set[str] | Sequence[str]) -> list[str]:
    """Sorted names; numerically when all are whole numbers ("2" before "10")."""
    names = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ------------------------------------------------------------------ splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (val_fraction > 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must satisfy "
                        "0 < val, 0 <= test and val + test < 1 (e.g. 0.15 and 0.15)")


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction))
    while n - n_val - n_test < 1 and max(n_val, n_test) > 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _group_counts(ids: list[str], y: np.ndarray, n_classes: int) -> tuple[list[str], np.ndarray]:
    """Sorted group ids and (G, K) window counts per class."""
    groups, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    counts = np.zeros((len(groups), n_classes), np.int64)
    np.add.at(counts, (inverse.reshape(-1), y), 1)
    return groups.tolist(), counts


def _shuffle_split(groups: list[str], majority: np.ndarray, fractions: tuple[float, float],
                   rng: random.Random) -> dict[str, str]:
    assignment = {}
    for k in np.unique(majority):
        members = [g for g, m in zip(groups, majority, strict=True) if m == k]
        rng.shuffle(members)
        n_val, n_test = _split_counts(len(members), *fractions)
        for i, group in enumerate(members):
            assignment[group] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return assignment


def _random_split(ids: list[str], y: np.ndarray, classes: list[str], fractions: tuple[float, float],
                  seed: int, unit: str) -> dict[str, str]:
    """Group id -> split, stratified by each group's majority class; every class in every split."""
    groups, counts = _group_counts(ids, y, len(classes))
    need = 3 if fractions[1] > 0 else 2
    having = (counts > 0).sum(axis=0)
    for k, name in enumerate(classes):
        if having[k] < need:
            raise UserError(f"class '{name}' has only {having[k]} {unit}(s); a train/val"
                            f"{'/test' if need == 3 else ''} split needs at least {need} per class "
                            f"(whole {unit}s go to one split): add {unit}s of '{name}' or lower the "
                            f"fractions{' (--test-fraction 0 needs 2)' if need == 3 else ''}")
    names = ["train", "val"] + (["test"] if need == 3 else [])
    rng = random.Random(seed)
    # Stratify by class when each group holds one class. Groups that hold several (each subject
    # did every activity) are split together: per-majority buckets of one or two subjects would
    # each give their val and test group first and leave training almost nothing.
    single = bool(((counts > 0).sum(axis=1) == 1).all())
    strata = counts.argmax(axis=1) if single else np.zeros(len(groups), np.int64)
    for _ in range(20):
        assignment = _shuffle_split(groups, strata, fractions, rng)
        split_of = np.array([assignment[g] for g in groups])
        missing = [(classes[k], s) for s in names for k in range(len(classes))
                   if not counts[split_of == s, k].any()]
        if not missing:
            return assignment
    name, split = missing[0]
    raise UserError(f"class '{name}' ends up with no {split} windows: its windows lie in few {unit}s "
                    f"that are mostly other classes; add {unit}s of '{name}' or lower the fractions")


def _assign_splits(windows: _Windows, y: np.ndarray, classes: list[str],
                   folder_split: dict[str, str] | None, fractions: tuple[float, float], seed: int,
                   layout: str, notes: list[str]) -> dict[str, str]:
    unit = {"long": "group", "npz": "sample"}.get(layout, "recording")
    if folder_split is not None:
        assignment = {rid: folder_split[rid] for rid in set(windows.ids)}
        names = [s for s in SPLITS if s in set(assignment.values())]
        notes.append(f"splits from the folders {', '.join(s + '/' for s in names)}")
        for needed in ("train", "val"):
            if needed not in names:
                raise UserError(f"the {needed}/ folder gives no windows (all its recordings are shorter "
                                "than the window); lower --window-size or add longer recordings")
    else:
        assignment = _random_split(windows.ids, y, classes, fractions, seed, unit)
        names = ["train", "val"] + (["test"] if fractions[1] > 0 else [])
        counts = {s: sum(1 for v in assignment.values() if v == s) for s in names}
        notes.append(f"split by {unit} (stratified by class, seed {seed}): "
                     + ", ".join(f"{s} {counts[s]}" for s in names) + f" {unit}s")
    if "test" not in names:
        notes.append("no test split: the final evaluation is on val")
    return assignment


def _build_splits(windows: _Windows, y: np.ndarray, assignment: dict[str, str]
                  ) -> tuple[dict[str, SeriesSplit], dict[str, list[str]]]:
    split_of = np.array([assignment[rid] for rid in windows.ids])
    splits, split_ids = {}, {}
    for name in SPLITS:
        index = np.flatnonzero(split_of == name)
        if index.size:
            ids = [windows.ids[i] for i in index]
            splits[name] = SeriesSplit(np.ascontiguousarray(windows.X[index]), y[index].astype(np.int64), ids)
            split_ids[name] = sorted(set(ids))
    return splits, split_ids


# ------------------------------------------------------------------ the public functions


def _positive_int(value: int | None, flag: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    return value


def _make_options(label_column: str, group_column: str | None, time_column: str | None,
                  channels: list[str] | None, window_size: int | None, stride: int | None,
                  pure_windows: bool, fill_missing: str | None) -> _Options:
    if fill_missing is not None and fill_missing not in FILL_MODES:
        raise UserError(f"--fill-missing must be ffill or zero, got {fill_missing!r}")
    if channels is not None:
        channels = [str(c).strip() for c in channels]
        if not channels or len(set(channels)) != len(channels) or "" in channels:
            raise UserError(f"--channels needs distinct, non-empty column names, got {channels}")
    return _Options(label_column, group_column, time_column, channels,
                    _positive_int(window_size, "--window-size"), _positive_int(stride, "--stride"),
                    bool(pure_windows), fill_missing)


def load_series_data(data_dir: str | Path | None, *, data_glob: str | None = None,
                     label_column: str = "label", group_column: str | None = None,
                     time_column: str | None = None, channels: list[str] | None = None,
                     window_size: int | None = None, stride: int | None = None,
                     pure_windows: bool = False, fill_missing: str | None = None,
                     val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 42) -> SeriesData:
    """Read, window and split the recordings of `data_dir` (see the module docstring)."""
    opts = _make_options(label_column, group_column, time_column, channels, window_size, stride,
                         pure_windows, fill_missing)
    _check_fractions(val_fraction, test_fraction)
    layout, split_folders, recordings, names, notes = _read_sources(_sources(data_dir, data_glob), opts)
    longest = max((len(r.values) for r in recordings), default=0)
    if window_size is not None and layout != "long" and window_size > 2 * longest:
        raise UserError(f"--window-size {window_size} is more than twice the longest recording ({longest} "
                        "steps): every window would be mostly zero padding; pass --window-size "
                        f"{longest} or less, or leave it out (the median length)")
    windows = (_long_windows if layout == "long" else _whole_windows)(recordings, opts, notes)
    classes = _sorted_classes(set(windows.labels))
    if len(classes) < 2:  # a model that always says the one class scores 100%: a meaningless run
        where = data_dir if data_dir is not None else data_glob
        raise UserError(f"{where} holds one class only ({classes[0] if classes else 'none'}); a classifier "
                        "needs recordings of at least two classes (one folder, or one label, per class)")
    index = {name: k for k, name in enumerate(classes)}
    y = np.array([index[label] for label in windows.labels], np.int64)
    folder_split = {r.id: r.split for r in recordings} if split_folders else None
    assignment = _assign_splits(windows, y, classes, folder_split, (val_fraction, test_fraction), seed,
                                layout, notes)
    splits, split_ids = _build_splits(windows, y, assignment)
    options = {"label_column": opts.label_column, "time_column": opts.time_column,
               "group_column": opts.group_column, "channels": list(names),
               "window_size": int(windows.window), "stride": windows.stride,
               "fill_missing": opts.fill_missing}
    return SeriesData(classes, list(names), int(windows.window), splits, split_ids, layout, notes, options)


def fit_normalizer(X: np.ndarray) -> dict:
    """Per-channel mean and std of the TRAINING windows (N, T, C); std at least 1e-6."""
    if X.ndim != 3 or len(X) == 0:
        raise ValueError(f"fit_normalizer needs windows shaped (N, T, C) with N > 0, got {X.shape}")
    mean = X.mean(axis=(0, 1), dtype=np.float64)
    std = np.maximum(X.std(axis=(0, 1), dtype=np.float64), STD_FLOOR)
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def normalize(X: np.ndarray, stats: dict) -> np.ndarray:
    """(X - mean) / std per channel, float32 (N, T, C)."""
    mean = np.asarray(stats["mean"], np.float32)
    std = np.asarray(stats["std"], np.float32)
    if X.shape[-1] != len(mean):
        raise UserError(f"the recordings have {X.shape[-1]} channels but the model was trained on "
                        f"{len(mean)}; use recordings with the training channels")
    return ((X - mean) / std).astype(np.float32, copy=False)


class SeriesDataset(torch.utils.data.Dataset):
    """Windows normalised once and stored as one float32 tensor (N, C, T); items are
    ((C, T) tensor, int label)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, stats: dict):
        if len(X) != len(y):
            raise ValueError(f"{len(X)} windows but {len(y)} labels")
        self.X = torch.from_numpy(np.ascontiguousarray(normalize(X, stats).transpose(0, 2, 1)))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64).copy())

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.X[index], int(self.y[index])


def read_for_prediction(path: str | Path, options: dict, channels: list[str]) -> tuple[np.ndarray, list[int]]:
    """A CSV recording (layout a or b; a label column is not needed) -> windows float32 (W, T, C)
    and the start row of each (0 = the first data row). A recording not longer than window_size
    gives one window, padded like in training; a longer one is cut every options["stride"] steps
    (default window_size), plus a last window ending on the last row. Columns are picked by name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass a CSV recording")
    opts = _Options(label_column=options.get("label_column") or "label",
                    channels=[str(c) for c in channels], fill_missing=options.get("fill_missing"),
                    predicting=True)
    window = int(options["window_size"])
    table = _read_table(path)
    _, values, _, _, _ = _channel_values(table, opts)
    windows, starts = _cut(values, window, int(options.get("stride") or window), cover_end=True)
    return windows.astype(np.float32, copy=False), [int(s) for s in starts]


def write_splits_json(data: SeriesData, path: Path) -> None:
    """{"train": [ids], "val": [ids], "test": [ids] (when there is a test split), "layout": ...},
    written atomically."""
    path = Path(path)
    payload: dict[str, Any] = {name: list(ids) for name, ids in data.split_ids.items()}
    payload["layout"] = data.layout
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_for_evaluation(data_dir: str | Path, options: dict, channels: list[str], window_size: int
                        ) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Every window of `data_dir`, read as a checkpoint's data was (its columns, window and reading
    options), without splitting: (X float32 (N, T, C), label names, recording ids, notes).
    For validate.py and test_model.py on a folder of held-out recordings."""
    opts = _make_options(options.get("label_column") or "label", options.get("group_column"),
                         options.get("time_column"), list(channels), int(window_size), options.get("stride"),
                         bool(options.get("pure_windows")), options.get("fill_missing"))
    layout, _, recordings, _, notes = _read_sources(_sources(data_dir, None), opts)
    windows = (_long_windows if layout == "long" else _whole_windows)(recordings, opts, notes)
    return windows.X, list(windows.labels), list(windows.ids), notes
