"""build_model(name, num_classes): this toolkit's own models, then timm, then torchvision.

A bare name resolves in that order (the guides are timm guides: their model table lists timm's
models); `timm/NAME` and `torchvision/NAME` choose the library. A model is described by a plain
spec {"name", "source", "kwargs"} that goes into every checkpoint, so tools rebuild it without the
user repeating flags; the spec's source, not the resolution order, decides what a checkpoint
rebuilds (a checkpoint made when torchvision came first still rebuilds torchvision's model).
"""
from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .small import CifarResNet, SmallCNN, TinyMLP
from .timeseries import SeriesCNN, SeriesFusion, SeriesTransformer
from .unet import UNet

LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "cifar_resnet": CifarResNet,  # the CIFAR-10 recipe's network (--recipe cifar10)
    "tiny_mlp": TinyMLP,
    "unet": UNet,
    # time-series (input N x channels x steps): behaviour classification
    "cnn": SeriesCNN,
    "transformer": SeriesTransformer,
    "fusion": SeriesFusion,
}


# The order a bare name resolves in, and the prefixes that choose a library (local/ too, for symmetry).
SOURCES = ("local", "timm", "torchvision")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _timm_names() -> list[str]:
    if not _timm_installed():
        return []
    import timm

    return sorted(timm.list_models())


def list_models() -> dict[str, list[str]]:
    """Names per source, in the order a bare name resolves."""
    return {"local": sorted(LOCAL_MODELS), "timm": _timm_names(), "torchvision": _torchvision_names()}


def split_name(name: str) -> tuple[str | None, str]:
    """'timm/efficientnet_b0' -> ('timm', 'efficientnet_b0'); a bare name -> (None, name)."""
    head, sep, rest = name.partition("/")
    if sep and head in SOURCES:
        return head, rest
    return None, name


def has_model(source: str, name: str) -> bool:
    if source == "local":
        return name in LOCAL_MODELS
    if source == "timm":
        if not _timm_installed():
            return False
        import timm

        return bool(timm.is_model(name))  # also a name with a weights tag, e.g. efficientnet_b0.ra_in1k
    if source == "torchvision":
        return name in _torchvision_names()
    return False


def resolve_name(name: str) -> tuple[str, str]:
    """(source, bare name) of a --model/--arch value: `timm/NAME` or `torchvision/NAME` as asked;
    a bare name from the first of local, timm, torchvision that has it."""
    prefix, bare = split_name(name.strip())
    if prefix is not None:
        if prefix == "timm" and not _timm_installed():
            raise UserError(f"model {name!r} needs timm, which is not installed; install it with "
                            "pip install timm, or pick a torchvision model (gpu_train.py --list-models)")
        if has_model(prefix, bare):
            return prefix, bare
        raise _unknown(name, prefix, bare)
    for source in SOURCES:
        if has_model(source, bare):
            return source, bare
    raise _unknown(name, None, bare)


def find_source(name: str) -> str:
    return resolve_name(name)[0]


def also_in(source: str, name: str) -> list[str]:
    """The other sources that have a model of this name (a bare name picks the first of them)."""
    return [other for other in SOURCES if other != source and has_model(other, name)]


def _unknown(name: str, prefix: str | None, bare: str) -> UserError:
    listing = "See the list with gpu_train.py --list-models"
    if prefix is not None:
        others = [f"{other}/{bare}" for other in also_in(prefix, bare)]
        if others:
            return UserError(f"unknown model {name!r}: {prefix} has no {bare!r}, but {others[0]} exists; "
                             f"use that name. {listing}")
        close = difflib.get_close_matches(bare, list_models()[prefix], n=3)
        hint = f" Did you mean {', '.join(f'{prefix}/{c}' for c in close)}?" if close else ""
        return UserError(f"unknown model {name!r}: {prefix} has no {bare!r}.{hint} {listing}")
    known = sorted({n for names in list_models().values() for n in names})
    close = difflib.get_close_matches(bare, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown model {name!r}.{hint} Prefix timm/ or torchvision/ to choose the "
                     f"library. {listing}")


