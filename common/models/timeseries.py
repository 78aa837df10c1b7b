"""Time-series classifiers for behaviour classification from multichannel sensor windows.

Every model maps a float window (N, C, T) -- channels first, as for Conv1d -- to logits
(N, num_classes), for any window length T >= 8, and is built from plain keyword arguments
(a spec dict): `num_classes, in_chans=3, width=64, depth=2, dropout=0.1, ...`.

- SeriesCNN: a stem convolution, `depth` residual blocks (conv-BN-ReLU-conv-BN plus a skip;
  stride 2 and twice the channels, up to 4x width, from the second block on), global average
  and max pooling concatenated, dropout and a linear head.
- SeriesTransformer: a convolutional patch embedding (a stride-1 conv, GELU, then a Conv1d with
  kernel = stride = patch; the window is zero-padded on the right to a multiple of the patch),
  sinusoidal positions computed for the length at hand, a pre-norm nn.TransformerEncoder, mean
  pooling over the patches, LayerNorm and a linear head. The stride-1 conv lets each token see
  across its patch's edges; with the patch conv alone the model learned frequencies far slower.
- SeriesFusion: a SeriesCNN and a SeriesTransformer of the same in_chans/width/depth whose
  features are concatenated and classified by a small MLP.

`features(x) -> (N, feature_dim)` is what the head sees; `num_classes=0` builds a model without
a head whose forward returns the features (timm's convention), which is how SeriesFusion holds
its branches without unused parameters (DistributedDataParallel would refuse those).
The classifier is the last nn.Linear of each model, so common.models.replace_head works.
`set_grad_checkpointing()` (timm's switch) recomputes each residual block / encoder layer in
the backward pass instead of storing its activations. All three export to ONNX with either
exporter (TorchScript-based or torch.export-based).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .unet import run_block


def _check_args(name: str, num_classes: int, in_chans: int, width: int, depth: int, dropout: float) -> None:
    if num_classes < 0 or in_chans < 1 or width < 1 or depth < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} needs num_classes >= 0, in_chans, width and depth >= 1 and 0 <= dropout "
                         f"< 1, got num_classes={num_classes}, in_chans={in_chans}, width={width}, "
                         f"depth={depth}, dropout={dropout}")


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"expected a batch of windows (N, C={in_chans}, T), got shape {tuple(x.shape)}")


def _head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()


class ResidualBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a strided 1x1 conv-BN where the shape
    changes), then ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1):
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv1d(cin, cout, kernel_size, stride=stride, padding=pad, bias=False),
            nn.BatchNorm1d(cout), nn.ReLU(inplace=True),
            nn.Conv1d(cout, cout, kernel_size, padding=pad, bias=False), nn.BatchNorm1d(cout))
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False),
                                      nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SeriesCNN(nn.Module):
    """1-D residual CNN: (N, in_chans, T) -> (N, num_classes).

    Block i has min(width * 2**i, 4 * width) channels; blocks after the first halve the length.
    Features: global average and max pooling of the last block, concatenated (2x its channels).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64, depth: int = 2,
                 dropout: float = 0.1, kernel_size: int = 5):
        super().__init__()
        _check_args("SeriesCNN", num_classes, in_chans, width, depth, dropout)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SeriesCNN needs an odd kernel_size, got {kernel_size}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.grad_checkpointing = False
        self.stem = nn.Sequential(nn.Conv1d(in_chans, width, 7, padding=3, bias=False),
                                  nn.BatchNorm1d(width), nn.ReLU(inplace=True))
        blocks, cin = [], width
        for i in range(depth):
            cout = min(width * 2 ** i, 4 * width)
            blocks.append(ResidualBlock1d(cin, cout, kernel_size, stride=1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = 2 * cin
        self.drop = nn.Dropout(dropout)
        self.head = _head(self.feature_dim, num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = self.stem(x)
        for block in self.blocks:
            x = run_block(block, x, use_checkpoint=ckpt)
        return torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(length, dim) encoding of Vaswani et al.: sin and cos of pos / 10000^(2i/dim), interleaved."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    half = (dim + 1) // 2
    steps = torch.arange(half, device=device, dtype=torch.float32)
    inv_freq = torch.exp(steps * (-2.0 * math.log(1e4) / dim))
    angles = pos * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim].to(dtype)


class SeriesTransformer(nn.Module):
    """Patch embedding + sinusoidal positions + pre-norm transformer encoder: (N, in_chans, T)
    -> (N, num_classes). `heads` must divide `width`; T is padded to a multiple of `patch`."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64, depth: int = 2,
                 dropout: float = 0.1, heads: int = 4, patch: int = 4, kernel_size: int = 5):
        super().__init__()
        _check_args("SeriesTransformer", num_classes, in_chans, width, depth, dropout)
        if heads < 1 or width % heads or patch < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SeriesTransformer needs heads dividing width, patch >= 1 and an odd "
                             f"kernel_size, got width={width}, heads={heads}, patch={patch}, "
                             f"kernel_size={kernel_size}")
        self.num_classes, self.in_chans, self.patch = num_classes, in_chans, patch
        self.grad_checkpointing = False
        self.embed = nn.Sequential(nn.Conv1d(in_chans, width, kernel_size, padding=kernel_size // 2),
                                   nn.GELU(), nn.Conv1d(width, width, kernel_size=patch, stride=patch))
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=2 * width,
                                           dropout=dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.feature_dim = width
        self.drop = nn.Dropout(dropout)
        self.head = _head(width, num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder layer in backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> (N, ceil(T / patch), width): embedded patches plus their positions."""
        _check_input(x, self.in_chans)
        x = F.pad(x, (0, -x.shape[-1] % self.patch))  # unconditional: no branch on a traced size
        tokens = self.embed(x).transpose(1, 2)
        return tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device, tokens.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for layer in self.encoder.layers:
                x = checkpoint(layer, x, use_reentrant=False)
        else:
            x = self.encoder(x)
        return self.norm(x.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class SeriesFusion(nn.Module):
    """A SeriesCNN and a SeriesTransformer side by side: their features, concatenated, go
    through LayerNorm -> Linear(width) -> GELU -> dropout -> Linear(num_classes)."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64, depth: int = 2,
                 dropout: float = 0.1, heads: int = 4, patch: int = 4, kernel_size: int = 5):
        super().__init__()
        _check_args("SeriesFusion", num_classes, in_chans, width, depth, dropout)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.cnn = SeriesCNN(0, in_chans, width, depth, dropout, kernel_size=kernel_size)
        self.transformer = SeriesTransformer(0, in_chans, width, depth, dropout, heads=heads, patch=patch,
                                             kernel_size=kernel_size)
        self.feature_dim = self.cnn.feature_dim + self.transformer.feature_dim
        self.head: nn.Module = nn.Identity()
        if num_classes > 0:
            self.head = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, width),
                                      nn.GELU(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    @property
    def grad_checkpointing(self) -> bool:
        return self.cnn.grad_checkpointing

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in both branches."""
        self.cnn.set_grad_checkpointing(enable)
        self.transformer.set_grad_checkpointing(enable)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cnn.features(x), self.transformer.features(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
