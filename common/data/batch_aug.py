"""Whole-batch image augmentation on the device, with per-sample random parameters.

For the data path that keeps the decoded data set as one uint8 tensor (N, C, S, S) on the GPU
(or in RAM) and draws batches by index: this replaces, per batch, what the torchvision transforms
of `images.py` do per sample.

Why hand-written: torchvision's v2 transforms draw ONE set of random parameters per call, so a
batch given to them gets the same crop, flip, angle and colour factors for every image; per-sample
parameters would need a Python loop over the batch (a handful of small kernels per image). Here
every random quantity is a length-N tensor, the geometry of each sample (crop box, flips,
rotation) is composed into one 2x3 affine matrix, and the whole batch is resampled with one
`F.affine_grid` + one `F.grid_sample`; the exact-pixel kinds (cifar, flip, eval) index with
`gather`/slicing. No value is ever read back to the host (no .item(), bool(tensor), nonzero,
masked_select), so the training loop never waits for the GPU.

Kinds (`KINDS`):
- "standard": random resized crop + flips + rotation, bilinear (masks: nearest), then colour
  jitter (brightness, contrast, saturation in that FIXED order; torchvision's ColorJitter
  randomises the order per image), then normalise. Like `images.train_transform`.
- "cifar": zero-padded random crop with integer offsets and a horizontal flip, exact pixels.
- "light": centre crop + small rotation (`images.light_transform`).
- "flip": horizontal/vertical flips only, image and mask together (segmentation); the size is
  kept when out_size is None (non-square works), else a centre crop of out_size is flipped.
- "eval": centre crop as torchvision's CenterCrop, no randomness (`images.eval_transform`).

Differences from the per-sample PIL pipeline, by design: the crop is sampled and resized in
one bilinear step from the stored image (no antialias when shrinking; the box is continuous, not
whole pixels, and pixels next to it may contribute at its border); a box that does not fit is
clamped instead of re-drawn; rotation is bilinear with a hard edge (fill 0) where torchvision's
RandomRotation uses nearest.

Randomness comes only from torch.rand/randint(..., generator=generator, device=images.device):
the generator must live on the images' device; the same seed gives the same output.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("standard", "cifar", "light", "flip", "eval")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class AugmentParams:
    """Per-sample parameters; every field is a tensor of length N on the images' device.

    cx, cy, w, h: crop box centre and size as fractions of the source width/height (standard;
    light and eval always take the centre crop). angle: degrees, counter-clockwise for positive
    values like torchvision's rotate. hflip, vflip: bool. brightness, contrast, saturation:
    colour factors, 1 = unchanged (standard, only when jitter > 0). offset_x, offset_y: int64
    crop offsets into the zero-padded image, in [0, 2 * padding] (cifar; padding = no shift).
    """

    cx: Tensor
    cy: Tensor
    w: Tensor
    h: Tensor
    angle: Tensor
    hflip: Tensor
    vflip: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    offset_x: Tensor
    offset_y: Tensor

    def __len__(self) -> int:
        return self.angle.shape[0]


class BatchAugment:
    """Augment a uint8 batch (N, C, H, W) into a normalised float32 batch, per-sample random."""

    def __init__(self, out_size: int | None, mean: Sequence[float], std: Sequence[float], *,
                 kind: str = "standard", hflip: bool = True, vflip: bool = False,
                 rotation: float = 15.0, jitter: float = 0.2, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), padding: int = 4):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have the same length, std > 0")
        self.out_size, self.kind = out_size, kind
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.hflip, self.vflip = hflip, vflip
        self.rotation, self.jitter = float(rotation), float(jitter)
        self.scale, self.ratio, self.padding = scale, ratio, int(padding)
        self._consts: dict[tuple[torch.device, int, float], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (f"BatchAugment(out_size={self.out_size}, kind={self.kind!r}, hflip={self.hflip}, "
                f"vflip={self.vflip}, rotation={self.rotation}, jitter={self.jitter}, "
                f"scale={self.scale}, ratio={self.ratio}, padding={self.padding})")

    # ------------------------------------------------------------------ parameters
    def identity(self, n: int, device: torch.device) -> AugmentParams:
        """Parameters that change nothing (full box, no flip, angle 0, factors 1, no shift)."""
        def full(value: float) -> Tensor:
            return torch.full((n,), value, dtype=torch.float32, device=device)
        no = torch.zeros(n, dtype=torch.bool, device=device)
        pad = torch.full((n,), self.padding, dtype=torch.int64, device=device)
        return AugmentParams(full(0.5), full(0.5), full(1.0), full(1.0), full(0.0), no, no.clone(),
                             full(1.0), full(1.0), full(1.0), pad, pad.clone())

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device,
               size: tuple[int, int] | None = None) -> AugmentParams:
        """Independent random parameters for n samples, drawn on `device` with `generator`
        (which must live on that device). `size` (H, W) of the source only matters for the
        aspect ratio of the standard crop box; default: a square source."""
        device = torch.device(device)
        p = self.identity(n, device)
        u = torch.rand(n, 10, generator=generator, device=device)
        k = self.kind
        if k == "standard":
            p.cx, p.cy, p.w, p.h = _crop_box(u[:, :4], self.scale, self.ratio, size)
        if k in ("standard", "light") and self.rotation:
            p.angle = self.rotation * (2 * u[:, 4] - 1)
        if k in ("standard", "cifar", "flip"):
            p.hflip = (u[:, 5] < 0.5) & self.hflip
            p.vflip = (u[:, 6] < 0.5) & self.vflip
        if k == "standard" and self.jitter > 0:
            p.brightness, p.contrast, p.saturation = (
                (1 + self.jitter * (2 * u[:, i] - 1)).clamp_min(0) for i in (7, 8, 9))
        if k == "cifar":
            offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator, device=device)
            p.offset_x, p.offset_y = offsets[0], offsets[1]
        return p

    # ------------------------------------------------------------------ application
    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 masks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        params = None
        if self.kind != "eval":
            params = self.sample(images.shape[0], generator, images.device, tuple(images.shape[-2:]))
        return self.apply(images, params, masks)

    def apply(self, images: Tensor, params: AugmentParams | None,
              masks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Images uint8 (N, C, H, W) -> float32 (N, C, out, out) normalised; with masks (N, H, W)
        integer class indices, also the masks (int64) under the same geometry (0 outside)."""
        _check(images, masks, self.mean)
        n = images.shape[0]
        if params is None:
            params = self.identity(n, images.device)
        elif len(params) != n:
            raise ValueError(f"params are for {len(params)} samples, the batch has {n}")
        out = self._out_hw(images)
        if self.kind in ("standard", "light"):
            x, m = self._affine(images, masks, params, out)
        elif self.kind == "eval":
            x = _centre_crop(images, out)
            m = None if masks is None else _centre_crop(masks, out).to(torch.int64, copy=True)
        else:
            x, m = self._indexed(images, masks, params, out)
        if self.kind == "standard" and self.jitter > 0:
            x = _jitter(x, params.brightness, params.contrast, params.saturation)
            x = self._normalise(x, 1.0)
        else:
            x = self._normalise(x, 255.0)
        return x if masks is None else (x, m.long())

    def _out_hw(self, images: Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        if self.out_size is None:
            if self.kind in ("standard", "light") and h != w:
                raise ValueError(f"kind {self.kind!r} rotates a square output: pass out_size for "
                                 f"{h}x{w} images")
            return h, w
        out = int(self.out_size)
        if self.kind != "standard" and (out > h or out > w):
            raise ValueError(f"kind {self.kind!r} crops {out}x{out} out of {h}x{w} images: too small")
        return out, out

    def _affine(self, images: Tensor, masks: Tensor | None, p: AugmentParams,
                out: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Crop box, flips and rotation as one matrix per sample; one grid, one resampling."""
        n, c, h, w = images.shape
        if self.kind == "light":  # the centre crop, as a box
            top, left = _centre_offsets((h, w), out)
            full = images.new_ones(n, dtype=torch.float32)
            cx, cy = full * ((left + out[1] / 2) / w), full * ((top + out[0] / 2) / h)
            bw, bh = full * (out[1] / w), full * (out[0] / h)
            hflip = vflip = torch.zeros(n, dtype=torch.bool, device=images.device)
        else:
            cx, cy, bw, bh, hflip, vflip = p.cx, p.cy, p.w, p.h, p.hflip, p.vflip
        theta = _theta(cx, cy, bw, bh, p.angle, hflip, vflip)
        grid = F.affine_grid(theta, [n, c, out[0], out[1]], align_corners=False)
        # Border padding keeps upscaled crops exact at the source edge; what the rotation brings
        # in from outside the crop box is set to 0 (RandomRotation's fill) with `inside`.
        inside = _inside_box(grid, 2 * cx - 1, 2 * cy - 1, bw, bh)
        x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        x.mul_(inside[:, None])
        if masks is None:
            return x, None
        m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="border",
                          align_corners=False)[:, 0]
        return x, m * inside

    def _indexed(self, images: Tensor, masks: Tensor | None, p: AugmentParams,
                 out: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """cifar (zero-padded random crop) and flip (centre crop + flips) by exact gathering."""
        if self.kind == "cifar":
            pad = (self.padding,) * 4
            images = F.pad(images, pad)
            masks = None if masks is None else F.pad(masks, pad)
            top, left = p.offset_y[:, None], p.offset_x[:, None]
        else:
            top, left = _centre_offsets(tuple(images.shape[-2:]), out)
        rows = _indices(top, out[0], p.vflip, images.device)
        cols = _indices(left, out[1], p.hflip, images.device)
        x = _gather(images, rows, cols)
        m = None if masks is None else _gather(masks[:, None], rows, cols)[:, 0]
        return x, m

    def _normalise(self, x: Tensor, divisor: float) -> Tensor:
        """(x / divisor - mean) / std as one multiply-add with per-channel constants cached per
        device (no host-to-device copy per batch)."""
        c = x.shape[1]
        key = (x.device, c, divisor)
        if key not in self._consts:
            mean = torch.tensor(self.mean, dtype=torch.float32).expand(c)  # 1 value or C
            std = torch.tensor(self.std, dtype=torch.float32).expand(c)
            scale, shift = 1 / (divisor * std), -mean / std
            self._consts[key] = (scale.view(1, c, 1, 1).to(x.device), shift.view(1, c, 1, 1).to(x.device))
        scale, shift = self._consts[key]
        return torch.addcmul(shift, x.float(), scale)


# ---------------------------------------------------------------------- helpers
def _check(images: Tensor, masks: Tensor | None, mean: Sequence[float]) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(mean) not in (1, images.shape[1]):
        raise ValueError(f"{len(mean)} mean/std values for {images.shape[1]}-channel images")
    if masks is not None and (masks.dim() != 3 or masks.shape != images.shape[:1] + images.shape[2:]
                              or masks.is_floating_point()):
        raise TypeError(f"masks must be integer (N, H, W) matching images {tuple(images.shape)}, "
                        f"got {masks.dtype} {tuple(masks.shape)}")


def _crop_box(u: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
              size: tuple[int, int] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RandomResizedCrop's box from 4 uniform columns: area fraction uniform in `scale`, aspect
    ratio (width/height in pixels) log-uniform in `ratio`, clamped to fit, random position."""
    aspect = 1.0 if size is None else size[0] / size[1]  # H / W of the source
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * r * aspect).clamp(max=1.0)
    h = torch.sqrt(area / (r * aspect)).clamp(max=1.0)
    cx = w / 2 + (1 - w) * u[:, 2]
    cy = h / 2 + (1 - h) * u[:, 3]
    return cx, cy, w, h


def _theta(cx: Tensor, cy: Tensor, w: Tensor, h: Tensor, angle: Tensor, hflip: Tensor,
           vflip: Tensor) -> Tensor:
    """(N, 2, 3) matrices from output to source coordinates (normalised, align_corners=False):
    source = crop(flip(rotate^-1(output))), the inverse of torchvision's crop -> flip -> rotate.
    Positive angles turn the content counter-clockwise on screen (y points down)."""
    rad = angle * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    fx = 1 - 2 * hflip.to(cos.dtype)
    fy = 1 - 2 * vflip.to(cos.dtype)
    row0 = torch.stack([w * fx * cos, -w * fx * sin, 2 * cx - 1], dim=1)
    row1 = torch.stack([h * fy * sin, h * fy * cos, 2 * cy - 1], dim=1)
    return torch.stack([row0, row1], dim=1)


def _inside_box(grid: Tensor, tx: Tensor, ty: Tensor, w: Tensor, h: Tensor) -> Tensor:
    """1.0 where a sampling point lies inside the crop box (centre tx, ty, half-size w, h in
    normalised coordinates), else 0.0; shape (N, Ho, Wo)."""
    centre = torch.stack([tx, ty], dim=1)[:, None, None]
    half = torch.stack([w, h], dim=1)[:, None, None]
    return ((grid - centre).abs_() <= half).all(dim=-1).to(grid.dtype)


def _centre_offsets(size: tuple[int, int], out: tuple[int, int]) -> tuple[int, int]:
    """(top, left) exactly as torchvision's CenterCrop: int(round((H - out) / 2))."""
    return int(round((size[0] - out[0]) / 2.0)), int(round((size[1] - out[1]) / 2.0))


def _centre_crop(x: Tensor, out: tuple[int, int]) -> Tensor:
    top, left = _centre_offsets(tuple(x.shape[-2:]), out)
    return x[..., top:top + out[0], left:left + out[1]]


def _indices(start: Tensor | int, size: int, flip: Tensor, device: torch.device) -> Tensor:
    """(N, size) source indices start .. start + size - 1, reversed where flip."""
    ar = torch.arange(size, device=device)
    return torch.where(flip[:, None], start + (size - 1 - ar), start + ar)


def _gather(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x (N, C, H, W) -> (N, C, len(rows[i]), len(cols[i])) with per-sample row/column indices."""
    n, c, _, width = x.shape
    ho, wo = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, ho, width))
    return x.gather(3, cols[:, None, None, :].expand(n, c, ho, wo))


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def _jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """torchvision's adjust_brightness, adjust_contrast, adjust_saturation with per-sample
    factors, in this fixed order (ColorJitter shuffles the order). x: float in [0, 255]
    (overwritten); returns [0, 1]."""
    def blend(img: Tensor, other: Tensor, factor: Tensor) -> Tensor:
        """factor * img + (1 - factor) * other, clamped to [0, 1], in place."""
        factor = factor.view(-1, 1, 1, 1)
        return torch.addcmul(other * (1 - factor), img, factor, out=img).clamp_(0, 1)

    x = x.mul_(brightness.view(-1, 1, 1, 1) * (1 / 255)).clamp_(0, 1)
    x = blend(x, _grayscale(x.mean(dim=(2, 3), keepdim=True)), contrast)  # mean of the grayscale
    if x.shape[1] == 3:  # torchvision leaves 1-channel images unchanged
        x = blend(x, _grayscale(x), saturation)
    return x