def build_model(name: str, num_classes: int, *, in_chans: int = 3, pretrained: bool = False,
                source: str | None = None, img_size: int | None = None,
                **extra: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the spec that rebuilds it (pretrained weights are not part of the spec).
    `name` may carry a timm/ or torchvision/ prefix. img_size: the input size training will use; a
    timm model made for one fixed size (ViT, DeiT, Swin, MLP-Mixer...) is built for this one (timm
    resizes the position embeddings of its pretrained weights). `extra`: further constructor
    arguments (plain values), kept in the spec."""
    if source is None:
        source, name = resolve_name(name)
    else:
        prefix, name = split_name(name)
        if prefix is not None and prefix != source:
            raise UserError(f"model {prefix}/{name} cannot come from {source}")
    kwargs: dict[str, Any] = {"num_classes": int(num_classes), **extra}
    if in_chans != 3:
        kwargs["in_chans"] = int(in_chans)
    if source == "timm" and img_size is not None and "img_size" not in kwargs:
        fixed = timm_fixed_size(name)
        if fixed is not None and fixed != int(img_size):
            kwargs["img_size"] = int(img_size)
            try:
                model = _construct(name, source, kwargs, pretrained)
            except TypeError:  # a fixed-size model that takes no img_size: input_size_problem says so
                del kwargs["img_size"]
            else:
                return model, {"name": name, "source": source, "kwargs": kwargs}
    spec = {"name": name, "source": source, "kwargs": kwargs}
    return _construct(name, source, kwargs, pretrained), spec


def timm_fixed_size(name: str) -> int | None:
    """The input size a timm model is made for when it takes no other (its pretrained_cfg says
    fixed_input_size), else None."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        return None
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    return int(cfg.input_size[-1])


def designed_size(model: nn.Module) -> int | None:
    """The input size a model was made for, where it records one (timm's pretrained_cfg and
    patch embedding, torchvision's ViT), else None."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if size:
        return int(size[-1] if isinstance(size, (tuple, list)) else size)
    if isinstance(getattr(model, "image_size", None), int):
        return int(model.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(shape[-1]) if shape else None


def input_size_problem(model: nn.Module, size: int, in_chans: int = 3) -> str | None:
    """Why the model cannot take size x size inputs (one forward in evaluation mode), or None.
    The model's mode is left as it was, and evaluation mode updates no buffer."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros(1, in_chans, size, size, device=device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except (AssertionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return first[:160]
    finally:
        for module, training in modes:
            module.training = training
    return None


def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor) -> int:
    """Set every BatchNorm layer's running mean and variance from one training-mode forward of
    `inputs` (a training batch); returns how many layers were set.

    A fresh BatchNorm layer starts with running variance 1, but behind a depthwise convolution
    (EfficientNet, MobileNet) the real variance at initialisation is about 1e-4; with momentum 0.1
    (torchvision's MobileNetV3: 0.01) the start value dominates the running variance for the first
    ~80 (~800) steps, so in evaluation mode those layers scale their inputs down a hundredfold and
    the model predicts one class for epochs on a small data set. Starting from the batch's own
    statistics removes that; the usual moving average takes over from the next step."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and m.running_var is not None]
    if not layers:
        return 0
    saved = [(m, m.momentum) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in layers:
            m.momentum = 1.0  # running = this batch's statistics
        model.train()
        with torch.no_grad():
            model(inputs)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(layers)


def tame_head(model: nn.Module) -> str | None:
    """Re-initialise the classifier (the last Linear layer) as a fresh nn.Linear when its weights
    are far larger than that (more than twice the bound 1/sqrt(inputs)); returns what was done, or
    None. EfficientNet and MobileNet (timm and torchvision) draw the head from +-1/sqrt(outputs):
    right for 1000 classes, but +-0.71 for 2, which starts a 2-class run at a loss of about 5 and
    slows learning from scratch. For a model trained from scratch only (pretrained heads are new
    layers anyway)."""
    head = model.get_submodule(head_name(model))
    bound = 1.0 / math.sqrt(head.in_features)
    largest = float(head.weight.detach().abs().max())
    if largest <= 2 * bound:
        return None
    head.reset_parameters()
    return (f"classifier layer {head_name(model)!r} re-initialised at +-{bound:.3f} (1/sqrt of its "
            f"{head.in_features} inputs): the library's initialisation, up to +-{largest:.2f}, is scaled "
            "for 1000 classes")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_from_spec(spec: dict[str, Any], where: str = "the model spec") -> nn.Module:
    """The model a checkpoint's "model" entry describes. A hand-edited entry (an argument the
    constructor does not take, a missing or mistyped one) is a UserError naming it and `where`."""
    name, source, kwargs = spec["name"], spec["source"], dict(spec.get("kwargs", {}))
    if source == "local" and name in LOCAL_MODELS:
        _check_kwargs(LOCAL_MODELS[name], name, kwargs, where)
    elif source == "torchvision":
        unknown = sorted(set(kwargs) - {"num_classes", "in_chans"})
        if unknown:
            raise UserError(f"{where}: model.kwargs has {unknown[0]!r}, which torchvision's {name} does not "
                            "take here (num_classes, in_chans); remove it or use an unedited checkpoint")
        if not _is_whole(kwargs.get("num_classes")):
            raise UserError(f"{where}: model.kwargs.num_classes is {kwargs.get('num_classes')!r}, but "
                            f"{name} needs a whole number of 1 or more; use an unedited checkpoint")
    try:
        return _construct(name, source, kwargs, pretrained=False)
    except (TypeError, ValueError, RuntimeError) as exc:  # timm's checks, or a value it cannot use
        raise UserError(f"{where}: cannot build {name} from model.kwargs {kwargs} ({exc}); use an unedited "
                        "checkpoint") from None


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_kwargs(factory: Callable[..., nn.Module], name: str, kwargs: dict[str, Any], where: str) -> None:
    """Every constructor argument of a built-in model known, present when required, and of the
    type of its default (whole numbers for the required ones: counts of classes and channels)."""
    params = {p.name: p for p in inspect.signature(factory).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for key, value in kwargs.items():
        if key not in params:
            raise UserError(f"{where}: model.kwargs has {key!r}, which {name} does not take (it takes "
                            f"{', '.join(params)}); remove it or use an unedited checkpoint")
        default = params[key].default
        kind = int if default is inspect.Parameter.empty else type(default)
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        if default is not None and not fits:
            raise UserError(f"{where}: model.kwargs.{key} is {value!r}, but {name} needs a "
                            f"{'whole number' if kind is int else kind.__name__}; use an unedited checkpoint")
        if default is inspect.Parameter.empty and not _is_whole(value):
            raise UserError(f"{where}: model.kwargs.{key} is {value!r}, but {name} needs a whole number of "
                            "1 or more; use an unedited checkpoint")
    missing = [key for key, p in params.items() if p.default is inspect.Parameter.empty and key not in kwargs]
    if missing:
        raise UserError(f"{where}: model.kwargs lacks {', '.join(missing)}, which {name} needs; use an "
                        "unedited checkpoint")


def _construct(name: str, source: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    if source == "local":
        if name not in LOCAL_MODELS:
            raise UserError(f"unknown built-in model {name!r}; built-in: {', '.join(LOCAL_MODELS)}")
        if pretrained:
            raise UserError(f"{name} has no pretrained weights; drop --pretrained")
        return LOCAL_MODELS[name](**kwargs)
    if source == "torchvision":
        return _torchvision_model(name, kwargs, pretrained)
    if source == "timm":
        import timm

        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError) as exc:
            if pretrained:
                raise _download_error(name, exc) from None
            raise
    raise UserError(f"unknown model source {source!r} (expected local, torchvision or timm)")


def _torchvision_model(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import torchvision

    if kwargs.get("in_chans", 3) != 3:
        raise UserError(f"torchvision's {name} takes 3 input channels; use a timm model instead")
    num_classes = kwargs["num_classes"]
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError) as exc:
        raise _download_error(name, exc) from None
    replace_head(model, num_classes)
    return model


def _download_error(name: str, exc: BaseException) -> UserError:
    return UserError(f"could not get pretrained weights for {name} ({type(exc).__name__}: "
                     f"{str(exc)[:120]}); check the network, or pass a local file with --weights")


def head_name(model: nn.Module) -> str:
    """Name of the classifier layer: the last Linear module."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise UserError(f"could not find the classifier layer (a Linear layer) of {type(model).__name__}")
    return last


