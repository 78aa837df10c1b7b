"""Loading any checkpoint for inference, and gathering input files: what validate.py,
predict.py, export_onnx.py and test_model.py share.

Everything comes from the checkpoint: the model (rebuilt from its spec), the task, the
classes and the preprocessing. Files made elsewhere are accepted too: a plain state_dict
with --arch/--num-classes, and a whole pickled model only with --trust-checkpoint.
"""
from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import FORMAT, check_header, load_raw, load_state_dict_checked
from .data.images import IMAGENET_MEAN, IMAGENET_STD, is_image_file, preprocessing
from .errors import UserError
from .models import build_model, model_from_spec

SUPPORTED_TASKS = ("classification",)


@dataclass
class LoadedModel:
    model: nn.Module
    task: str
    path: Path
    classes: list[str] | None
    preprocessing: dict[str, Any]
    spec: dict[str, Any] | None
    checkpoint: dict[str, Any] | None = None  # None for files made elsewhere
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None


def load_for_inference(path: str | Path, device: torch.device, *, tasks: Sequence[str] = SUPPORTED_TASKS,
                       trust: bool = False, arch: str | None = None, num_classes: int | None = None,
                       img_size: int = 224) -> LoadedModel:
    """The model in eval mode on `device`, with everything needed to feed it."""
    file = Path(path)
    raw = load_raw(file, trust=trust)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        check_header(raw, file)
        return _from_checkpoint(raw, file, device, tasks)
    if isinstance(raw, nn.Module):
        return _from_module(raw, file, device, num_classes, img_size)
    return _from_state_dict(raw, file, device, arch, num_classes, img_size)


def _from_checkpoint(ckpt: dict[str, Any], file: Path, device: torch.device,
                     tasks: Sequence[str]) -> LoadedModel:
    task = ckpt.get("task")
    if task not in tasks:
        raise UserError(f"{file} is a {task} checkpoint, but this tool handles "
                        f"{' or '.join(tasks)} checkpoints")
    if task == "timeseries":
        _check_series_keys(ckpt, file)
    model = model_from_spec(ckpt["model"])
    load_state_dict_checked(model, ckpt["state_dict"], str(file))
    return LoadedModel(model.to(device).eval(), task, file, list(ckpt.get("classes") or []) or None,
                       dict(ckpt.get("preprocessing") or {}), dict(ckpt["model"]), ckpt)


def _check_series_keys(ckpt: dict[str, Any], file: Path) -> None:
    """A time-series checkpoint must say how to read recordings: channels, window, normalisation."""
    pre = ckpt.get("preprocessing") or {}
    missing = [k for k in ("window_size", "channels", "mean", "std") if k not in pre]
    if missing or not isinstance(pre.get("channels"), list) or not ckpt.get("classes"):
        raise UserError(f"{file} says it is a timeseries checkpoint but lacks how to read recordings "
                        f"({', '.join(missing) or 'channels or classes'} missing); use a best_model.pth "
                        "written by run_behavior_classification.py")


def _from_module(model: nn.Module, file: Path, device: torch.device, num_classes: int | None,
                 img_size: int) -> LoadedModel:
    classes = [str(i) for i in range(num_classes)] if num_classes else None
    note = "a whole pickled model (loaded with --trust-checkpoint); classes and preprocessing unknown"
    return LoadedModel(model.to(device).eval(), "classification", file, classes,
                       preprocessing(img_size, IMAGENET_MEAN, IMAGENET_STD), None, None, [note])


def _from_state_dict(raw: Any, file: Path, device: torch.device, arch: str | None,
                     num_classes: int | None, img_size: int) -> LoadedModel:
    state = raw
    if isinstance(raw, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(raw.get(key), dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{file} is neither a checkpoint of this toolkit nor a state_dict of tensors; "
                        "pass a .pth saved by the training scripts")
    if not arch or not num_classes:
        raise UserError(f"{file} is a plain state_dict without the architecture; pass --arch NAME and "
                        "--num-classes N (see --list-models in gpu_train.py)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model, spec = build_model(arch, num_classes)
    load_state_dict_checked(model, state, str(file))
    note = f"a plain state_dict, read as --arch {arch} --num-classes {num_classes}"
    return LoadedModel(model.to(device).eval(), "classification", file,
                       [str(i) for i in range(num_classes)],
                       preprocessing(img_size, IMAGENET_MEAN, IMAGENET_STD), spec, None, [note])


def gather_inputs(items: Iterable[str], accept: Callable[[Path], bool] = is_image_file,
                  kind: str = "images") -> list[Path]:
    """Files, folders (recursively, the files `accept` takes) and glob patterns, in order,
    without repeats."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if accept(p))
            if not matches:
                raise UserError(f"folder {path} holds no {kind}")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"no file matches {item!r}")
        else:
            raise UserError(f"input {path} does not exist; pass {kind} (files), folders or globs")
        found += matches
    return list(dict.fromkeys(found))
