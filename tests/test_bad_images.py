"""Image files that are not what they claim: PNGs whose checksums are valid but whose compressed
data is corrupt, decode errors met while training (with and without --skip-bad-images, on the
DataLoader path and the data cache, for gpu_train.py and train_unet.py), images that are too
large, and prediction runs where some or all inputs are unreadable."""
from __future__ import annotations

import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

import gpu_train
import predict
import train_unet
from common.checkpoint import load_checkpoint
from common.classify_predict import ImageFiles
from common.data import images as im
from common.data import segmentation as seg
from common.data.cache import build_image_cache, decode_rgb_uint8
from common.data.png_check import ADAM7, PNG_MAGIC, png_data_problem
from common.errors import UserError

UNET_FAST = ["-s", "1", "--width", "4", "-l", "3e-3", "--num-workers", "0", "--log-interval", "2",
             "-b", "4", "-v", "25"]


# ------------------------------------------------------------------ PNG files built by hand


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(arr: np.ndarray, interlace: bool = False, idat=lambda stream: stream) -> bytes:
    """An 8-bit grey/RGB/RGBA PNG (filter type 0, Adam7 when interlaced); `idat` may change the
    compressed stream, and every chunk's CRC is computed afterwards, so the checksums stay valid."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    height, width, channels = arr.shape
    rows = b""
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        part = arr[y0::dy, x0::dx]
        if part.size:
            rows += b"".join(b"\0" + row.tobytes() for row in part)
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2, 4: 6}[channels], 0, 0, int(interlace))
    return (PNG_MAGIC + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat(zlib.compress(rows)))
            + _chunk(b"IEND", b""))


def _picture(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size))[..., None] * 3
    return np.clip(ramp + rng.integers(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def _flip_inside(stream: bytes) -> bytes:
    data = bytearray(stream)
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    return bytes(data)


CORRUPT = {"flipped": _flip_inside, "cut": lambda stream: stream[: len(stream) // 2]}


def write_corrupt_png(path: Path, kind: str, size: int = 32) -> Path:
    path.write_bytes(png_bytes(_picture(size), idat=CORRUPT[kind]))
    with Image.open(path) as img:
        img.verify()  # the checksum walk (what --check-images fast did alone) finds nothing
    return path


@pytest.mark.parametrize("kind", sorted(CORRUPT))
@pytest.mark.parametrize("mode", ["fast", "full"])
def test_corrupt_compressed_data_with_valid_checksums_is_found(tmp_path, kind, mode):
    path = write_corrupt_png(tmp_path / f"{kind}.png", kind)
    with pytest.raises(OSError), Image.open(path) as img:
        img.load()  # what training does with it
    why = im.check_image(str(path), mode)
    assert why is not None and why.startswith("cannot be decoded")
    assert im.check_images([str(path)], mode, show_progress=False) == [(str(path), why)]


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 3), (9, 17, 4), (37, 53, 3)])
def test_readable_pngs_pass_the_inflate_check(tmp_path, shape, interlace):
    """Every row found where the header says (Adam7 passes too, small images with empty passes)."""
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "ok.png"
    path.write_bytes(png_bytes(arr, interlace))
    assert np.array_equal(np.asarray(Image.open(path)).reshape(arr.shape), arr)  # a valid file indeed
    assert png_data_problem(str(path)) is None
    assert im.check_image(str(path), "fast") is None


@pytest.mark.parametrize("mode", ["P", "1", "I;16", "LA"])
def test_pil_written_pngs_of_other_depths_pass(tmp_path, mode):
    base = Image.fromarray(_picture(23))
    img = {"P": base.quantize(16), "1": base.convert("1"), "LA": base.convert("LA"),
           "I;16": Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)}[mode]
    img.save(tmp_path / "x.png", **({"bits": 4} if mode == "P" else {}))
    assert im.check_image(str(tmp_path / "x.png"), "fast") is None


def test_a_bad_filter_type_and_missing_rows_are_named(tmp_path):
    arr = _picture(8)
    bad_filter = tmp_path / "filter.png"
    bad_filter.write_bytes(png_bytes(arr, idat=lambda s: zlib.compress(b"\x07" + zlib.decompress(s)[1:])))
    assert "invalid filter type" in png_data_problem(str(bad_filter))
    short = tmp_path / "short.png"
    short.write_bytes(png_bytes(arr, idat=lambda s: zlib.compress(zlib.decompress(s)[:-20])))
    assert png_data_problem(str(short)) == f"the image data is truncated ({8 * 25 - 20} of {8 * 25} bytes)"


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_the_cache_decoder_raises_on_corrupt_compressed_data(tmp_path, kind):
    """The decode-once cache reports the file (torchvision's PNG decoder would crash the process)."""
    path = write_corrupt_png(tmp_path / f"{kind}.png", kind)
    with pytest.raises(im.DECODE_ERRORS):
        decode_rgb_uint8(str(path))
    good = tmp_path / "good.png"
    Image.fromarray(_picture()).save(good)
    samples = [(str(good), 0), (str(path), 1)]
    with pytest.raises(UserError, match="--check-images full") as info:
        build_image_cache(samples, 16, cache_dir=tmp_path / "c", data_root=tmp_path, skip_bad=False,
                          show_progress=False, log=lambda _: None)
    assert str(path) in str(info.value) and "--skip-bad-images" in str(info.value)
    cache = build_image_cache(samples, 16, cache_dir=tmp_path / "c", data_root=tmp_path, skip_bad=True,
                              show_progress=False, log=lambda _: None)
    assert len(cache) == 1 and [p for p, _ in cache.bad] == [str(path)]


# ------------------------------------------------------------------ gpu_train.py


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = gpu_train.main([*FAST, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_default_check_stops_a_corrupt_png_before_epoch_one(dataset, tmp_path, capsys):
    bad = write_corrupt_png(dataset / "train" / "top" / "corrupt.png", "flipped")
    code, _, err = _train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"),
                          "--epochs", "1")
    line = error_line(err)
    assert code == 2 and str(bad) in line and "--skip-bad-images" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_decode_error_while_training_stops_with_one_line_and_the_checkpoint_intact(dataset, tmp_path, capsys,
                                                                                   cache):
    """A file that breaks after the check (here: --check-images off on the resumed run): the DataLoader
    path stops mid-epoch, the cache while it decodes; both with one line naming the file and the two
    flags that help, exit 2, and checkpoint.pth still that of epoch 1."""
    out = tmp_path / "o"
    assert _train(capsys, "--data-dir", str(dataset), "--output", str(out), "--epochs", "1",
                  "--data-cache", cache)[0] == 0
    bad = write_corrupt_png(dataset / "train" / "top" / "top_000.png", "cut")
    code, _, err = _train(capsys, "--resume", str(out / "checkpoint.pth"), "--epochs", "2",
                          "--check-images", "off", "--data-cache", cache)
    line = error_line(err)
    assert code == 2 and str(bad) in line
    assert "--skip-bad-images" in line and "--check-images full" in line and "--check-images fast" not in line
    assert load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]["epoch"] == 1


@pytest.mark.parametrize("workers", ["0", "2"])
def test_skip_bad_images_while_training_replaces_the_image_and_says_so_once(dataset, tmp_path, capsys,
                                                                            workers):
    """DataLoader path, two epochs, workers or not: the run finishes, the notice appears once."""
    bad = write_corrupt_png(dataset / "train" / "top" / "late.png", "flipped")
    out = tmp_path / "o"
    code, stdout, err = _train(capsys, "--data-dir", str(dataset), "--output", str(out), "--epochs", "2",
                               "--check-images", "off", "--data-cache", "off", "--skip-bad-images",
                               "--num-workers", workers)
    assert code == 0, err
    log = (out / "training.log").read_text()
    notice = f"notice: image {bad} cannot be decoded"
    assert log.count(notice) == 1 and "--skip-bad-images" in log.split(notice)[1].split("\n")[0]
    assert "33 train / 12 val" in log  # the set's size; the bad one's place is taken by another image
    assert "epoch 2/2" in log


def test_image_dataset_skips_to_the_next_readable_image(tmp_path):
    good = [tmp_path / f"{i}.png" for i in range(2)]
    for i, path in enumerate(good):
        Image.new("RGB", (8, 8), (100 * i, 0, 0)).save(path)
    bad = write_corrupt_png(tmp_path / "bad.png", "cut", size=8)
    ds = im.ImageDataset([(str(good[0]), 0), (str(bad), 1), (str(good[1]), 2)],
                         im.eval_transform(im.preprocessing(8)), skip_bad=True)
    assert ds[1][1] == 2 and ds[2][1] == 2 and bool(ds.bad[1])
    assert ds.bad.is_shared()  # the workers of a DataLoader see what one of them found
    only_bad = im.ImageDataset([(str(bad), 0)], im.eval_transform(im.preprocessing(8)), skip_bad=True)
    with pytest.raises(UserError, match="no readable images left"):
        only_bad[0]


# ------------------------------------------------------------------ train_unet.py


@pytest.fixture
def shapes(tmp_path) -> Path:
    return seg.make_shapes_dataset(tmp_path / "shapes", n=8, size=16)


def test_unet_check_finds_a_corrupt_png(shapes, tmp_path):
    bad = write_corrupt_png(shapes / "imgs" / "shape_0003.png", "flipped", size=16)
    pairs = seg.find_pairs(shapes)
    with pytest.raises(UserError) as info:
        seg.check_pairs(pairs, "fast", show_progress=False)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_unet_decode_error_while_training_is_one_line(shapes, tmp_path, capsys, cache):
    bad = write_corrupt_png(shapes / "imgs" / "shape_0002.png", "cut", size=16)
    capsys.readouterr()
    code = train_unet.main(["--data-dir", str(shapes), "--output", str(tmp_path / "o"), "-e", "1",
                            "--check-images", "off", "--data-cache", cache, *UNET_FAST])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and str(bad) in line and "--check-images full" in line


# ------------------------------------------------------------------ very large images


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_a_large_image_is_one_notice_and_a_too_large_one_a_bad_image(dataset, tmp_path, capsys,
                                                                     monkeypatch, cache):
    """The set's images are 32 x 32 = 1024 pixels; with the limit at 1100, 40 x 40 is large (one notice
    of ours, though the file is opened by the check, the cache or every epoch's loader) and 50 x 50 is
    above twice the limit: a bad image like any other. No PIL warning escapes."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)
    large, huge = dataset / "train" / "top" / "large.png", dataset / "train" / "top" / "huge.png"
    Image.fromarray(_picture(40)).save(large)
    Image.fromarray(_picture(50)).save(huge)
    copy = shutil.copytree(dataset, tmp_path / "copy")  # the notice is said once per file and process
    out = tmp_path / f"o_{cache}"
    argv = ["--output", str(out), "--epochs", "2", "--data-cache", cache]
    with warnings.catch_warnings(record=True) as caught:
        code, _, err = _train(capsys, "--data-dir", str(copy), *argv)
        line = error_line(err)
        assert code == 2 and str(copy / "train" / "top" / "huge.png") in line and "too large" in line
        assert "large.png" not in line
        code, stdout, err = _train(capsys, "--data-dir", str(dataset), *argv, "--skip-bad-images")
    assert code == 0, err
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    notices = [x for x in (out / "training.log").read_text().splitlines() if "very large" in x]
    assert len(notices) == 1 and f"{large} is very large (40 x 40 pixels)" in notices[0]
    listed = (out / "bad_images.txt").read_text()
    assert str(huge) in listed and "too large" in listed and str(large) not in listed


def test_too_large_is_said_in_words_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "big.jpg"
    Image.fromarray(_picture(20)).save(path)
    for why in (im.check_image(str(path), "fast"), im.check_image(str(path), "full")):
        assert why == "cannot be decoded (too large to decode safely (400 pixels, more than twice PIL's " \
                      "limit of 100); resize it)"
    with pytest.raises(Image.DecompressionBombError):
        decode_rgb_uint8(str(path))


# ------------------------------------------------------------------ predict.py


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from conftest import make_folder

    root = tmp_path_factory.mktemp("clf")
    make_folder(root / "data" / "train", per_class=6, seed=1)
    make_folder(root / "data" / "val", per_class=2, seed=2)
    assert gpu_train.main(["--data-dir", str(root / "data"), "--output", str(root / "out"), *FAST,
                           "--epochs", "1"]) == 0
    return root / "out" / "best_model.pth"


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unet")
    data = seg.make_shapes_dataset(root / "shapes", n=8, size=16)
    assert train_unet.main(["--data-dir", str(data), "--output", str(root / "out"), "-e", "1",
                            *UNET_FAST]) == 0
    return root / "out" / "best_model.pth"


def _unreadable(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.png").write_text("not a picture")
    write_corrupt_png(folder / "corrupt.png", "flipped", size=16)
    return [str(folder / "text.png"), str(folder / "corrupt.png")]


def test_classifier_predict_with_no_readable_input_is_exit_2(classifier, tmp_path, capsys, monkeypatch):
    bad = _unreadable(tmp_path / "in")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(_picture(48)).save(tmp_path / "in" / "huge.png")  # above twice the limit
    bad.append(str(tmp_path / "in" / "huge.png"))
    results = tmp_path / "r.csv"
    capsys.readouterr()
    assert predict.main(["-m", str(classifier), "-i", *bad, "-o", str(results), "--num-workers", "0"]) == 2
    out, err = capsys.readouterr()
    line = error_line(err)
    assert "none of the 3 input image(s) could be read" in line and bad[0] in line
    assert all(f"{p}: unreadable (" in out for p in bad)
    assert f"{bad[2]}: unreadable (too large to decode safely" in out
    assert not results.exists()


def test_unet_predict_skips_and_lists_bad_images(unet, tmp_path, capsys):
    good = tmp_path / "in" / "good.png"
    good.parent.mkdir()
    Image.fromarray(_picture(16)).save(good)
    bad = _unreadable(tmp_path / "in")
    capsys.readouterr()
    assert predict.main(["-m", str(unet), "-i", bad[0], str(good), bad[1]]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "in" / "good_OUT.png").is_file()
    assert not any((tmp_path / "in" / f"{Path(p).stem}_OUT.png").exists() for p in bad)
    assert all(f"{p}: unreadable (" in out for p in bad)
    assert "1 image(s) predicted, 2 unreadable and skipped" in out
    assert predict.main(["-m", str(unet), "-i", *bad]) == 2
    line = error_line(capsys.readouterr().err)
    assert "none of the 2 input image(s) could be read" in line and bad[0] in line


# ------------------------------------------------------------------ EXIF orientation


def _phone_photo(path: Path, how: str) -> None:
    """A stored 48 x 40 picture with a bright block at its top-left, to be shown turned 90 degrees
    clockwise (orientation 6): upright it is 40 x 48 with the block at the top-right. how: EXIF in a
    JPEG, XMP only in a JPEG, EXIF in a PNG."""
    arr = np.full((40, 48, 3), 30, np.uint8)
    arr[:16, :16] = (250, 240, 230)
    img = Image.fromarray(arr)
    if how == "xmp":
        xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-'
               b'ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
               b"</rdf:RDF></x:xmpmeta>")
        img.save(path, quality=95, xmp=xmp)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    with Image.open(path) as check:
        assert im.orientation(check) == 6 or path.suffix == ".png"  # (a PNG's is read when decoded)


@pytest.mark.parametrize("how, name", [("exif", "phone.jpg"), ("xmp", "phone_xmp.jpg"),
                                       ("exif", "phone.png")])
def test_orientation_is_applied_alike_in_training_cache_and_predict(tmp_path, how, name):
    from common.data.batch_aug import BatchAugment

    path = tmp_path / name
    _phone_photo(path, how)
    pre = im.preprocessing(16)
    loader_x = im.ImageDataset([(str(path), 0)], im.eval_transform(pre))[0][0]
    predict_x = ImageFiles([path], pre)[0][0]
    cache = build_image_cache([(str(path), 0)], pre["resize_size"], cache_dir=tmp_path / "c",
                              data_root=tmp_path, skip_bad=False, show_progress=False, log=lambda _: None)
    cache_x = BatchAugment(16, pre["mean"], pre["std"], kind="eval").apply(cache.images.clone(), None)[0]
    assert loader_x.shape == predict_x.shape == cache_x.shape == (3, 16, 16)
    assert np.array_equal(predict_x.numpy(), loader_x.numpy())
    assert float((cache_x - loader_x).abs().mean()) < 0.1  # two resizers, within a few grey levels
    brightness = loader_x.mean(dim=0)
    # upright (40 x 48 resized and centre-cropped): the bright block is at the top right
    assert brightness[:3, -3:].mean() > brightness[:3, :3].mean() + 1.0
    upright = np.asarray(im.load_rgb(path))
    assert upright.shape == (48, 40, 3) and upright[:12, -12:].min() > 200


def test_a_mask_with_an_orientation_is_read_upright(tmp_path):
    stored = np.zeros((40, 48), np.uint8)
    stored[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "m.png", exif=exif.tobytes())
    mask = seg.read_mask(tmp_path / "m.png")
    assert mask.shape == (48, 40) and mask[:16, -16:].min() == 255 and mask[:16, :16].max() == 0


def test_unet_paths_use_the_upright_image(tmp_path):
    """An oriented photo and a mask drawn on the upright view (40 x 48) pair up: check_pairs compares
    the upright size, the dataset and the cache read the image upright."""
    from common.data.cache import pair_cache_size

    root = tmp_path / "d"
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    _phone_photo(root / "imgs" / "a.jpg", "exif")
    mask = np.zeros((48, 40), np.uint8)
    mask[:16, -16:] = 255  # the bright block, upright
    Image.fromarray(mask).save(root / "masks" / "a_mask.png")
    pairs = seg.find_pairs(root)
    assert seg.check_pairs(pairs, "fast", show_progress=False) == [0, 255]
    assert pair_cache_size(pairs, 1.0) == (40, 48)
    x, y = seg.SegmentationDataset(pairs, [0, 255], scale=1.0)[0]
    assert tuple(x.shape) == (3, 48, 40) and tuple(y.shape) == (48, 40)
    assert x[:, :12, -12:].mean() > 0.8 and x[:, :12, :12].mean() < 0.3
    assert y[:12, -12:].min() == 1 and y[:12, :12].max() == 0

