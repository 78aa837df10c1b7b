"""The decode-once data cache: decoding equals PIL/load_rgb, fit_square equals torchvision's
Resize + CenterCrop, cache files are reused / rebuilt / written atomically, segmentation pairs
match SegmentationDataset, and the placement decisions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from common.data import cache as cache_mod
from common.data.cache import (
    ImageCache,
    build_array_cache,
    build_image_cache,
    build_pair_cache,
    choose_placement,
    decode_rgb_uint8,
    estimate_bytes,
    fit_square,
    place,
)
from common.data.images import load_rgb, to_rgb
from common.data.segmentation import SegmentationDataset
from common.errors import UserError

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _noise(seed: int, h: int, w: int, c: int = 3) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    return arr[..., 0] if c == 1 else arr


def _hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def _folder(root: Path, n: int = 6, size: int = 24) -> list[tuple[str, int]]:
    """n noise PNGs of size x size, labels 0, 0, 1, 1, 2, 2, ..."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        path = root / f"img_{i}.png"
        Image.fromarray(_noise(i, size, size)).save(path)
        samples.append((str(path), i // 2))
    return samples


# ------------------------------------------------------------------ decoding


def test_rgb_png_decodes_to_exactly_the_pil_pixels(tmp_path):
    for i, (h, w) in enumerate([(20, 30), (17, 9)]):
        path = tmp_path / f"rgb_{i}.png"
        Image.fromarray(_noise(i, h, w)).save(path)
        out = decode_rgb_uint8(str(path))
        assert tuple(out.shape) == (3, h, w)
        np.testing.assert_array_equal(_hwc(out), np.asarray(Image.open(path)))


def test_jpeg_decodes_close_to_pil(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_noise(3, 40, 56)).save(path, quality=90)
    out = _hwc(decode_rgb_uint8(str(path))).astype(int)
    ref = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert out.shape == ref.shape == (40, 56, 3)
    assert np.abs(out - ref).max() <= 3 and np.abs(out - ref).mean() < 0.5


def _mode_images(tmp_path: Path) -> dict[str, Path]:
    rgb = _noise(7, 20, 30)
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = tmp_path / name
        img.save(files[name], **kw)

    save("sixteen.png", Image.fromarray(np.random.default_rng(1).integers(0, 65536, (20, 30), np.uint16)))
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=200)  # 8-bit indices
    save("palette_trns.png", palette, transparency=3)
    save("rgb_trns.png", Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[0, 0]))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("gray.png", Image.fromarray(rgb[..., 0], "L"))
    save("rgba.png", Image.fromarray(_noise(8, 20, 30, 4), "RGBA"))
    save("gray_alpha.png", Image.fromarray(_noise(9, 20, 30, 2), "LA"))
    save("bilevel.png", Image.fromarray(rgb[..., 0] > 128))
    save("rgb.bmp", Image.fromarray(rgb))
    save("rgb.tif", Image.fromarray(rgb))
    save("palette.gif", palette)
    save("rgb.webp", Image.fromarray(rgb), lossless=True)
    return files


@pytest.mark.parametrize("name", ["sixteen.png", "palette_trns.png", "rgb_trns.png", "cmyk.jpg",
                                  "gray.png", "rgba.png", "gray_alpha.png", "bilevel.png", "rgb.bmp",
                                  "rgb.tif", "palette.gif", "rgb.webp"])
def test_other_modes_equal_load_rgb(tmp_path, name):
    path = _mode_images(tmp_path)[name]
    out = decode_rgb_uint8(str(path))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 20, 30)
    np.testing.assert_array_equal(_hwc(out), np.asarray(load_rgb(path)))


@pytest.mark.parametrize("name", ["sixteen.png", "palette_trns.png", "rgb_trns.png", "cmyk.jpg", "rgb.bmp",
                                  "rgb.webp"])
def test_files_torchvision_mishandles_are_routed_to_pil(tmp_path, name):
    data = _mode_images(tmp_path)[name].read_bytes()
    assert not cache_mod._torchvision_ok(data)


