"""U-Net for semantic segmentation (Ronneberger et al. 2015), as in the popular Pytorch-UNet.

Four downsampling steps (max pool + two 3x3 conv-BN-ReLU), four upsampling steps (bilinear
upsampling, or a transposed convolution) that concatenate the encoder's feature map of the
same scale, and a 1x1 convolution to `num_classes` logits at the input's resolution. Inputs
of any size of at least 16 pixels per side work (MIN_SIZE: four 2x2 poolings leave one pixel), at any
batch size, 1 included: odd sizes are padded back to the skip's size.

The module names (inc, down1..4, up1..4, outc, double_conv, maxpool_conv) are those of
Pytorch-UNet, so its state_dicts load with train_unet.py -f, and run in predict.py, validate.py,
export_onnx.py and test_model.py (common/inference.py reads the U-Net's shape from the tensors).

`set_grad_checkpointing()` (timm's switch) recomputes every block (inc, each down and up block
whole: pooling, upsampling and concatenation included) in the backward pass instead of keeping
its activations: less memory, about a third more compute. Batch-norm
running statistics are updated once per step either way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError

MIN_SIZE = 16  # four 2x2 poolings


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same state_dict) that also trains on one value per channel: batch 1 at a
    1x1 map, the bottleneck of an input side of 16-31 pixels. Batch statistics do not exist
    there (nn.BatchNorm2d raises "Expected more than 1 value per channel"), so such a batch is
    normalised with the running statistics, which it leaves as they are. The test is on the shape
    only: no host synchronisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


class DoubleConv(nn.Module):
    """(3x3 conv -> batch norm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Halve the resolution with a 2x2 max pool, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Double the resolution, pad to the skip's size, concatenate it, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False):
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        diff_y = skip.size(2) - x.size(2)
        diff_x = skip.size(3) - x.size(3)
        x = F.pad(x, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@contextlib.contextmanager
def _frozen_running_stats(block: nn.Module) -> Iterator[None]:
    """During the recomputation in backward, batch norm normalises with the batch statistics
    as in the forward pass but leaves the running statistics alone (they were updated then)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def run_block(block: nn.Module, *inputs: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """block(*inputs); with use_checkpoint, only the inputs are kept and everything inside the
    block is recomputed in the backward pass."""
    if not use_checkpoint:
        return block(*inputs)
    if torch.compiler.is_compiling():  # the compiler recomputes without repeating the stat update
        return checkpoint(block, *inputs, use_reentrant=False)
    return checkpoint(block, *inputs, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _frozen_running_stats(block)))


class UNet(nn.Module):
    """U-Net: (N, in_chans, H, W) -> (N, num_classes, H, W) logits.

    num_classes=1 gives one foreground channel (sigmoid + BCE); otherwise one channel per
    class (softmax + cross entropy). bilinear=True upsamples with bilinear interpolation and
    halves the deepest block's width (fewer parameters), as in the original.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, bilinear: bool = False, base: int = 64):
        super().__init__()
        if num_classes < 1 or in_chans < 1 or base < 1:
            raise ValueError(f"UNet needs num_classes, in_chans and base >= 1, got "
                             f"{num_classes}, {in_chans}, {base}")
        self.num_classes = self.n_classes = num_classes
        self.in_chans = self.n_channels = in_chans
        self.bilinear = bilinear
        self.grad_checkpointing = False
        factor = 2 if bilinear else 1
        b = base
        self.inc = DoubleConv(in_chans, b)
        self.down1 = Down(b, 2 * b)
        self.down2 = Down(2 * b, 4 * b)
        self.down3 = Down(4 * b, 8 * b)
        self.down4 = Down(8 * b, 16 * b // factor)
        self.up1 = Up(16 * b, 8 * b // factor, bilinear)
        self.up2 = Up(8 * b, 4 * b // factor, bilinear)
        self.up3 = Up(4 * b, 2 * b // factor, bilinear)
        self.up4 = Up(2 * b, b, bilinear)
        self.outc = OutConv(b, num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations
        (training only; evaluation and inference are unaffected)."""
        self.grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and min(x.shape[-2:]) < MIN_SIZE:
            raise UserError(f"U-Net needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels (four "
                             f"2x2 poolings), got {tuple(x.shape[-2:])}; use a larger scale")
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        # Checkpointed, each whole block keeps only its inputs: the encoder's outputs x1..x5
        # (the skips, needed anyway) and each up block's output. The pooled maps, the upsampled
        # maps and the concatenations inside the blocks are recomputed in backward.
        x1 = run_block(self.inc, x, use_checkpoint=ckpt)
        x2 = run_block(self.down1, x1, use_checkpoint=ckpt)
        x3 = run_block(self.down2, x2, use_checkpoint=ckpt)
        x4 = run_block(self.down3, x3, use_checkpoint=ckpt)
        x5 = run_block(self.down4, x4, use_checkpoint=ckpt)
        x = run_block(self.up1, x5, x4, use_checkpoint=ckpt)
        x = run_block(self.up2, x, x3, use_checkpoint=ckpt)
        x = run_block(self.up3, x, x2, use_checkpoint=ckpt)
        x = run_block(self.up4, x, x1, use_checkpoint=ckpt)
        return self.outc(x)
