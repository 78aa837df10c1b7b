"""common/data/images.py and the demo set of common/data/builtin.py."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder
from PIL import Image

from common.data import images as im
from common.data.builtin import DEMO_CLASSES, DEMO_MARKER, make_demo_dataset
from common.errors import UserError

# ---------------------------------------------------------------- scanning


def test_scan_class_folders_labels_in_sorted_order(tmp_path):
    root = make_folder(tmp_path / "d", classes=("cat", "ant", "bee"), per_class=2)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    classes, samples = im.scan_class_folders(root)
    assert classes == ["ant", "bee", "cat"]
    assert len(samples) == 6
    for path, label in samples:
        assert Path(path).parent.name == classes[label]
        assert Path(path).suffix == ".png"


def test_scan_class_folders_finds_nested_and_uppercase_images(tmp_path):
    root = make_folder(tmp_path / "d", per_class=1)
    (root / "top" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "top" / "more" / "X.JPG", "JPEG")
    _, samples = im.scan_class_folders(root)
    assert any(p.endswith("X.JPG") for p, _ in samples)
    assert len(samples) == 3


def test_scan_class_folders_with_given_class_order(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    classes, samples = im.scan_class_folders(root, classes=["top", "bottom"])
    assert classes == ["top", "bottom"]
    assert {label for p, label in samples if "/top/" in p.replace("\\", "/")} == {0}


def test_scan_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match="does not exist") as info:
        im.scan_class_folders(missing)
    assert str(missing) in str(info.value)

    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(UserError, match="is a file") as info:
        im.scan_class_folders(file)
    assert str(file) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loose.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class folders") as info:
        im.scan_class_folders(empty)
    assert str(empty) in str(info.value)

    root = make_folder(tmp_path / "d", per_class=1)
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images") as info:
        im.scan_class_folders(root)
    assert str(root / "zebra") in str(info.value)


# ---------------------------------------------------------------- splits

def test_folder_splits_train_and_val(dataset):
    splits = im.folder_splits(dataset, 0.2, seed=0)
    assert splits.classes == ["bottom", "top"]
    assert len(splits.train) == 32 and len(splits.val) == 12
    assert all("/train/" in p.replace("\\", "/") for p, _ in splits.train)
    assert all("/val/" in p.replace("\\", "/") for p, _ in splits.val)
    for path, label in splits.train + splits.val:
        assert Path(path).parent.name == splits.classes[label]


def test_folder_splits_without_val_is_stratified_and_repeatable(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", classes=("a", "b", "c"), per_class=12)
    first = im.folder_splits(root, 0.25, seed=7)
    second = im.folder_splits(root, 0.25, seed=7)
    assert first.train == second.train and first.val == second.val
    assert "no val/ folder" in first.description
    assert len(first.val) == 9 and len(first.train) == 27
    for label in range(3):
        assert sum(1 for _, y in first.val if y == label) == 3
    assert not set(first.train) & set(first.val)
    other = im.folder_splits(root, 0.25, seed=8)
    assert other.val != first.val


def test_stratified_split_keeps_every_class_in_val(tmp_path):
    samples = [(f"a{i}", 0) for i in range(20)] + [(f"b{i}", 1) for i in range(2)] + [("c0", 2)]
    train, val = im.stratified_split(samples, 0.1, seed=0)
    assert {y for _, y in val} == {0, 1}  # a class with a single image stays in train
    assert sum(1 for _, y in val if y == 1) == 1
    assert ("c0", 2) in train
    assert sorted(train + val) == sorted(samples)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_bad_val_split(fraction):
    with pytest.raises(UserError, match="--val-split"):
        im.stratified_split([("a", 0), ("b", 0)], fraction, seed=0)


def test_folder_splits_class_sets_differ(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", classes=("bottom", "top"), per_class=2)
    make_folder(root / "val", classes=("bottom", "side"), per_class=2)
    with pytest.raises(UserError) as info:
        im.folder_splits(root, 0.2, seed=0)
    message = str(info.value)
    assert "'top'" in message and "'side'" in message
    assert str(root / "train") in message and str(root / "val") in message


def test_folder_splits_val_labels_follow_train_classes(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", classes=("a", "b"), per_class=2)
    make_folder(root / "val", classes=("a", "b"), per_class=1)
    splits = im.folder_splits(root, 0.2, seed=0)
    assert sorted((Path(p).parent.name, y) for p, y in splits.val) == [("a", 0), ("b", 1)]


def test_folder_splits_with_class_folders_directly_in_data_dir(tmp_path):
    root = make_folder(tmp_path / "flat", per_class=10)
    splits = im.folder_splits(root, 0.2, seed=0)
    assert splits.classes == ["bottom", "top"]
    assert len(splits.val) == 4 and len(splits.train) == 16
    assert {y for _, y in splits.val} == {0, 1}


def test_folder_splits_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match="--demo") as info:
        im.folder_splits(tmp_path / "nowhere", 0.2, seed=0)
    assert str(tmp_path / "nowhere") in str(info.value)


# ---------------------------------------------------------------- decoding

def roundtrip(img: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def sixteen_bit_gradient() -> Image.Image:
    arr = np.linspace(0, 65535, 32 * 24).reshape(24, 32).astype(np.uint16)
    img = roundtrip(Image.fromarray(arr), "PNG")
    assert img.mode.startswith("I")  # PIL's 16-bit grayscale
    return img


def mode_images() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (32, 24), (200, 100, 50, 128))
    palette = Image.new("P", (32, 24), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    return {
        "L": Image.new("L", (32, 24), 77),
        "LA": Image.new("LA", (32, 24), (77, 10)),
        "RGBA": rgba,
        "P": roundtrip(palette, "PNG"),
        "I;16": sixteen_bit_gradient(),
        "CMYK": roundtrip(Image.new("CMYK", (32, 24), (0, 255, 0, 0)), "JPEG"),
        "F": Image.fromarray(np.full((24, 32), 0.5, dtype=np.float32)),
        "1": Image.new("1", (32, 24), 1),
    }


def expected_rgb(mode: str) -> np.ndarray:
    """The 24x32x3 uint8 pixels each of mode_images() must decode to: grey levels copied to the three
    channels, the alpha dropped (as torchvision's loader does), the palette looked up, 16 bits scaled
    by 255/65535 (truncated), floats in [0, 1] by 255, a 1-bit white as 255."""
    if mode == "I;16":
        grey = (np.linspace(0, 65535, 32 * 24).reshape(24, 32) / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    colour = {"L": (77,) * 3, "LA": (77,) * 3, "RGBA": (200, 100, 50), "P": (0, 255, 0),
              "CMYK": (255, 0, 255), "F": (127,) * 3, "1": (255,) * 3}[mode]
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (24, 32, 3))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "F", "1"])
def test_to_rgb_any_mode(mode):
    img = mode_images()[mode]
    out = im.to_rgb(img)
    assert out.mode == "RGB" and out.size == (32, 24)
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.shape == (24, 32, 3)
    # every pixel, not only the first; JPEG (the CMYK file) is lossy by a few levels
    tolerance = 3 if mode == "CMYK" else 0
    np.testing.assert_allclose(arr.astype(int), expected_rgb(mode).astype(int), atol=tolerance, rtol=0)


def test_to_rgb_values():
    images = mode_images()
    assert np.asarray(im.to_rgb(images["L"]))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(im.to_rgb(images["P"]))[0, 0].tolist() == [0, 255, 0]
    assert np.asarray(im.to_rgb(images["CMYK"]))[0, 0].tolist() == pytest.approx([255, 0, 255], abs=3)
    assert np.asarray(im.to_rgb(images["F"]))[0, 0].tolist() == [127, 127, 127]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    sixteen_bit_gradient().save(path)
    arr = np.asarray(im.load_rgb(path))
    assert arr.dtype == np.uint8
    assert arr.max() >= 250 and arr.min() <= 5
    assert (arr == 255).mean() < 0.05  # a clipped conversion would be white almost everywhere
    assert 100 <= arr[12, 16, 0] <= 155  # the middle of the gradient is mid-grey


def test_sixteen_bit_in_mode_i_is_scaled():
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    assert np.asarray(im.to_rgb(img))[0, :, 0].tolist() == [0, 127, 255]


# ---------------------------------------------------------------- checking files

@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = {}
    for ext in ("jpg", "png"):
        good = tmp_path / f"good.{ext}"
        img.save(good)
        data = good.read_bytes()
        half = tmp_path / f"half.{ext}"
        half.write_bytes(data[: len(data) // 2])
        out[f"good_{ext}"], out[f"half_{ext}"] = str(good), str(half)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    out["zero"], out["text"] = str(tmp_path / "zero.png"), str(tmp_path / "text.jpg")
    return out


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_check_image(files, mode):
    assert im.check_image(files["good_jpg"], mode) is None
    assert im.check_image(files["good_png"], mode) is None
    assert "empty" in im.check_image(files["zero"], mode)
    assert "not an image" in im.check_image(files["text"], mode)
    assert "truncated" in im.check_image(files["half_jpg"], mode).lower()
    assert "decoded" in im.check_image(files["half_png"], mode)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_check_images_returns_only_bad_files(files, mode):
    bad = im.check_images(list(files.values()), mode, show_progress=False)
    assert sorted(p for p, _ in bad) == sorted(files[k] for k in ("half_jpg", "half_png", "zero", "text"))
    assert all(isinstance(why, str) and why for _, why in bad)


def test_check_images_off():
    assert im.check_images(["/does/not/matter.jpg"], "off") == []


# ---------------------------------------------------------------- transforms and dataset

def test_preprocessing_is_plain():
    pre = im.preprocessing(224)
    assert pre["img_size"] == 224 and pre["resize_size"] == 256
    assert pre["mean"] == list(im.IMAGENET_MEAN) and pre["std"] == list(im.IMAGENET_STD)


def test_eval_transform_shape_and_normalisation():
    pre = im.preprocessing(32)
    colour = (128, 64, 255)
    out = im.eval_transform(pre)(Image.new("RGB", (50, 40), colour))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - pre["mean"][c]) / pre["std"][c]
        assert torch.allclose(out[c], torch.full((32, 32), expected), atol=1e-5)


def test_eval_transform_keeps_the_centre():
    """Resize to 32/0.875 then centre-crop 32: a centred square survives, the border goes."""
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (24, 24, 40, 40))
    img.paste((255, 0, 0), (0, 0, 2, 64))  # a thin border stripe that the crop removes
    pre = im.preprocessing(32, mean=(0, 0, 0), std=(1, 1, 1))
    out = im.eval_transform(pre)(img)
    assert out[:, 16, 16].tolist() == pytest.approx([1, 1, 1], abs=0.02)
    assert out[0, :, 0].max() < 0.1


def test_train_transform_shape_and_grayscale_input():
    """A uniform grey (mode L) picture stays grey in all three channels through crop, flip, rotation
    and colour jitter, with at most two levels: the grey (brightness and contrast jitter of 0.2 keep
    its 100 within 0.8 x 0.8 x 100 .. 1.2 x 1.2 x 100) and the darker corners the rotation uncovers."""
    pre = im.preprocessing(24)
    mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
    for seed in range(4):
        torch.manual_seed(seed)
        out = im.train_transform(pre)(Image.new("L", (40, 30), 100))
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        levels = ((out * std + mean) * 255).round()  # back to the 0-255 levels
        assert torch.equal(levels[0], levels[1]) and torch.equal(levels[0], levels[2])
        values = levels[0].unique()
        centre = levels[0, 12, 12]
        assert len(values) <= 2 and centre == values.max(), values
        assert 64 <= centre <= 144, centre


def test_image_dataset_decodes_any_mode(tmp_path):
    paths = []
    for i, (mode, value) in enumerate([("L", 10), ("RGBA", (1, 2, 3, 4)), ("RGB", (5, 6, 7))]):
        path = tmp_path / f"{i}.png"
        Image.new(mode, (20, 20), value).save(path)
        paths.append((str(path), i))
    pre = im.preprocessing(16)
    ds = im.ImageDataset(paths, im.eval_transform(pre))
    assert len(ds) == 3
    mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
    # L 10 -> grey 10; RGBA (1, 2, 3, alpha 4) -> (1, 2, 3), alpha dropped; RGB as it is
    for i, rgb in enumerate([(10, 10, 10), (1, 2, 3), (5, 6, 7)]):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and y == i
        expected = (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        torch.testing.assert_close(x, expected.expand(3, 16, 16), atol=1e-5, rtol=0)


def test_image_dataset_bad_file_is_a_user_error(files):
    """Without --skip-bad-images (skip_bad=False) the message names the file and the two flags that
    help; a tool without those flags (skip_bad=None) names none."""
    samples = [(files["good_png"], 0), (files["half_jpg"], 1)]
    transform = im.eval_transform(im.preprocessing(16))
    ds = im.ImageDataset(samples, transform, skip_bad=False)
    x, y = ds[0]
    with Image.open(files["good_png"]) as img:
        torch.testing.assert_close(x, transform(img.convert("RGB")), atol=0, rtol=0)
    assert y == 0
    with pytest.raises(UserError) as info:
        ds[1]
    message = str(info.value)
    assert files["half_jpg"] in message and "--skip-bad-images" in message
    assert "--check-images full" in message and "--check-images fast" not in message
    with pytest.raises(UserError) as info:
        im.ImageDataset(samples, im.eval_transform(im.preprocessing(16)))[1]
    assert files["half_jpg"] in str(info.value) and "--" not in str(info.value)


# ---------------------------------------------------------------- demo set

def count(folder: Path) -> int:
    return len(list(folder.glob("*.png")))


def test_make_demo_dataset_writes_train_and_val(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", images_per_class=10, size=16)
    for kind in DEMO_CLASSES:
        assert count(root / "train" / kind) == 8
        assert count(root / "val" / kind) == 2
    splits = im.folder_splits(root, 0.2, seed=0)
    assert splits.classes == sorted(DEMO_CLASSES)
    with Image.open(next((root / "train" / DEMO_CLASSES[0]).glob("*.png"))) as img:
        assert img.size == (16, 16) and img.mode == "RGB"


def test_make_demo_dataset_reuses_existing_folder(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", images_per_class=5, size=16)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    (root / "train" / "horizontal" / "horizontal_0003.png").write_bytes(b"sentinel")
    make_demo_dataset(root, images_per_class=5, size=16)
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files if p.name != "horizontal_0003.png"} == {
        p: t for p, t in stamps.items() if p.name != "horizontal_0003.png"}
    assert (root / "train" / "horizontal" / "horizontal_0003.png").read_bytes() == b"sentinel"


def test_make_demo_dataset_is_deterministic(tmp_path):
    a = make_demo_dataset(tmp_path / "a", images_per_class=3, size=16, seed=5)
    b = make_demo_dataset(tmp_path / "b", images_per_class=3, size=16, seed=5)
    for path in sorted(a.rglob("*.png")):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()


def test_make_demo_dataset_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.docx").write_text("precious")
    with pytest.raises(UserError) as info:
        make_demo_dataset(root, images_per_class=2, size=16)
    assert str(root) in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["thesis.docx"]
    assert (root / "thesis.docx").read_text() == "precious"


def test_make_demo_dataset_with_another_size_leaves_no_stale_images(tmp_path):
    """--demo-images 10 after a run with more images must give exactly the new set: no stale
    files from the old one, and no image name in both train/ and val/."""
    root = make_demo_dataset(tmp_path / "demo", images_per_class=10, size=16)
    make_demo_dataset(root, images_per_class=5, size=16)
    assert (root / DEMO_MARKER).is_file()
    for kind in DEMO_CLASSES:
        train = {p.name for p in (root / "train" / kind).glob("*.png")}
        val = {p.name for p in (root / "val" / kind).glob("*.png")}
        assert not train & val
        assert len(train) + len(val) == 5


def test_empty_val_class_folder_names_the_folder(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=2)
    make_folder(root / "val", per_class=1)
    for path in (root / "val" / "top").iterdir():
        path.unlink()
    with pytest.raises(UserError) as info:
        im.folder_splits(root, 0.2, seed=0)
    assert str(root / "val" / "top") in str(info.value)


# ---------------------------------------------------------------- loaders

def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    from common.distributed import ShardSampler as EpochShuffleSampler

    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(0)
    order = list(a)
    torch.manual_seed(1)  # the global generator plays no part
    assert list(b) == order
    assert sorted(order) == data and order != data and len(a) == 50
    b.set_epoch(3)
    assert list(b) != order
    assert list(EpochShuffleSampler(data, seed=4)) != list(EpochShuffleSampler(data, seed=3))


def test_make_loader_settings(monkeypatch):
    from common.data import loaders

    data = torch.utils.data.TensorDataset(torch.arange(10))
    evaluation = loaders.make_loader(data, 4, train=False, num_workers=0, pin_memory=False)
    assert [batch[0].tolist() for batch in evaluation] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert evaluation.pin_memory is False and evaluation.persistent_workers is False

    train = loaders.make_loader(data, 4, train=True, num_workers=0, pin_memory=False, seed=1,
                                drop_last=True)
    assert isinstance(train.sampler, loaders.ShardSampler) and train.sampler.shuffle
    seen = [v for batch in train for v in batch[0].tolist()]
    assert len(seen) == 8 and len(set(seen)) == 8

    monkeypatch.setattr(loaders, "WORKER_START_METHOD", "spawn")
    workers = loaders.make_loader(data, 4, train=True, num_workers=2, pin_memory=True)
    assert workers.persistent_workers is True and workers.prefetch_factor == 4
    assert workers.pin_memory is True
    assert workers.multiprocessing_context.get_start_method() == "spawn"