def test_eight_bit_jpeg_is_routed_to_torchvision_and_png_to_pil(tmp_path):
    """PNG never goes to torchvision: its decoder (0.29) kills the process on corrupt compressed data."""
    Image.fromarray(_noise(0, 8, 8)).save(tmp_path / "a.png")
    Image.fromarray(_noise(0, 8, 8)).save(tmp_path / "a.jpg")
    Image.fromarray(_noise(0, 8, 8, 1), "L").save(tmp_path / "g.jpg")
    for name in ("a.jpg", "g.jpg"):
        assert cache_mod._torchvision_ok((tmp_path / name).read_bytes()), name
    assert not cache_mod._torchvision_ok((tmp_path / "a.png").read_bytes())


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])  # the torchvision path and the PIL path
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, mode, orientation):
    arr = np.full((20, 30, 3), 40, np.uint8)
    arr[:6, :6] = (250, 250, 250)  # the stored image's top-left corner is bright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(arr).convert(mode).save(path, exif=exif.tobytes(), quality=95)
    out = _hwc(decode_rgb_uint8(str(path))).astype(int)
    assert out.shape == (30, 20, 3)  # width and height swapped
    # 6: rotate 90 degrees clockwise -> the corner goes top-right; 8: counter-clockwise -> bottom-left
    corner = out[:4, -4:] if orientation == 6 else out[-4:, :4]
    assert corner.min() > 200
    assert out[:4, :4].max() < 100 and out[-4:, -4:].max() < 100


def test_corrupt_file_raises_what_pil_raises(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_noise(0, 64, 64)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated, junk, empty):
        with pytest.raises(OSError):
            decode_rgb_uint8(str(path))


# ------------------------------------------------------------------ fit_square


def test_fit_square_equals_resize_and_centre_crop():
    image = torch.from_numpy(_noise(5, 20, 40)).permute(2, 0, 1).contiguous()  # a 40x20 picture
    out = fit_square(image, 16)
    expected = v2.CenterCrop(16)(v2.Resize(16, antialias=True)(image))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 16, 16)
    assert torch.equal(out, expected)
    tall = image.transpose(1, 2)  # 20x40
    assert torch.equal(fit_square(tall, 16), v2.CenterCrop(16)(v2.Resize(16, antialias=True)(tall)))


def test_fit_square_is_within_one_level_of_the_pil_eval_path():
    arr = _noise(4, 45, 60)
    pil = np.asarray(T.CenterCrop(32)(T.Resize(32)(Image.fromarray(arr)))).astype(int)
    out = _hwc(fit_square(torch.from_numpy(arr).permute(2, 0, 1), 32)).astype(int)
    assert np.abs(out - pil).max() <= 1 and (out != pil).mean() < 0.05


def test_fit_square_only_crops_when_the_shorter_side_fits():
    image = torch.from_numpy(_noise(6, 16, 30)).permute(2, 0, 1)
    assert torch.equal(fit_square(image, 16), image[:, :, 7:23])


# ------------------------------------------------------------------ image cache files


def _build(samples, size, tmp_path, logs=None, **kw):
    kw.setdefault("skip_bad", False)
    kw.setdefault("cache_dir", None)
    return build_image_cache(samples, size, data_root=tmp_path / "data", show_progress=False,
                             log=(logs.append if logs is not None else lambda _: None), **kw)


def _no_decode(path):
    raise AssertionError(f"decoded {path} although the cache file should have been reused")


def test_image_cache_holds_the_images_and_labels_in_order(tmp_path):
    samples = _folder(tmp_path / "data")
    cache = _build(samples, 24, tmp_path)
    assert isinstance(cache, ImageCache) and not cache.reused and cache.bad == []
    assert cache.images.dtype == torch.uint8 and tuple(cache.images.shape) == (6, 3, 24, 24)
    assert cache.images.is_contiguous()
    assert cache.labels.dtype == torch.int64 and cache.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i, (path, _) in enumerate(samples):
        np.testing.assert_array_equal(_hwc(cache.images[i]), np.asarray(Image.open(path)))
    assert cache.nbytes == 6 * 3 * 24 * 24 + 6 * 8 == estimate_bytes(6, 3, 24, 24)
    assert cache.file == tmp_path / "data" / ".toolkit_cache" / cache.file.name
    assert cache.file.name.startswith("images_") and cache.file.name.endswith("_24.pt")


def test_image_cache_file_is_reused_without_decoding(tmp_path, monkeypatch):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    monkeypatch.setattr(cache_mod, "decode_rgb_uint8", _no_decode)
    second = _build(samples, 24, tmp_path)
    assert second.reused and second.file == first.file
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)


def test_image_cache_is_rebuilt_when_a_file_changes(tmp_path):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    path = Path(samples[3][0])
    new = np.full((24, 24, 3), (10, 200, 30), np.uint8)
    st = path.stat()
    Image.fromarray(new).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    second = _build(samples, 24, tmp_path)
    assert not second.reused and second.file != first.file
    np.testing.assert_array_equal(_hwc(second.images[3]), new)
    assert torch.equal(second.images[:3], first.images[:3])
    assert _build(samples, 24, tmp_path).reused  # and the new file is used next time


