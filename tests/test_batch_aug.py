"""common/data/batch_aug.py: whole-batch augmentation with per-sample parameters (CPU, tiny)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from common.data.batch_aug import KINDS, BatchAugment

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(n: int = 4, c: int = 3, h: int = 9, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w or h), generator=g, dtype=torch.uint8)


def normalised(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def marked(h: int, w: int, r: int, c: int, n: int = 2) -> torch.Tensor:
    x = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    x[:, :, r, c] = 255
    return x


def argmax_2d(y: torch.Tensor) -> tuple[int, int]:
    idx = int(y.flatten().argmax())
    return divmod(idx, y.shape[-1])


# ---------------------------------------------------------------- per-sample parameters


@pytest.mark.parametrize("kind", ["standard", "light"])
def test_sampled_parameters_differ_between_samples(kind):
    n = 16
    p = BatchAugment(8, MEAN, STD, kind=kind).sample(n, gen(0), CPU)
    assert len(p) == n
    assert p.angle.unique().numel() == n
    if kind == "standard":
        for values in (p.brightness, p.contrast, p.saturation):
            assert values.unique().numel() == n
        assert 0 < p.hflip.sum() < n
        # boxes that always fit (no clamping): every coordinate is drawn per sample
        p = BatchAugment(8, MEAN, STD, scale=(0.3, 0.5)).sample(n, gen(0), CPU)
        for values in (p.cx, p.cy, p.w, p.h):
            assert values.unique().numel() == n


def test_crop_boxes_follow_scale_and_ratio_and_fit():
    p = BatchAugment(8, MEAN, STD, scale=(0.3, 0.5), ratio=(3 / 4, 4 / 3)).sample(2000, gen(0), CPU)
    area, ratio = p.w * p.h, p.w / p.h
    assert 0.3 - 1e-5 <= float(area.min()) < 0.31 and 0.49 < float(area.max()) <= 0.5 + 1e-5
    assert 0.75 - 1e-5 <= float(ratio.min()) < 0.77 and 1.31 < float(ratio.max()) <= 4 / 3 + 1e-5
    assert (p.cx - p.w / 2 >= -1e-6).all() and (p.cx + p.w / 2 <= 1 + 1e-6).all()
    assert (p.cy - p.h / 2 >= -1e-6).all() and (p.cy + p.h / 2 <= 1 + 1e-6).all()
    assert float((p.cx - p.w / 2).min()) < 0.01 and float((p.cx + p.w / 2).max()) > 0.99
    # the standard scale: a box larger than the source is clamped to it
    p = BatchAugment(8, MEAN, STD).sample(2000, gen(0), CPU)
    assert (p.w <= 1).all() and (p.h <= 1).all() and (p.w == 1).any()
    assert ((p.w * p.h >= 0.6 - 1e-5) | (p.w == 1) | (p.h == 1)).all()


@pytest.mark.parametrize("kind", ["standard", "light", "cifar"])
def test_copies_of_one_image_come_out_different(kind):
    n = 8
    x = images(1, h=12).expand(n, -1, -1, -1).contiguous()
    out = BatchAugment(None if kind == "cifar" else 10, MEAN, STD, kind=kind)(x, gen(1))
    for i, j in itertools.combinations(range(n), 2):
        assert not torch.allclose(out[i], out[j], atol=1e-3), (i, j)


def test_flip_kind_draws_flips_per_sample():
    n = 64
    p = BatchAugment(None, (0.0,), (1.0,), kind="flip", vflip=True).sample(n, gen(2), CPU)
    assert 10 < p.hflip.sum() < n - 10 and 10 < p.vflip.sum() < n - 10
    assert (p.hflip != p.vflip).any()


# ---------------------------------------------------------------- identity and centre crop


@pytest.mark.parametrize("kind", ["standard", "light", "flip"])
def test_identity_params_reproduce_the_input(kind):
    x = images(3, h=9)
    aug = BatchAugment(9, MEAN, STD, kind=kind)
    out = aug.apply(x, aug.identity(3, CPU))
    assert out.dtype == torch.float32 and out.shape == (3, 3, 9, 9)
    torch.testing.assert_close(out, normalised(x), atol=1e-5, rtol=0)
    masks = torch.randint(0, 7, (3, 9, 9))
    _, m = aug.apply(x, aug.identity(3, CPU), masks)
    assert m.dtype == torch.int64 and torch.equal(m, masks)


def test_cifar_identity_offsets_reproduce_the_input():
    x = images(3, h=8)
    aug = BatchAugment(None, MEAN, STD, kind="cifar")
    torch.testing.assert_close(aug.apply(x, aug.identity(3, CPU)), normalised(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("size", "out"), [(13, 8), (11, 8), (15, 8), (14, 8), (12, 7), (8, 8)])
def test_eval_is_torchvision_centre_crop(size, out):
    x = images(2, h=size)
    masks = torch.randint(0, 5, (2, size, size), dtype=torch.uint8)
    result, m = BatchAugment(out, MEAN, STD, kind="eval")(x, masks=masks)
    expected = normalised(TF.center_crop(x, [out, out]))
    assert result.shape == (2, 3, out, out)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)
    assert m.dtype == torch.int64 and torch.equal(m, TF.center_crop(masks, [out, out]).long())


def test_light_identity_is_the_centre_crop():
    x = images(2, h=13)
    aug = BatchAugment(8, MEAN, STD, kind="light", rotation=10)
    expected = normalised(TF.center_crop(x, [8, 8]))
    torch.testing.assert_close(aug.apply(x, aug.identity(2, CPU)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flip", "eval"])
def test_non_square_size_is_kept_without_out_size(kind):
    x = images(2, h=5, w=7)
    masks = torch.randint(0, 3, (2, 5, 7))
    aug = BatchAugment(None, (0.0,), (1.0,), kind=kind)
    out, m = aug.apply(x, None, masks)
    assert out.shape == (2, 3, 5, 7) and m.shape == (2, 5, 7)
    torch.testing.assert_close(out, x.float() / 255, atol=1e-6, rtol=0)
    assert torch.equal(m, masks)
    out, m = aug(x, gen(0), masks)
    assert out.shape == (2, 3, 5, 7) and m.shape == (2, 5, 7)


# ---------------------------------------------------------------- flips and rotation


@pytest.mark.parametrize("kind", ["standard", "flip", "cifar"])
def test_horizontal_flip_mirrors_columns(kind):
    h = w = 7
    r, c = 2, 1
    aug = BatchAugment(None if kind != "standard" else w, (0.0,), (1.0,), kind=kind, jitter=0)
    p = aug.identity(2, CPU)
    p.hflip[0] = True
    out = aug.apply(marked(h, w, r, c), p)
    assert argmax_2d(out[0, 0]) == (r, w - 1 - c)
    assert argmax_2d(out[1, 0]) == (r, c)  # the other sample is not flipped


@pytest.mark.parametrize("kind", ["standard", "flip"])
def test_vertical_flip_mirrors_rows(kind):
    h, w = 7, 7 if kind == "standard" else 6
    r, c = 1, 4
    aug = BatchAugment(None, (0.0,), (1.0,), kind=kind, vflip=True, jitter=0)
    p = aug.identity(2, CPU)
    p.vflip[1] = True
    x = marked(h, w, r, c)
    masks = x[:, 0].long()
    out, m = aug.apply(x, p, masks)
    assert argmax_2d(out[1, 0]) == (h - 1 - r, c) and argmax_2d(out[0, 0]) == (r, c)
    assert argmax_2d(m[1]) == (h - 1 - r, c) and argmax_2d(m[0]) == (r, c)


def test_rotation_by_90_degrees_is_counter_clockwise_like_torchvision():
    size = 7
    x = images(1, c=1, h=size)
    aug = BatchAugment(size, (0.0,), (1.0,), jitter=0)
    p = aug.identity(1, CPU)
    p.angle[0] = 90.0
    out = aug.apply(x, p)
    expected = TF.rotate(x, 90.0, InterpolationMode.NEAREST).float() / 255
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    r, c = 1, 5  # near the top-right corner -> near the top-left corner
    moved = aug.apply(marked(size, size, r, c, n=1), p)
    assert argmax_2d(moved[0, 0]) == (size - 1 - c, r)


def test_rotated_mask_matches_torchvision_nearest_with_zero_fill():
    size = 15
    masks = torch.randint(1, 5, (2, size, size), generator=gen(3))
    aug = BatchAugment(size, (0.0,), (1.0,), jitter=0)
    p = aug.identity(2, CPU)
    p.angle[0], p.angle[1] = 37.0, -23.0
    _, m = aug.apply(torch.zeros(2, 1, size, size, dtype=torch.uint8), p, masks)
    for i, angle in enumerate((37.0, -23.0)):
        expected = TF.rotate(masks[i:i + 1, None], angle, InterpolationMode.NEAREST, fill=0)[0, 0]
        assert (m[i] != expected).float().mean() < 0.02
        assert (m[i] == 0).sum() > 10  # the corners brought in from outside are 0


def test_crop_box_of_the_left_half_rescales_the_left_half():
    s = 8
    x = images(1, h=s)
    aug = BatchAugment(s, MEAN, STD, jitter=0)
    p = aug.identity(1, CPU)
    p.cx[0], p.w[0] = 0.25, 0.5
    half = x[..., : s // 2].float()
    expected = normalised(F.interpolate(half, size=(s, s), mode="bilinear", align_corners=False,
                                        antialias=False) * 1.0)
    out = aug.apply(x, p)
    # the last column samples at 3.25 px of the full image, between its columns 3 and 4: the
    # box lives in the stored image, so the pixel next to it contributes (a crop would clamp)
    torch.testing.assert_close(out[..., :-1], expected[..., :-1], atol=1e-4, rtol=0)
    x[..., s // 2] = x[..., s // 2 - 1]  # with column 4 = column 3 every pixel agrees
    torch.testing.assert_close(aug.apply(x, p), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- masks


def test_masks_keep_their_values_through_a_random_transform():
    x = images(6, h=16)
    masks = torch.randint(3, 9, (6, 16, 16), generator=gen(4))
    masks[:, :4] = 5
    out, m = BatchAugment(12, MEAN, STD, rotation=40)(x, gen(5), masks.to(torch.uint8))
    assert out.shape == (6, 3, 12, 12) and m.shape == (6, 12, 12) and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= set(masks.unique().tolist()) | {0}
    assert (m == 0).any()  # rotation corners


def test_masks_stay_aligned_with_the_image():
    """Binary image = mask: where bilinear gives exactly 0 or 1, every contributing source
    pixel agrees, so the nearest-sampled mask must agree too."""
    g = gen(6)
    masks = (torch.rand(8, 20, 20, generator=g) < 0.5).long()
    masks[:, 5:15, 5:15] = 1
    x = (masks[:, None] * 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    aug = BatchAugment(16, (0.0,), (1.0,), rotation=30, jitter=0, vflip=True)
    out, m = aug(x, gen(7), masks)
    decided_one, decided_zero = out[:, 0] > 1 - 1e-4, out[:, 0] < 1e-4
    assert (m[decided_one] == 1).all() and (m[decided_zero] == 0).all()
    assert (decided_one | decided_zero).float().mean() > 0.3
    assert decided_one.any() and decided_zero.any()


# ---------------------------------------------------------------- cifar


def test_cifar_crop_equals_hand_computed_padded_crop():
    x = images(3, h=8)
    masks = torch.randint(1, 4, (3, 8, 8))
    aug = BatchAugment(None, MEAN, STD, kind="cifar", padding=4)
    p = aug.identity(3, CPU)
    p.offset_x = torch.tensor([0, 3, 8])
    p.offset_y = torch.tensor([8, 5, 0])
    p.hflip = torch.tensor([False, True, False])
    out, m = aug.apply(x, p, masks)
    padded, padded_m = F.pad(x, (4, 4, 4, 4)), F.pad(masks, (4, 4, 4, 4))
    for i in range(3):
        oy, ox = int(p.offset_y[i]), int(p.offset_x[i])
        crop, crop_m = padded[i:i + 1, :, oy:oy + 8, ox:ox + 8], padded_m[i, oy:oy + 8, ox:ox + 8]
        if p.hflip[i]:
            crop, crop_m = crop.flip(-1), crop_m.flip(-1)
        torch.testing.assert_close(out[i:i + 1], normalised(crop), atol=1e-6, rtol=0)
        assert torch.equal(m[i], crop_m)


def test_cifar_offsets_cover_the_full_range():
    p = BatchAugment(None, MEAN, STD, kind="cifar", padding=4).sample(2000, gen(8), CPU)
    assert p.offset_x.dtype == torch.int64
    assert torch.equal(p.offset_x.unique(), torch.arange(9))
    assert torch.equal(p.offset_y.unique(), torch.arange(9))
    assert (p.offset_x != p.offset_y).any()


# ---------------------------------------------------------------- colour jitter


def colour_case(field: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = images(2, h=6)
    aug = BatchAugment(6, (0.0,), (1.0,), jitter=0.2)
    p = aug.identity(2, CPU)
    getattr(p, field)[0] = value
    out = aug.apply(x, p)
    torch.testing.assert_close(out[1], x[1].float() / 255, atol=1e-5, rtol=0)  # sample 1 untouched
    return x[:1].float() / 255, out[:1]


def test_brightness_half_halves_the_values():
    x, out = colour_case("brightness", 0.5)
    torch.testing.assert_close(out, x * 0.5, atol=1e-5, rtol=0)


def test_saturation_zero_gives_the_grayscale_image():
    x, out = colour_case("saturation", 0.0)
    gray = TF.rgb_to_grayscale(x)
    for ch in range(3):
        torch.testing.assert_close(out[:, ch:ch + 1], gray, atol=1e-5, rtol=0)


def test_contrast_zero_gives_the_mean_everywhere():
    x, out = colour_case("contrast", 0.0)
    mean = TF.rgb_to_grayscale(x).mean()
    torch.testing.assert_close(out, torch.full_like(out, float(mean)), atol=1e-5, rtol=0)


def test_jitter_matches_torchvision_functional():
    x, out = colour_case("contrast", 1.3)
    torch.testing.assert_close(out, TF.adjust_contrast(x, 1.3), atol=1e-5, rtol=0)
    x, out = colour_case("saturation", 1.6)
    torch.testing.assert_close(out, TF.adjust_saturation(x, 1.6), atol=1e-5, rtol=0)


def test_jitter_zero_draws_no_colour_change():
    p = BatchAugment(8, MEAN, STD, jitter=0).sample(32, gen(9), CPU)
    for values in (p.brightness, p.contrast, p.saturation):
        assert (values == 1).all()
    p = BatchAugment(8, MEAN, STD, jitter=0.2).sample(200, gen(9), CPU)
    assert 0.8 <= float(p.brightness.min()) < 0.82 and 1.18 < float(p.brightness.max()) <= 1.2


# ---------------------------------------------------------------- determinism, grayscale, flags


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "eval"])
def test_same_seed_same_output_different_seed_different_output(kind):
    x = images(4, h=10)
    masks = torch.randint(0, 4, (4, 10, 10))
    aug = BatchAugment(None if kind in ("cifar", "flip") else 8, MEAN, STD, kind=kind, vflip=True)
    a, ma = aug(x, gen(10), masks)
    b, mb = aug(x, gen(10), masks)
    c, _ = aug(x, gen(11), masks)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)


def test_grayscale_input_works():
    x = images(4, c=1, h=10)
    for kind in KINDS:
        aug = BatchAugment(None if kind in ("cifar", "flip") else 8, (0.5,), (0.25,), kind=kind)
        out = aug(x, gen(12))
        side = 10 if kind in ("cifar", "flip") else 8
        assert out.shape == (4, 1, side, side)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    aug = BatchAugment(10, (0.5,), (0.25,))
    torch.testing.assert_close(aug.apply(x, aug.identity(4, CPU)), normalised(x, (0.5,), (0.25,)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["standard", "cifar", "flip", "light"])
def test_hflip_false_never_flips(kind):
    p = BatchAugment(8, MEAN, STD, kind=kind, hflip=False).sample(1000, gen(13), CPU)
    assert not p.hflip.any() and not p.vflip.any()
    if kind != "light":  # light never flips
        flipped = BatchAugment(8, MEAN, STD, kind=kind).sample(1000, gen(13), CPU).hflip.float().mean()
        assert 0.4 < float(flipped) < 0.6


def test_bad_inputs_are_refused():
    aug = BatchAugment(8, MEAN, STD)
    with pytest.raises(TypeError):
        aug(images(2, h=10).float(), gen(0))
    with pytest.raises(TypeError):
        aug(images(2, h=10), gen(0), torch.zeros(2, 10, 10))
    with pytest.raises(ValueError):
        BatchAugment(8, MEAN, STD, kind="mixup")
    with pytest.raises(ValueError):
        BatchAugment(12, MEAN, STD, kind="eval")(images(2, h=10))
    with pytest.raises(ValueError):
        aug.apply(images(2, h=10), aug.identity(3, CPU))


@pytest.mark.parametrize("kind", KINDS)
def test_no_value_is_read_on_the_host(kind):
    """On the meta device a tensor has no values: .item(), bool(tensor), nonzero or
    masked_select raise, so passing here means the GPU path never waits for the device."""
    meta = torch.device("meta")
    x = torch.empty(4, 3, 12, 12, dtype=torch.uint8, device=meta)
    masks = torch.empty(4, 12, 12, dtype=torch.int64, device=meta)
    aug = BatchAugment(None if kind in ("cifar", "flip") else 8, MEAN, STD, kind=kind, vflip=True)
    out, m = aug(x, None, masks)
    side = 12 if kind in ("cifar", "flip") else 8
    assert out.shape == (4, 3, side, side) and out.dtype == torch.float32 and out.device == meta
    assert m.shape == (4, side, side) and m.dtype == torch.int64
