"""Freezing parts of a model for fine-tuning: convolutions, batch norm, or a prefix of modules.

A frozen parameter has requires_grad=False, so it gets no gradient and build_optimizer leaves
it out. Frozen batch norm also stays in eval mode: it normalises with its running statistics
and never updates them. torchvision.ops.FrozenBatchNorm2d does the same for 2-D layers only,
and it changes the state_dict (no num_batches_tracked), so checkpoints would no longer load
into the model their spec rebuilds; keeping the layers and their train() in eval mode avoids
both.
"""
from __future__ import annotations

import difflib
import types
from dataclasses import dataclass

from torch import nn

from .errors import UserError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class FreezeReport:
    trainable: int
    frozen: int
    description: str

    def line(self) -> str:
        total = self.trainable + self.frozen
        return (f"parameters: {self.trainable:,} trainable / {self.frozen:,} frozen of {total:,}"
                f"{f' ({self.description})' if self.description else ''}")


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_batchnorm(model: nn.Module) -> int:
    """Every batch-norm layer: affine parameters frozen, eval mode for good. Returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, _BN):
            module.requires_grad_(False)
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
            count += 1
    return count


def _freeze_through(model: nn.Module, targets: set[int]) -> None:
    """Freeze every parameter up to and including the last one of `targets` (parameter ids),
    in registration order."""
    named = list(model.named_parameters())
    upto = max(i for i, (_, p) in enumerate(named) if id(p) in targets)
    for _, param in named[: upto + 1]:
        param.requires_grad_(False)


def freeze_conv(model: nn.Module) -> None:
    """Every convolution frozen, and everything before the last one: only the layers after the
    last convolution train (the classifier and what sits between it and the features)."""
    conv_params = {id(p) for m in model.modules() if isinstance(m, _CONV) for p in m.parameters()}
    if not conv_params:
        raise UserError(f"--freeze-conv: {type(model).__name__} has no convolution layers; "
                        "use --freeze-until NAME instead")
    _freeze_through(model, conv_params)


def freeze_until(model: nn.Module, name: str) -> None:
    """Parameters of the modules up to and including module `name` (in registration order)."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        tops = [n for n, _ in model.named_children()]
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"--freeze-until {name!r} names no module of {type(model).__name__}.{hint} "
                        f"Its top-level modules: {', '.join(tops)}")
    own = {id(p) for p in modules[name].parameters()}
    if not own:
        raise UserError(f"--freeze-until {name!r}: that module has no parameters; name a layer "
                        "with weights")
    _freeze_through(model, own)


def apply_freezing(model: nn.Module, *, conv: bool, bn: bool, until: str | None) -> FreezeReport:
    """Freeze as asked; an error when nothing would be left to train."""
    done = []
    if until:
        freeze_until(model, until)
        done.append(f"frozen up to {until}")
    if conv:
        freeze_conv(model)
        done.append("convolutions frozen")
    if bn:
        done.append(f"{freeze_batchnorm(model)} batch-norm layers frozen in eval mode")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if trainable == 0:
        flags = " ".join(f for f, on in (("--freeze-conv", conv), ("--freeze-bn", bn),
                                          (f"--freeze-until {until}", bool(until))) if on)
        raise UserError(f"{flags} leaves no parameter to train in {type(model).__name__}; "
                        "freeze less (e.g. name an earlier module with --freeze-until)")
    return FreezeReport(trainable, frozen, ", ".join(done))
