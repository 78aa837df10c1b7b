"""Loading any checkpoint for inference, and gathering input files: what validate.py,
predict.py, export_onnx.py and test_model.py share.

Everything comes from the checkpoint: the model (rebuilt from its spec), the task, the
classes and the preprocessing. Files made elsewhere are accepted too: a plain state_dict
with --arch/--num-classes, and a whole pickled model only with --trust-checkpoint (the flags
of cli.add_loading_args, which every such tool takes). A U-Net state_dict in Pytorch-UNet's
layout (the guide's own trainer: module names inc, down1..4, up1..4, outc, and an optional
`mask_values` list beside the tensors) needs no flag: the U-Net's classes, upsampling and width
are read from its tensors, the mask values from the file; its scale is not recorded (0.5, the
trainer's default, unless the tool's -s says otherwise).
"""
from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import FORMAT, check_header, check_inputs, load_raw, load_state_dict_checked
from .data.images import IMAGENET_MEAN, IMAGENET_STD, is_image_file, preprocessing
from .errors import UserError
from .models import build_model, model_from_spec

SUPPORTED_TASKS = ("classification",)
ALL_TASKS = ("classification", "segmentation", "timeseries")


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
    mask_values: list[Any] | None = None  # segmentation: the mask value of each class index

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
    unet = unet_state_dict(raw)
    if unet is not None:
        if "segmentation" not in tasks:
            raise UserError(f"{file} is a U-Net (segmentation) state_dict, but this tool handles "
                            f"{' or '.join(tasks)} models")
        return _from_unet_state_dict(*unet, file, device, arch, num_classes)
    return _from_state_dict(raw, file, device, arch, num_classes, img_size)


def _from_checkpoint(ckpt: dict[str, Any], file: Path, device: torch.device,
                     tasks: Sequence[str]) -> LoadedModel:
    task = ckpt.get("task")
    if task not in tasks:
        raise UserError(f"{file} is a {task} checkpoint, but this tool handles "
                        f"{' or '.join(tasks)} checkpoints")
    check_inputs(ckpt, file)
    model = model_from_spec(ckpt["model"], where=f"checkpoint {file}")
    load_state_dict_checked(model, ckpt["state_dict"], str(file))
    return LoadedModel(model.to(device).eval(), task, file, list(ckpt.get("classes") or []) or None,
                       dict(ckpt.get("preprocessing") or {}), dict(ckpt["model"]), ckpt,
                       mask_values=ckpt.get("mask_values"))


def _from_module(model: nn.Module, file: Path, device: torch.device, num_classes: int | None,
                 img_size: int) -> LoadedModel:
    classes = [str(i) for i in range(num_classes)] if num_classes else None
    note = "a whole pickled model (loaded with --trust-checkpoint); classes and preprocessing unknown"
    return LoadedModel(model.to(device).eval(), "classification", file, classes,
                       preprocessing(img_size, IMAGENET_MEAN, IMAGENET_STD), None, None, [note])


UNET_KEYS = ("inc.double_conv.0.weight", "outc.conv.weight")  # Pytorch-UNet's first and last layers
UNET_SCALE = 0.5  # Pytorch-UNet's default --scale


def unet_state_dict(raw: Any) -> tuple[dict[str, torch.Tensor], Any] | None:
    """(tensors, mask values or None) of a U-Net state_dict in Pytorch-UNet's layout, the tensors
    possibly under "state_dict"/"model_state_dict"/"model" and with DDP or compile prefixes;
    None for any other file."""
    if not isinstance(raw, dict):
        return None
    nested = [raw[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(raw.get(k), dict)]
    inner = nested[0] if nested else raw
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in inner.items()
             if isinstance(k, str) and torch.is_tensor(v)}
    if not all(torch.is_tensor(state.get(k)) for k in UNET_KEYS):
        return None
    return state, inner.get("mask_values", raw.get("mask_values"))