def test_image_cache_is_rebuilt_when_only_the_mtime_tells(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    samples = []
    for i in range(3):  # BMP: the same byte size whatever the pixels
        Image.fromarray(_noise(i, 8, 8)).save(root / f"{i}.bmp")
        samples.append((str(root / f"{i}.bmp"), i))
    first = _build(samples, 8, tmp_path)
    path = root / "1.bmp"
    st = path.stat()
    Image.fromarray(_noise(99, 8, 8)).save(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    second = _build(samples, 8, tmp_path)
    assert not second.reused and second.file != first.file
    np.testing.assert_array_equal(_hwc(second.images[1]), _noise(99, 8, 8))


def test_image_cache_is_rebuilt_for_another_size(tmp_path, monkeypatch):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    second = _build(samples, 16, tmp_path)
    assert not second.reused and tuple(second.images.shape) == (6, 3, 16, 16)
    assert second.file.name.endswith("_16.pt") and second.file != first.file
    image = torch.from_numpy(np.array(Image.open(samples[0][0]))).permute(2, 0, 1)
    assert torch.equal(second.images[0], fit_square(image, 16))


def test_image_cache_order_is_part_of_the_key(tmp_path):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    second = _build(samples[::-1], 24, tmp_path)
    assert not second.reused and torch.equal(second.images, first.images.flip(0))
    assert second.labels.tolist() == [2, 2, 1, 1, 0, 0]


def test_cache_dir_is_used_when_given(tmp_path):
    samples = _folder(tmp_path / "data")
    cache = _build(samples, 24, tmp_path, cache_dir=tmp_path / "elsewhere")
    assert cache.file.parent == tmp_path / "elsewhere" and cache.file.is_file()
    assert not (tmp_path / "data" / ".toolkit_cache").exists()


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    samples = _folder(tmp_path / "data")
    cache = _build(samples, 24, tmp_path)
    assert [p.name for p in cache.file.parent.iterdir()] == [cache.file.name]
    payload = torch.load(cache.file, weights_only=True)
    assert torch.equal(payload["images"], cache.images)


def test_failed_write_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    samples = _folder(tmp_path / "data")

    def disk_full(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    logs: list[str] = []
    cache = _build(samples, 24, tmp_path, logs)
    assert cache.file is None and tuple(cache.images.shape) == (6, 3, 24, 24)
    assert list((tmp_path / "data" / ".toolkit_cache").iterdir()) == []
    assert any("cannot write" in line and "No space left" in line for line in logs)


def test_unusable_cache_folder_means_no_file_and_a_notice(tmp_path):
    samples = _folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    logs: list[str] = []
    cache = _build(samples, 24, tmp_path, logs, cache_dir=blocker / "cache")
    assert cache.file is None and not cache.reused and cache.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(logs) == 1 and "cannot write" in logs[0] and "--cache-dir" in logs[0]
    assert "\n" not in logs[0]


def test_permission_denied_means_no_file_and_a_notice(tmp_path, monkeypatch):
    samples = _folder(tmp_path / "data")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("common.checkpoint.tempfile.mkstemp", denied)  # as in a read-only folder
    logs: list[str] = []
    cache = _build(samples, 24, tmp_path, logs)
    assert cache.file is None and cache.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(logs) == 1 and "cannot write" in logs[0] and "Permission denied" in logs[0]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_cache_folder_means_no_file_and_a_notice(tmp_path):
    samples = _folder(tmp_path / "data")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        logs: list[str] = []
        cache = _build(samples, 24, tmp_path, logs, cache_dir=folder)
        assert cache.file is None and list(folder.iterdir()) == []
        assert len(logs) == 1 and "cannot write" in logs[0]
    finally:
        folder.chmod(0o700)


def test_corrupt_cache_file_is_rebuilt_with_a_notice(tmp_path):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    first.file.write_bytes(b"PK\x03\x04 this is not a torch file")
    logs: list[str] = []
    second = _build(samples, 24, tmp_path, logs)
    assert not second.reused and torch.equal(second.images, first.images)
    assert any("unreadable" in line and "rebuilding" in line for line in logs)
    assert _build(samples, 24, tmp_path).reused  # rewritten: readable again


def test_cache_file_of_another_key_is_not_trusted(tmp_path):
    samples = _folder(tmp_path / "data")
    first = _build(samples, 24, tmp_path)
    payload = torch.load(first.file, weights_only=True)
    payload["key"] = "0" * 64  # a file under the right name that holds other data
    torch.save(payload, first.file)
    assert not _build(samples, 24, tmp_path).reused


# ------------------------------------------------------------------ bad images


def _with_corrupt(tmp_path: Path) -> tuple[list[tuple[str, int]], str]:
    samples = _folder(tmp_path / "data")
    bad = tmp_path / "data" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return samples[:2] + [(str(bad), 1)] + samples[2:], str(bad)


def test_corrupt_image_is_a_user_error_naming_it(tmp_path):
    samples, bad = _with_corrupt(tmp_path)
    with pytest.raises(UserError) as info:
        _build(samples, 24, tmp_path)
    message = str(info.value)
    assert bad in message and "cannot be decoded" in message
    assert "--skip-bad-images" in message and "--check-images full" in message
    assert not (tmp_path / "data" / ".toolkit_cache").exists()  # nothing cached


def test_skip_bad_leaves_the_image_out_and_lists_it(tmp_path):
    samples, bad = _with_corrupt(tmp_path)
    cache = _build(samples, 24, tmp_path, skip_bad=True)
    assert [p for p, _ in cache.bad] == [bad] and cache.bad[0][1]
    assert tuple(cache.images.shape) == (6, 3, 24, 24) and cache.labels.tolist() == [0, 0, 1, 1, 2, 2]
    good = [p for p, _ in samples if p != bad]
    for i, path in enumerate(good):
        np.testing.assert_array_equal(_hwc(cache.images[i]), np.asarray(Image.open(path)))
    again = _build(samples, 24, tmp_path, skip_bad=True)
    assert again.reused and again.bad == cache.bad
    with pytest.raises(UserError, match="--skip-bad-images"):  # the cached file still counts as bad
        _build(samples, 24, tmp_path, skip_bad=False)


# ------------------------------------------------------------------ in-memory sets


def test_array_cache_of_a_cifar_like_array():
    data = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    cache = build_array_cache(data, [3, 1, 4, 1, 5])
    assert cache.file is None and not cache.reused and cache.masks is None
    assert tuple(cache.images.shape) == (5, 3, 8, 8) and cache.images.is_contiguous()
    assert torch.equal(cache.images, torch.from_numpy(data).permute(0, 3, 1, 2))
    assert cache.labels.dtype == torch.int64 and cache.labels.tolist() == [3, 1, 4, 1, 5]


def test_array_cache_of_an_mnist_like_tensor_is_rgb_like_to_rgb():
    data = torch.randint(0, 256, (4, 7, 9), dtype=torch.uint8)
    cache = build_array_cache(data, torch.tensor([0, 9, 2, 7]))
    assert tuple(cache.images.shape) == (4, 3, 7, 9)
    for i in range(4):
        ref = np.asarray(to_rgb(Image.fromarray(data[i].numpy(), "L")))
        np.testing.assert_array_equal(_hwc(cache.images[i]), ref)
    assert cache.labels.tolist() == [0, 9, 2, 7]


def test_array_cache_can_fit_a_size():
    data = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    cache = build_array_cache(data, [0, 1, 2], size=12)
    assert tuple(cache.images.shape) == (3, 3, 12, 12)
    assert torch.equal(cache.images[1], fit_square(torch.from_numpy(data[1]).permute(2, 0, 1), 12))


# ------------------------------------------------------------------ segmentation pairs


def _pairs(root: Path, n: int = 4, size: tuple[int, int] = (22, 18)) -> list[tuple[str, str]]:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = []
    w, h = size
    for i in range(n):
        image, mask = root / "imgs" / f"p{i}.png", root / "masks" / f"p{i}_mask.png"
        Image.fromarray(_noise(i, h, w)).save(image)
        Image.fromarray(rng.choice(np.array([0, 128, 255], np.uint8), (h, w)), "L").save(mask)
        pairs.append((str(image), str(mask)))
    return pairs


@pytest.mark.parametrize(("scale", "in_chans"), [(0.5, 3), (1.0, 3), (0.7, 1)])
def test_pair_cache_matches_segmentation_dataset(tmp_path, scale, in_chans):
    pairs = _pairs(tmp_path / "seg")
    values = [0, 128, 255]
    cache = build_pair_cache(pairs, values, scale, in_chans, cache_dir=None, data_root=tmp_path / "seg",
                             show_progress=False, log=lambda _: None)
    dataset = SegmentationDataset(pairs, values, scale=scale, in_chans=in_chans)
    x0, y0 = dataset[0]
    assert cache.images.dtype == torch.uint8 and tuple(cache.images.shape) == (4, *x0.shape)
    assert cache.masks.dtype == torch.uint8 and tuple(cache.masks.shape) == (4, *y0.shape)
    assert cache.labels.numel() == 0
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert torch.equal(cache.images[i], (x * 255).round().to(torch.uint8))
        assert torch.equal(cache.masks[i].long(), y)
    assert set(cache.masks.unique().tolist()) == {0, 1, 2}
    assert cache.file.parent == tmp_path / "seg" / ".toolkit_cache"
    assert cache.file.name == f"pairs_{cache.file.name[6:22]}_{x0.shape[2]}x{x0.shape[1]}.pt"


def test_pair_cache_is_reused_and_keyed_by_mask_values(tmp_path, monkeypatch):
    pairs = _pairs(tmp_path / "seg")
    kw = {"cache_dir": None, "data_root": tmp_path / "seg", "show_progress": False, "log": lambda _: None}
    first = build_pair_cache(pairs, [0, 128, 255], 0.5, 3, **kw)
    again = build_pair_cache(pairs, [0, 128, 255], 0.5, 3, **kw)
    assert again.reused and torch.equal(again.masks, first.masks)
    assert not build_pair_cache(pairs, [0, 128, 255], 0.5, 1, **kw).reused
    with pytest.raises(UserError, match="not mask values"):  # another key: decoded, and 128 is unknown
        build_pair_cache(pairs, [0, 255], 0.5, 3, **kw)


def test_pair_cache_needs_one_size(tmp_path):
    pairs = _pairs(tmp_path / "a", n=2) + _pairs(tmp_path / "b", n=1, size=(30, 18))
    with pytest.raises(UserError, match="one size") as info:
        build_pair_cache(pairs, [0, 128, 255], 0.5, 3, cache_dir=None, data_root=tmp_path,
                         show_progress=False, log=lambda _: None)
    assert "--data-cache off" in str(info.value)


# ------------------------------------------------------------------ placement


GB = 10**9


def test_auto_placement_picks_device_then_ram_then_off():
    place_, reason = choose_placement("auto", 2 * GB, CUDA, free_bytes=10 * GB, ram_bytes=100 * GB)
    assert place_ == "device" and reason == "data cache: on the GPU (2.0 GB of 10.0 GB free)"
    place_, reason = choose_placement("auto", 6 * GB, CUDA, free_bytes=10 * GB, ram_bytes=100 * GB)
    assert place_ == "ram" and "in RAM" in reason and "GPU" in reason
    place_, reason = choose_placement("auto", 60 * GB, CUDA, free_bytes=10 * GB, ram_bytes=100 * GB)
    assert place_ == "off" and "60.0 GB" in reason
    assert choose_placement("auto", 2 * GB, CPU, ram_bytes=100 * GB)[0] == "ram"
    assert choose_placement("auto", 2 * GB, CPU, ram_bytes=3 * GB)[0] == "off"
    assert choose_placement("off", 1, CUDA, free_bytes=10 * GB, ram_bytes=10 * GB)[0] == "off"


def test_device_asked_on_a_cpu_falls_back_to_ram_with_a_notice():
    place_, reason = choose_placement("device", 2 * GB, CPU, ram_bytes=100 * GB)
    assert place_ == "ram" and "CUDA" in reason and "\n" not in reason


def test_asked_placement_too_big_is_a_user_error():
    with pytest.raises(UserError, match="--data-cache off") as info:
        choose_placement("ram", 60 * GB, CPU, ram_bytes=100 * GB)
    assert "60.0 GB" in str(info.value)
    with pytest.raises(UserError, match="--data-cache off"):
        choose_placement("device", 6 * GB, CUDA, free_bytes=10 * GB, ram_bytes=100 * GB)
    with pytest.raises(UserError, match="--data-cache"):
        choose_placement("gpu", 1, CPU)


def test_place_keeps_ram_caches_unpinned_on_a_cpu():
    cache = build_array_cache(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    placed = place(cache, "ram", CPU, pin=True)
    assert placed.images is cache.images and not placed.images.is_pinned()
    moved = place(cache, "device", CPU, pin=False)
    assert moved.images.device.type == "cpu" and torch.equal(moved.images, cache.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_place_on_the_gpu_and_pinned():
    cache = build_array_cache(np.ones((2, 4, 4, 3), np.uint8), [0, 1])
    assert place(cache, "device", CUDA, pin=False).images.is_cuda
    pinned = place(cache, "ram", CUDA, pin=True)
    assert pinned.images.is_pinned() and pinned.labels.is_pinned()