def replace_head(model: nn.Module, num_classes: int, *, always: bool = False) -> None:
    """Swap the last Linear layer for a fresh one with num_classes outputs (always: even when it
    has that many already, e.g. for another set of classes of the same size)."""
    last = head_name(model)
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if always or old.out_features != num_classes:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        setattr(parent, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))


def permute_head(model: nn.Module, order: list[int]) -> None:
    """Reorder the classifier's outputs: new output i is old output order[i]."""
    head = model.get_submodule(head_name(model))
    index = torch.as_tensor(order, device=head.weight.device)
    with torch.no_grad():
        head.weight.copy_(head.weight[index])
        if head.bias is not None:
            head.bias.copy_(head.bias[index])


def load_weights_file(model: nn.Module, path: str | Path, log: Callable[[str], None],
                      trust: bool = False, *, task: str = "classification", flag: str = "--weights",
                      shape_flags: str = "--model") -> None:
    """--weights (-f/--load for the U-Net): take every tensor whose name and shape fit (a different
    head is left new). trust: --trust-checkpoint, which also reads a whole pickled model (its
    state_dict is taken). A toolkit checkpoint of another task is refused by name; shape_flags:
    the flags that choose the architecture, for the message when nothing fits."""
    from ..checkpoint import FORMAT, load_raw

    raw = load_raw(path, trust=trust)
    if isinstance(raw, nn.Module):
        raw = raw.state_dict()
    elif isinstance(raw, dict) and raw.get("format") == FORMAT:
        if raw.get("task", task) != task:
            name = (raw.get("model") or {}).get("name", "?") if isinstance(raw.get("model"), dict) else "?"
            raise UserError(f"{flag} {path} is a {raw['task']} checkpoint ({name}); this script needs "
                            f"{task} weights")
        raw = raw["state_dict"]
    elif isinstance(raw, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds no state_dict; pass a file of model weights")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in raw.items()
             if hasattr(v, "shape")}
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise UserError(f"no tensor in {path} fits {type(model).__name__}; check that the file "
                        f"belongs to the same architecture as {shape_flags}")
    model.load_state_dict(fitting, strict=False)
    left = sorted(set(own) - set(fitting))
    note = f"; kept new: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}" if left else ""
    log(f"weights: loaded {len(fitting)}/{len(own)} tensors from {path}{note}")
