"""The checkpoint format: one dict of plain types, written atomically, read with
weights_only=True, from which every tool rebuilds the model on its own."""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import pickle
import random
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError

FORMAT = "gpu-toolkit-checkpoint"
# torch.save writes a zip archive (or, with the legacy format, a pickle that starts with PROTO)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def library_versions() -> dict[str, str]:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": str(np.__version__)}


def make_payload(model: nn.Module, *, task: str, model_spec: Mapping[str, Any],
                 meta: Mapping[str, Any], metrics: Mapping[str, float],
                 config: Mapping[str, Any], train_state: Mapping[str, Any] | None = None,
                 to_host: bool = True) -> dict[str, Any]:
    """Build the checkpoint dict. `meta` holds the task's own keys (classes, preprocessing).
    to_host=False leaves the weights where they are, for a saver that copies them itself."""
    state = {k: (v.detach().cpu() if to_host else v.detach())
             for k, v in unwrap_model(model).state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "model": dict(model_spec),
        "state_dict": state,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": dict(config),
        "versions": library_versions(),
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    payload.update(meta)
    if train_state is not None:
        payload["train_state"] = dict(train_state)
    return payload


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A process killed at any instant leaves either the old file or the new one, never half.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint reads like any file
        with os.fdopen(fd, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(obj, sink)
            except RuntimeError as exc:  # torch's writer says "unexpected pos" on a full disk
                raise _write_error(exc, target, sink.error) from None
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


class _Sink:
    """The file torch.save writes into, keeping the OSError of a failed write (a full disk, a quota,
    an I/O error): torch's C++ writer reports it only as "unexpected pos"."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _write_error(exc: RuntimeError, target: Path, cause: OSError | None = None) -> OSError:
    """torch.save's C++ writer failing as the OSError it stands for: the file's own error where the
    write raised one, else a guess from the free space (a full disk, mostly)."""
    import errno
    import shutil

    if cause is not None and cause.errno:
        return OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(target))
    free = shutil.disk_usage(target.parent).free
    code = errno.ENOSPC if free < (64 << 20) else errno.EIO
    message = os.strerror(code) if code == errno.ENOSPC else f"{os.strerror(code)} ({_short(exc)})"
    return OSError(code, message, str(target))


def _proc_umask() -> int | None:
    """The umask as Linux reports it in /proc/self/status (read without changing it), else None."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """Where the system has no /proc, os.umask must set the mask to read it: done once, here at
    import, before the writer thread exists (setting it from that thread while the main thread
    creates files would give those files the wrong mode)."""
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def _umask() -> int:
    """The current umask (Linux), else the one the process had when this module was imported."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_raw(path: str | os.PathLike, *, trust: bool = False) -> Any:
    """torch.load with weights_only=True; every failure becomes a one-line UserError."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"checkpoint {file} does not exist; check the path "
                        "(training writes checkpoint.pth and best_model.pth in its output folder)")
    if file.is_dir():
        raise UserError(f"checkpoint {file} is a folder; pass the .pth file inside it")
    if file.stat().st_size == 0:
        raise UserError(f"checkpoint {file} is empty (0 bytes); it was not written completely. "
                        "Use another checkpoint, e.g. best_model.pth")
    head = head_of(file)
    if not head.startswith(_TORCH_MAGIC):
        raise UserError(f"checkpoint {file} is not a PyTorch file (it starts with {head!r}); "
                        "use another copy, e.g. best_model.pth")
    damaged = zip_crc_errors(file)
    if damaged:
        raise UserError(f"checkpoint {file} is corrupted (checksum mismatch in {', '.join(damaged[:3])}); "
                        "use another copy, e.g. best_model.pth")
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # the safe loader met code to import and run
            raise UserError(f"checkpoint {file} holds pickled Python objects that could run code "
                            "when loaded; if you trust its source, pass --trust-checkpoint") from None
        raise unreadable(file, exc) from None
    except ImportError as exc:  # a trusted whole-model pickle whose classes are not importable
        raise UserError(f"checkpoint {file} needs Python code that is not importable here ({exc}); "
                        "run from the project that defined the model, or save its state_dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError,
            TypeError, struct.error) as exc:  # what unpickling garbage raises
        raise unreadable(file, exc) from None


def unreadable(file: Path, exc: BaseException) -> UserError:
    """Why torch could not read `file`, in our words: cut short (with the length it should have,
    where the archive tells), or corrupt. torch's own text names its zip reader's internals."""
    from .archive import truncation

    cut = truncation(file)
    text = str(exc)
    if cut is None and head_of(file).startswith(b"\x80") and (
            isinstance(exc, EOFError) or "unexpected EOF" in text or "truncated" in text):
        cut = (file.stat().st_size, None)  # the legacy (non-zip) format stops where the bytes end
    if cut is not None:
        present, expected = cut
        size = f"{present} of {expected} bytes" if expected else \
            f"{present} bytes, the end of the file is missing"
        return UserError(f"checkpoint {file} is truncated ({size}): it was not written or copied "
                         "completely; use another copy, e.g. best_model.pth")
    reason = "its zip archive cannot be read" if "PytorchStreamReader" in text or "miniz" in text \
        else _short(exc)
    return UserError(f"checkpoint {file} is corrupt or not a PyTorch checkpoint ({reason}); use another "
                     "copy, e.g. best_model.pth")


def head_of(file: Path, size: int = 4) -> bytes:
    with open(file, "rb") as fh:
        return fh.read(size)


def zip_crc_errors(path: Path) -> list[str]:
    """Entries of a torch zip archive whose bytes no longer match their CRC-32 (torch.load does not
    check it, so flipped bits in the tensor data would load silently). [] for other files."""
    if not zipfile.is_zipfile(path):
        return []  # missing, truncated or not a zip: the loader says why
    bad = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # saved without CRC-32 (torch.serialization.set_crc32_options(False))
                try:
                    with archive.open(info) as fh:
                        while fh.read(1 << 22):
                            continue
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    bad.append(info.filename if "CRC" in str(exc) else f"{info.filename} ({_short(exc)})")
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"the zip directory ({_short(exc)})"]
    return bad


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def load_checkpoint(path: str | os.PathLike, *, task: str | None = None, need_train_state: bool = False,
                    trust: bool = False, start_from: str | None = None) -> dict[str, Any]:
    """Load and check one of this toolkit's checkpoints. start_from: the flag of the calling
    script that starts from a file's weights instead (named when the file is not a checkpoint)."""
    ckpt = load_raw(path, trust=trust)
    check_header(ckpt, path, task=task, need_train_state=need_train_state, start_from=start_from)
    return ckpt


REQUIRED_KEYS = ("task", "model", "state_dict")


def check_header(ckpt: Any, path: str | os.PathLike, *, task: str | None = None,
                 need_train_state: bool = False, start_from: str | None = None) -> None:
    """Format, version, completeness, entry types and task of a loaded checkpoint dict."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = f"to start from its weights, pass it to {start_from}" if start_from else \
            "use a checkpoint written by this toolkit's training scripts"
        raise UserError(f"{path} is not a checkpoint of this toolkit (no '{FORMAT}' header); {hint}")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks the entries {', '.join(missing)}; it was not written by this "
                        "toolkit's training scripts, use another checkpoint")
    check_entries(ckpt, path)
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt['version']}, newer than this "
                        f"toolkit's {VERSION}; update the toolkit")
    if task is not None and ckpt.get("task") != task:
        raise UserError(f"{path} is a {ckpt.get('task')} checkpoint, but this tool needs a "
                        f"{task} checkpoint")
    if need_train_state and not isinstance(ckpt.get("train_state"), dict):
        raise UserError(f"{path} has no training state to resume from (best_model.pth, "
                        "checkpoint_epoch{N}.pth and *_finetuned.pt hold weights only); resume from "
                        "checkpoint.pth")


# ---------------------------------------------------------------- entries of a hand-edited file

_MISSING = object()
_TOOLKIT_COPY = ("the file was edited or written by other code; use an unedited copy (e.g. the run's "
                 "best_model.pth)")
# entry: (type, what it should be); checked where present
_ENTRY_TYPES = {"classes": (list, "a list of class names"), "preprocessing": (dict, "a dict"),
                "metrics": (dict, "a dict of numbers"), "config": (dict, "a dict"),
                "mask_values": (list, "a list of mask values")}


def _bad(path: str | os.PathLike, key: str, should: str, value: Any = _MISSING) -> UserError:
    if value is _MISSING:
        found = "it is missing"
    elif value is None or isinstance(value, (str, int, float, bool)):
        found = f"it is {value!r}"[:80]
    elif isinstance(value, (list, tuple)) and len(repr(value)) <= 60:
        found = f"it is {value!r}"  # [1] says what is wrong; "a list" would not
    else:
        found = f"it is a {type(value).__name__}"
    return UserError(f"checkpoint {path}: entry '{key}' should be {should}, but {found}; {_TOOLKIT_COPY}")


def _whole(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _numbers(value: Any, count: int, positive: bool = False) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v > 0 or not positive) for v in value))


def check_entries(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """The types of the entries of a loaded checkpoint: a hand-edited file that still loads is
    one line naming the entry, not a TypeError or KeyError deep inside a tool."""
    if not isinstance(ckpt["task"], str):
        raise _bad(path, "task", "a task name such as 'classification'", ckpt["task"])
    spec = ckpt["model"]
    if not isinstance(spec, dict):
        raise _bad(path, "model", "a dict of name, source and kwargs", spec)
    for key in ("name", "source"):
        if not isinstance(spec.get(key, _MISSING), str):
            raise _bad(path, f"model.{key}", "a string", spec.get(key, _MISSING))
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise _bad(path, "model.kwargs", "a dict of constructor arguments", kwargs)
    state = ckpt["state_dict"]
    if not isinstance(state, dict):
        raise _bad(path, "state_dict", "a dict of tensors", state)
    wrong = next((k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if wrong is not None:
        raise _bad(path, f"state_dict.{wrong}", "a tensor", state[wrong])
    if not _whole(ckpt.get("version", 0), 0):
        raise _bad(path, "version", "a whole number", ckpt["version"])
    for key, (kind, should) in _ENTRY_TYPES.items():
        if ckpt.get(key) is not None and not isinstance(ckpt[key], kind):
            raise _bad(path, key, should, ckpt[key])
    names = ckpt.get("classes") or []
    if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in names):
        raise _bad(path, "classes", "a list of class names (strings)", names)


def check_inputs(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """What the tools read to feed the model, for the checkpoint's task: the preprocessing
    (sizes, mean/std, channels, window), the classes and mask values, and that the number of
    classes agrees with the model's. Run after check_header."""
    task, pre = ckpt["task"], ckpt.get("preprocessing")
    if task == "timeseries":
        _check_series(ckpt, path)
    elif task in ("classification", "segmentation"):
        if pre is None and task == "classification":
            raise _bad(path, "preprocessing", "a dict saying how to prepare inputs")
        pre = pre or {}  # a U-Net's defaults: scale 0.5, 3 channels
        channels = pre.get("channels", 3)
        if not _whole(channels):
            raise _bad(path, "preprocessing.channels", "a whole number of 1 or more", channels)
        if task == "classification":
            _check_images(pre, channels, path)
        else:
            _check_masks(ckpt, pre, path)
    classes, count = ckpt.get("classes"), ckpt["model"].get("kwargs", {}).get("num_classes")
    if task != "segmentation" and _whole(count) and classes is not None and len(classes) != count:
        raise UserError(f"checkpoint {path}: entry 'classes' has {len(classes)} names but the model has "
                        f"{count} outputs (model.kwargs.num_classes); {_TOOLKIT_COPY}")


def _check_images(pre: dict[str, Any], channels: int, path: str | os.PathLike) -> None:
    for key in ("img_size", "resize_size"):
        if not _whole(pre.get(key)):
            raise _bad(path, f"preprocessing.{key}", "a whole number of pixels", pre.get(key, _MISSING))
    for key, positive in (("mean", False), ("std", True)):
        if not _numbers(pre.get(key), channels, positive):
            should = f"a list of {channels} {'positive ' if positive else ''}numbers (one per channel)"
            raise _bad(path, f"preprocessing.{key}", should, pre.get(key, _MISSING))


def _check_masks(ckpt: dict[str, Any], pre: dict[str, Any], path: str | os.PathLike) -> None:
    scale = pre.get("scale", 0.5)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
        raise _bad(path, "preprocessing.scale", "a number in (0, 1]", scale)
    values = ckpt.get("mask_values")
    if not values or not all(_whole(v, 0) or (isinstance(v, list) and all(_whole(c, 0) for c in v))
                             for v in values):
        raise _bad(path, "mask_values", "a list of the masks' pixel values (from train_unet.py)",
                   values if values is not None else _MISSING)


def _check_series(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """A time-series checkpoint must say how to read recordings: channels, window, normalisation."""
    pre = ckpt.get("preprocessing") or {}
    missing = [k for k in ("window_size", "channels", "mean", "std") if k not in pre]
    if missing or not ckpt.get("classes"):
        raise UserError(f"{path} says it is a timeseries checkpoint but lacks how to read recordings "
                        f"({', '.join(missing) or 'classes'} missing); use a best_model.pth written by "
                        "run_behavior_classification.py")
    channels = pre["channels"]
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise _bad(path, "preprocessing.channels", "a list of channel column names", channels)
    if not _whole(pre["window_size"]):
        raise _bad(path, "preprocessing.window_size", "a whole number of steps", pre["window_size"])
    for key, positive in (("mean", False), ("std", True)):
        if not _numbers(pre[key], len(channels), positive):
            raise _bad(path, f"preprocessing.{key}", f"a list of {len(channels)} numbers (one per channel)",
                       pre[key])
    if pre.get("options") is not None and not isinstance(pre["options"], dict):
        raise _bad(path, "preprocessing.options", "a dict of reading options", pre["options"])


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            source: str) -> None:
    """Load weights strictly; a mismatch names the keys and shapes that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shape)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise UserError(f"weights in {source} do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain types (safe for weights_only loading)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
