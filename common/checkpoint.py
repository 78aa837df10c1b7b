"""The checkpoint format: one dict of plain types, written atomically, read with
weights_only=True, from which every tool rebuilds the model on its own."""
from __future__ import annotations

import datetime as _dt
import hashlib
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
            try:
                torch.save(obj, fh)
            except RuntimeError as exc:  # torch's writer says "unexpected pos" on a full disk
                raise _write_error(exc, target) from None
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _write_error(exc: RuntimeError, target: Path) -> OSError:
    """torch.save's C++ writer failing (a full disk, mostly) as the OSError it stands for."""
    import errno
    import shutil

    free = shutil.disk_usage(target.parent).free
    code = errno.ENOSPC if free < (64 << 20) else errno.EIO
    message = os.strerror(code) if code == errno.ENOSPC else f"{os.strerror(code)} ({_short(exc)})"
    return OSError(code, message, str(target))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
                        "(training writes checkpoint.pth and best_model.pth in --output)")
    if file.is_dir():
        raise UserError(f"checkpoint {file} is a folder; pass the .pth file inside it")
    if file.stat().st_size == 0:
        raise UserError(f"checkpoint {file} is empty (0 bytes); it was not written completely. "
                        "Use another checkpoint, e.g. best_model.pth")
    with open(file, "rb") as fh:
        head = fh.read(4)
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
        raise UserError(f"checkpoint {file} is corrupt or not a PyTorch file ({_short(exc)}); "
                        "use another copy") from None
    except ImportError as exc:  # a trusted whole-model pickle whose classes are not importable
        raise UserError(f"checkpoint {file} needs Python code that is not importable here ({exc}); "
                        "run from the project that defined the model, or save its state_dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError,
            TypeError, struct.error) as exc:  # what unpickling garbage raises
        raise UserError(f"checkpoint {file} is truncated or not a PyTorch checkpoint "
                        f"({_short(exc)}); use another copy, e.g. best_model.pth") from None


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


def load_checkpoint(path: str | os.PathLike, *, task: str | None = None,
                    need_train_state: bool = False, trust: bool = False) -> dict[str, Any]:
    """Load and check one of this toolkit's checkpoints."""
    ckpt = load_raw(path, trust=trust)
    check_header(ckpt, path, task=task, need_train_state=need_train_state)
    return ckpt


REQUIRED_KEYS = ("task", "model", "state_dict")


def check_header(ckpt: Any, path: str | os.PathLike, *, task: str | None = None,
                 need_train_state: bool = False) -> None:
    """Format, version, completeness and task of a loaded checkpoint dict."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no '{FORMAT}' header); "
                        "train with gpu_train.py, or load plain weights with --weights")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt['version']}, newer than this "
                        f"toolkit's {VERSION}; update the toolkit")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks the entries {', '.join(missing)}; it was not written by this "
                        "toolkit's training scripts, use another checkpoint")
    if task is not None and ckpt.get("task") != task:
        raise UserError(f"{path} is a {ckpt.get('task')} checkpoint, but this tool needs a "
                        f"{task} checkpoint")
    if need_train_state and "train_state" not in ckpt:
        raise UserError(f"{path} has no training state to resume from (best_model.pth and "
                        "*_finetuned.pt hold weights only); resume from checkpoint.pth")


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
