"""--ema DECAY: an exponential moving average of the weights, from torch.optim.swa_utils.

AveragedModel holds the copy and get_ema_multi_avg_fn is the update (one foreach lerp over all
floating-point parameters and buffers). The update is driven here rather than through
AveragedModel.update_parameters, because that method reads its n_averaged counter on the host
(`bool(self.n_averaged == 0)`, `if self.n_averaged > 0`) at every call: a host synchronisation
per optimizer step on CUDA. The first average is the copy AveragedModel makes, so nothing
needs that counter. Integer buffers (BatchNorm's num_batches_tracked) are copied.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import load_state_dict_checked
from .errors import UserError


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"--ema must be between 0 and 1 (e.g. 0.999), got {decay}")
        self.decay = decay
        self.source = model
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.module: nn.Module = self.averaged.module
        self.module.eval()
        self._update = get_ema_multi_avg_fn(decay)
        self._pairs = self._tensor_pairs()

    def _tensor_pairs(self) -> tuple[list[torch.Tensor], ...]:
        own = [*self.module.parameters(), *self.module.buffers()]
        src = [*self.source.parameters(), *self.source.buffers()]
        floats = [i for i, t in enumerate(own) if torch.is_floating_point(t)]
        others = [i for i, t in enumerate(own) if not torch.is_floating_point(t)]
        return ([own[i].detach() for i in floats], [src[i].detach() for i in floats],
                [own[i] for i in others], [src[i] for i in others])

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step: ema = decay * ema + (1 - decay) * weights, on the device."""
        ema_f, src_f, ema_o, src_o = self._pairs
        if ema_f:
            self._update(ema_f, src_f, None)
        for dst, src in zip(ema_o, src_o, strict=True):
            dst.copy_(src)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach() for k, v in self.module.state_dict().items()}
        return {"decay": self.decay, "state_dict": weights}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        load_state_dict_checked(self.module, state["state_dict"], f"{source} (EMA weights)")
        self._pairs = self._tensor_pairs()
