"""--mixup / --cutmix / --mix-prob: torchvision.transforms.v2's MixUp and CutMix on whole batches
on the device. A mixed batch carries soft targets (N, classes); the loss takes them as they are.
The batch-level draws (whether to mix, the weight, the box) come from torch's global CPU
generator: no device synchronisation, and a resumed run restores that generator."""
from __future__ import annotations

from collections.abc import Callable

import torch

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_mixer(num_classes: int, mixup: float, cutmix: float, prob: float) -> Mixer | None:
    """None when neither --mixup nor --cutmix is on (or --mix-prob is 0). The values were checked
    with the other training numbers (cli.check_training_values)."""
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices or prob == 0:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def apply(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prob < 1.0 and float(torch.rand(())) >= prob:
            return inputs, targets
        return mix(inputs, targets)

    return apply


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of (maybe mixed) targets: the dominant class of a soft target."""
    return targets.argmax(dim=1) if targets.dim() == 2 else targets
