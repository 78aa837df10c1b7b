"""Small built-in networks: quick on a CPU, used by the demo and the tests."""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three conv blocks, global pooling and a linear head."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(_block(in_chans, width), _block(width, 2 * width),
                                      _block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class TinyMLP(nn.Module):
    """An MLP on a small pooled image; no batch norm, so batch splits give identical updates."""

    def __init__(self, num_classes: int, in_chans: int = 3, pool: int = 8, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                                 nn.Linear(in_chans * pool * pool, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Residual(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (1x1 when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 notes' network: a 3x3 stem and four residual stages of 128-256-512-768
    channels (width 128; stages 2-4 halve the resolution), global pooling, dropout, a linear head.
    About 13M parameters at width 128; a smaller width for quick checks."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 128, dropout: float = 0.2):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 6 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, chans[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        stages, cin = [], chans[0]
        for i, cout in enumerate(chans):
            stages.append(_Residual(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))
