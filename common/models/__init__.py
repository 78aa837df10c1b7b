"""build_model(name, num_classes): this toolkit's own models, then torchvision, then timm.

A model is described by a plain spec {"name", "source", "kwargs"} that goes into every
checkpoint, so tools rebuild it without the user repeating flags.
"""
from __future__ import annotations

import difflib
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
    raise UserError(f"unknown model {name!r}.{hint} See the list with --list-models")


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


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    return _construct(spec["name"], spec["source"], dict(spec.get("kwargs", {})), pretrained=False)


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


def load_weights_file(model: nn.Module, path: str | Path, log: Callable[[str], None]) -> None:
    """--weights: take every tensor whose name and shape fit (a different head is left new)."""
    from ..checkpoint import FORMAT, load_raw

    raw = load_raw(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
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
