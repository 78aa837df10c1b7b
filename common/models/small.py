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