def unet_shape(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The U-Net's constructor arguments as its tensors give them: classes (outc's outputs), input
    channels and width (inc's first convolution), bilinear (no transposed-conv weights in up1)."""
    first, last = state[UNET_KEYS[0]], state[UNET_KEYS[1]]
    return {"num_classes": int(last.shape[0]), "in_chans": int(first.shape[1]), "base": int(first.shape[0]),
            "bilinear": "up1.up.weight" not in state}


def _mask_values(values: Any, classes: int, file: Path) -> tuple[list[Any], list[str]]:
    """The file's mask values, checked against the U-Net's classes (2 values for one output
    channel); class indices 0..N-1 where the file has none (Pytorch-UNet's predict does the same)."""
    count = max(2, classes)
    if values is None:
        return list(range(count)), [f"no mask_values in the file: masks are written as class indices "
                                    f"0..{count - 1}"]
    def plain(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = isinstance(values, list | tuple) and all(
        plain(v) or (isinstance(v, list | tuple) and len(v) == 3 and all(plain(c) and c <= 255 for c in v))
        for v in values)
    if not ok:
        raise UserError(f"{file}: 'mask_values' should be a list of the masks' pixel values (e.g. [0, 255]), "
                        f"got {str(values)[:80]}; fix the entry or remove it")
    if len(values) != count:
        raise UserError(f"{file}: 'mask_values' has {len(values)} values but the U-Net has {classes} output "
                        f"channel(s), which need {count}; the entry does not belong to these weights")
    return [list(v) if isinstance(v, list | tuple) else int(v) for v in values], []


def _from_unet_state_dict(state: dict[str, torch.Tensor], values: Any, file: Path, device: torch.device,
                          arch: str | None, num_classes: int | None) -> LoadedModel:
    """A Pytorch-UNet state_dict as a segmentation model: shape from the tensors, mask values from the
    file, preprocessing as that trainer's (no normalisation, scale 0.5 unless -s is given)."""
    from .data.segmentation import preprocessing as seg_preprocessing

    shape = unet_shape(state)
    in_chans = shape.pop("in_chans")
    model, spec = build_model("unet", shape.pop("num_classes"), in_chans=in_chans, **shape)
    load_state_dict_checked(model, state, str(file))
    classes = spec["kwargs"]["num_classes"]
    mask_values, notes = _mask_values(values, classes, file)
    upsampling = "bilinear" if shape["bilinear"] else "transposed-conv"
    notes.insert(0, f"a U-Net state_dict (Pytorch-UNet layout), read from its tensors as {classes} output "
                    f"channel(s), {upsampling} upsampling, width {shape['base']}; mask values {mask_values}; "
                    f"its scale is not recorded: {UNET_SCALE}, that trainer's default, is assumed")
    ignored = [flag for flag, value in (("--arch", arch), ("--num-classes", num_classes)) if value]
    if ignored:
        notes.append(f"{', '.join(ignored)} ignored: the U-Net's shape is read from {file}")
    return LoadedModel(model.to(device).eval(), "segmentation", file, [str(v) for v in mask_values],
                       seg_preprocessing(UNET_SCALE, in_chans), spec, None, notes, mask_values=mask_values)


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
                        "--num-classes N (names: gpu_train.py --list-models)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model, spec = _fitting_model(arch, num_classes, state)
    load_state_dict_checked(model, state, str(file))
    note = f"a plain state_dict, read as --arch {spec['source']}/{spec['name']} --num-classes {num_classes}"
    return LoadedModel(model.to(device).eval(), "classification", file,
                       [str(i) for i in range(num_classes)],
                       preprocessing(img_size, IMAGENET_MEAN, IMAGENET_STD), spec, None, [note])


def _fitting_model(arch: str, num_classes: int, state: dict[str, torch.Tensor]):
    """The model of a bare --arch name whose layout fits the state_dict: timm and torchvision
    both have efficientnet_b0, resnet50 ... with other parameter names; a bare name tries the
    library it resolves to first, then the others that have the name. A prefixed name is taken
    as given."""
    from .models import also_in, split_name

    model, spec = build_model(arch, num_classes)
    if split_name(arch)[0] is not None or _fits(model, state):
        return model, spec
    for other in also_in(spec["source"], spec["name"]):
        candidate, other_spec = build_model(f"{other}/{spec['name']}", num_classes)
        if _fits(candidate, state):
            return candidate, other_spec
    return model, spec  # load_state_dict_checked names what does not fit


def _fits(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(tuple(v.shape) == tuple(state[k].shape) for k, v in own.items())


def load_from_args(path: str | Path, args: Any, device: torch.device, *, tasks: Sequence[str] = ALL_TASKS,
                   log: Callable[[str], None] = print, plain_img_size: bool = True) -> LoadedModel:
    """A tool's model file, read with the flags of cli.add_loading_args (--trust-checkpoint,
    --arch, --num-classes, --img-size). Notes go to `log`, and so does a warning when the weights
    hold NaN or Inf. plain_img_size: --img-size is only for files made elsewhere (a checkpoint
    records its size), so with a checkpoint it is noted as ignored."""
    flag = vars(args).get
    loaded = load_for_inference(path, device, tasks=tasks, trust=bool(flag("trust_checkpoint")),
                                arch=flag("arch"), num_classes=flag("num_classes"),
                                img_size=flag("img_size") or 224)
    for note in loaded.notes:
        log(f"notice: {note}")
    if loaded.task == "segmentation" and loaded.checkpoint is None and "scale" in vars(args):
        log(f"notice: using -s/--scale {args.scale:g}" if args.scale is not None else
            f"notice: if it was trained at another scale than {UNET_SCALE}, pass that scale with -s/--scale")
    keys = ("arch", "num_classes", "img_size") if plain_img_size else ("arch", "num_classes")
    ignored = [f"--{key.replace('_', '-')}" for key in keys if flag(key) is not None]
    if loaded.checkpoint is not None and ignored:
        log(f"notice: {', '.join(ignored)} ignored: {loaded.path} records its architecture, classes and "
            "input size")
    warning = nonfinite_warning(loaded)
    if warning:
        log(warning)
    return loaded


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf, with how many of each."""
    found = []
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            counts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
            found.append(f"{name} ({', '.join(c for c in counts if c)})")
    return found


def names(items: Sequence[str], limit: int) -> str:
    """The first `limit` items, and how many more."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def nonfinite_warning(loaded: LoadedModel) -> str | None:
    bad = nonfinite_tensors(loaded.model)
    if not bad:
        return None
    return (f"warning: {loaded.path} holds non-finite weights (NaN/Inf) in {len(bad)} tensor(s): "
            f"{names(bad, 5)}; its outputs are meaningless, use an earlier checkpoint")


def output_width(loaded: LoadedModel, device: torch.device) -> int:
    """The number of classes: known, or (a whole pickled model) the width of its output."""
    if loaded.num_classes:
        return loaded.num_classes
    pre = loaded.preprocessing
    x = torch.zeros(1, int(pre.get("channels", 3)), int(pre["img_size"]), int(pre["img_size"]), device=device)
    with torch.inference_mode():
        out = loaded.model(x)
    if not torch.is_tensor(out) or out.dim() != 2:
        raise UserError(f"{loaded.path} gives {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for "
                        "an image, not a row of class scores; pass --num-classes N for a classifier")
    return int(out.shape[1])


def folder_samples(loaded: LoadedModel, data_dir: Path, outputs: int
                   ) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Class names (one per output), (path, label) samples of data_dir's class folders, and notes.
    A checkpoint's class names label the folders by name; a file made elsewhere has none, so the
    class folders in sorted order are labels 0..K-1, as torchvision's ImageFolder numbers them."""
    from .data.images import samples_for_classes, scan_class_folders

    if loaded.checkpoint is not None and loaded.classes:
        return list(loaded.classes), samples_for_classes(data_dir, loaded.classes), []
    found, samples = scan_class_folders(data_dir)
    if len(found) > outputs:
        raise UserError(f"{data_dir} has {len(found)} class folders but the model has {outputs} outputs; "
                        f"pass a folder with at most {outputs}")
    note = ("the file has no class names: the class folders in sorted order are labels "
            f"0..{len(found) - 1} (as torchvision's ImageFolder numbers them)")
    return found + [str(i) for i in range(len(found), outputs)], samples, [note]


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
