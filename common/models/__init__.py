"""build_model(name, num_classes): this toolkit's own models, then torchvision, then timm.

A model is described by a plain spec {"name", "source", "kwargs"} that goes into every
checkpoint, so tools rebuild it without the user repeating flags.
"""
from __future__ import annotations

import difflib
import inspect
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


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def list_models() -> dict[str, list[str]]:
    return {"local": sorted(LOCAL_MODELS), "torchvision": _torchvision_names(), "timm": _timm_names()}


def find_source(name: str) -> str:
    if name in LOCAL_MODELS:
        return "local"
    if name in _torchvision_names():
        return "torchvision"
    if name in _timm_names():
        return "timm"
    known = sorted({n for names in list_models().values() for n in names})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model {name!r}.{hint} See the list with gpu_train.py --list-models")


def build_model(name: str, num_classes: int, *, in_chans: int = 3, pretrained: bool = False,
                source: str | None = None, **extra: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the spec that rebuilds it (pretrained weights are not part of the spec).
    `extra`: further constructor arguments (plain values), kept in the spec."""
    source = source or find_source(name)
    kwargs: dict[str, Any] = {"num_classes": int(num_classes), **extra}
    if in_chans != 3:
        kwargs["in_chans"] = int(in_chans)
    spec = {"name": name, "source": source, "kwargs": kwargs}
    return _construct(name, source, kwargs, pretrained), spec


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
                      trust: bool = False) -> None:
    """--weights: take every tensor whose name and shape fit (a different head is left new).
    trust: --trust-checkpoint, which also reads a whole pickled model (its state_dict is taken)."""
    from ..checkpoint import FORMAT, load_raw

    raw = load_raw(path, trust=trust)
    if isinstance(raw, nn.Module):
        raw = raw.state_dict()
    elif isinstance(raw, dict) and raw.get("format") == FORMAT:
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
                        "belongs to the same architecture as --model")
    model.load_state_dict(fitting, strict=False)
    left = sorted(set(own) - set(fitting))
    note = f"; kept new: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}" if left else ""
    log(f"weights: loaded {len(fitting)}/{len(own)} tensors from {path}{note}")
