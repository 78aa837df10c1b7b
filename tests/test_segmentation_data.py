"""common/data/segmentation.py: pairing, mask values, checks, the dataset, splits, shapes set."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import segmentation as seg
from common.errors import UserError


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def _rgb(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _binary(h: int = 8, w: int = 8, fg: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 4] = fg
    return mask


def _palette_png(path: Path, index: np.ndarray) -> Path:
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * (256 * 3 - 9))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ---------------------------------------------------------------- pairing


def test_find_pairs_matches_masks_with_mask_suffix_and_reports_extra_masks(tmp_path):
    _save(tmp_path / "imgs" / "cat1.jpg", _rgb())
    _save(tmp_path / "imgs" / "dog.png", _rgb())
    _save(tmp_path / "masks" / "cat1_mask.gif", _binary(), "L")
    _save(tmp_path / "masks" / "dog_mask.png", _binary(), "L")
    _save(tmp_path / "masks" / "orphan_mask.png", _binary(), "L")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    messages: list[str] = []
    pairs = seg.find_pairs(tmp_path, log=messages.append)
    assert [(Path(i).name, Path(m).name) for i, m in pairs] == [
        ("cat1.jpg", "cat1_mask.gif"), ("dog.png", "dog_mask.png")]
    assert len(messages) == 1 and "1 masks without an image" in messages[0]
    assert "orphan_mask.png" in messages[0]


def test_find_pairs_leaves_out_what_predict_wrote_into_imgs(tmp_path):
    """predict.py without -o writes <name>_OUT.png (and <name>_OUT_viz.png) beside its input: run on
    an image of imgs/, that file must not stop the next training or validation as a maskless image."""
    _save(tmp_path / "imgs" / "cat.png", _rgb())
    _save(tmp_path / "masks" / "cat_mask.png", _binary(), "L")
    _save(tmp_path / "imgs" / "cat_OUT.png", _binary(), "L")
    _save(tmp_path / "imgs" / "cat_OUT_viz.png", _rgb())
    _save(tmp_path / "imgs" / "scan_OUT.png", _rgb())  # an image of the user's own with that name...
    _save(tmp_path / "masks" / "scan_OUT_mask.png", _binary(), "L")  # ...and a mask: it is an image
    messages: list[str] = []
    pairs = seg.find_pairs(tmp_path, log=messages.append)
    assert [Path(i).name for i, _ in pairs] == ["cat.png", "scan_OUT.png"]
    assert messages == [f"notice: ignored 2 file(s) in {tmp_path / 'imgs'} that predict.py wrote "
                        "(<name>_OUT.png, without a mask): cat_OUT.png, cat_OUT_viz.png; "
                        "move them out of imgs/"]
    (tmp_path / "imgs" / "dog.png").write_bytes((tmp_path / "imgs" / "cat.png").read_bytes())
    with pytest.raises(UserError, match="1 of 5 images .* have no mask .*: dog.png;"):
        seg.find_pairs(tmp_path)  # an image without a mask is still an error


def test_find_pairs_of_only_predict_outputs_is_an_error(tmp_path):
    _save(tmp_path / "imgs" / "a_OUT.png", _binary(), "L")
    _save(tmp_path / "masks" / "b_mask.png", _binary(), "L")
    with pytest.raises(UserError, match="holds only files predict.py wrote"):
        seg.find_pairs(tmp_path)


def test_find_pairs_accepts_the_same_stem(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / "imgs" / f"{name}.jpg", _rgb())
        _save(tmp_path / "masks" / f"{name}.png", _binary(), "L")
    pairs = seg.find_pairs(tmp_path)
    assert [(Path(i).name, Path(m).name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.jpg", "b.png")]


def test_find_pairs_with_explicit_suffix_requires_it(tmp_path):
    _save(tmp_path / "imgs" / "a.jpg", _rgb())
    _save(tmp_path / "masks" / "a.png", _binary(), "L")
    with pytest.raises(UserError, match="a.jpg"):
        seg.find_pairs(tmp_path, mask_suffix="_mask")


def test_image_without_mask_is_an_error_naming_it(tmp_path):
    for i in range(8):
        _save(tmp_path / "imgs" / f"img{i}.png", _rgb())
    _save(tmp_path / "masks" / "img0_mask.png", _binary(), "L")
    with pytest.raises(UserError) as err:
        seg.find_pairs(tmp_path)
    text = str(err.value)
    assert "7 of 8 images" in text and "img1.png" in text and "(and 2 more)" in text
    assert "img0.png" not in text
    assert "img1_mask.png" in text  # how to name the mask


def test_two_masks_for_one_image_is_an_error(tmp_path):
    _save(tmp_path / "imgs" / "a.png", _rgb())
    _save(tmp_path / "masks" / "a.png", _binary(), "L")
    _save(tmp_path / "masks" / "a_mask.png", _binary(), "L")
    with pytest.raises(UserError, match=r"a.png -> a.png and a_mask.png"):
        seg.find_pairs(tmp_path)
    (tmp_path / "masks" / "a_mask.png").unlink()
    _save(tmp_path / "masks" / "a.gif", _binary(), "L")
    with pytest.raises(UserError, match=r"a.png -> a.gif and a.png"):
        seg.find_pairs(tmp_path)


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        seg.find_pairs(tmp_path / "nowhere")
    _save(tmp_path / "masks" / "a.png", _binary(), "L")
    with pytest.raises(UserError, match=r"no imgs/ folder .*imgs/ and their masks in"):
        seg.find_pairs(tmp_path)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(UserError, match=r"imgs holds no images"):
        seg.find_pairs(tmp_path)
    _save(tmp_path / "imgs" / "a.png", _rgb())
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(UserError, match=r"masks holds no images"):
        seg.find_pairs(tmp_path)


# ---------------------------------------------------------------- mask values


def test_mask_values_of_grayscale_masks(tmp_path):
    zero_one = [_save(tmp_path / f"a{i}.png", _binary(fg=1), "L") for i in range(2)]
    assert seg.discover_mask_values([str(p) for p in zero_one]) == [0, 1]
    zero_255 = _save(tmp_path / "b.png", _binary(fg=255), "L")
    values = seg.discover_mask_values([str(zero_255)])
    assert values == [0, 255] and all(type(v) is int for v in values)
    bits = tmp_path / "bits.png"
    Image.fromarray(_binary() > 0).save(bits)  # mode "1"
    assert Image.open(bits).mode == "1"
    assert seg.discover_mask_values([str(bits)]) == [0, 1]
    grey_rgb = _save(tmp_path / "grey_rgb.png", np.repeat(_binary()[..., None], 3, axis=2))
    assert seg.discover_mask_values([str(grey_rgb)]) == [0, 255]  # equal channels: grayscale


def test_mask_values_of_colour_masks_are_rgb_lists(tmp_path):
    first = np.zeros((6, 6, 3), np.uint8)
    first[:3] = (128, 0, 0)
    second = np.zeros((6, 6, 3), np.uint8)
    second[:, :2] = (0, 128, 0)
    paths = [str(_save(tmp_path / "a.png", first)), str(_save(tmp_path / "b.png", second))]
    assert seg.discover_mask_values(paths) == [[0, 0, 0], [0, 128, 0], [128, 0, 0]]


def test_mask_values_of_class_index_pngs_are_the_indices(tmp_path):
    index = np.zeros((6, 6), np.uint8)
    index[:2], index[4:] = 1, 2
    path = _palette_png(tmp_path / "voc.png", index)
    assert Image.open(path).mode == "P"
    assert seg.discover_mask_values([str(path)]) == [0, 1, 2]  # not the palette's colours
    np.testing.assert_array_equal(seg.read_mask(path), index)


def test_mask_to_index_maps_values_to_their_position():
    mask = np.array([[0, 255, 255], [128, 0, 255]], np.uint8)
    np.testing.assert_array_equal(seg.mask_to_index(mask, [0, 128, 255]), [[0, 2, 2], [1, 0, 2]])
    assert seg.mask_to_index(mask, [0, 128, 255]).dtype == np.int64
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 1] = (255, 0, 0)
    colour[1, 0] = (0, 0, 255)
    values = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]
    np.testing.assert_array_equal(seg.mask_to_index(colour, values), [[0, 2], [1, 0]])
    with pytest.raises(UserError, match=r"values 128 that are not mask values"):
        seg.mask_to_index(mask, [0, 255], name="mask x.png")


def test_index_to_mask_inverts_mask_to_index():
    mask = np.array([[0, 255], [128, 0]], np.uint8)
    values = [0, 128, 255]
    back = seg.index_to_mask(seg.mask_to_index(mask, values), values)
    np.testing.assert_array_equal(back, mask)
    assert back.dtype == np.uint8
    colour = seg.index_to_mask(np.array([[0, 1]]), [[0, 0, 0], [9, 8, 7]])
    np.testing.assert_array_equal(colour, [[[0, 0, 0], [9, 8, 7]]])


def test_check_classes_agrees_with_the_mask_values():
    seg.check_classes([0, 255], 2)
    seg.check_classes([0, 255], 1)  # one foreground channel
    seg.check_classes([0, 1, 2], 3)
    with pytest.raises(UserError) as err:
        seg.check_classes([0, 1, 2], 2)
    assert "expects 2 distinct mask values" in str(err.value) and "0, 1, 2" in str(err.value)
    assert "pass -c 3" in str(err.value)
    with pytest.raises(UserError, match=r"pass -c 2 \(or -c 1"):
        seg.check_classes([0, 255], 5)
    with pytest.raises(UserError, match="expects 2"):
        seg.check_classes([0, 1, 2], 1)
    with pytest.raises(UserError, match="JPEG"):
        seg.check_classes(list(range(60)), 2)
    with pytest.raises(UserError, match="single value 0"):
        seg.check_classes([0], 2)


# ---------------------------------------------------------------- checks


def test_check_pairs_returns_values_and_names_size_mismatches(tmp_path):
    good = (_save(tmp_path / "imgs" / "a.png", _rgb(8, 10)), _save(tmp_path / "masks" / "a.png",
                                                                     _binary(8, 10, fg=1), "L"))
    pairs = [(str(i), str(m)) for i, m in [good]]
    assert seg.check_pairs(pairs) == [0, 1]
    wrong = (_save(tmp_path / "imgs" / "b.png", _rgb(8, 10)), _save(tmp_path / "masks" / "b.png",
                                                                      _binary(6, 10), "L"))
    pairs.append((str(wrong[0]), str(wrong[1])))
    with pytest.raises(UserError) as err:
        seg.check_pairs(pairs)
    text = str(err.value)
    assert "1 of 2" in text and str(wrong[0]) in text and str(wrong[1]) in text
    assert "10x8" in text and "10x6" in text


def test_check_pairs_names_unreadable_images_and_masks(tmp_path):
    image = _save(tmp_path / "a.png", _rgb())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    mask = _save(tmp_path / "m.png", _binary(), "L")
    with pytest.raises(UserError, match=r"image .*broken.png: not an image file"):
        seg.check_pairs([(str(broken), str(mask))])
    with pytest.raises(UserError, match=r"mask .*empty.png: empty file"):
        seg.check_pairs([(str(image), str(empty))])
    with pytest.raises(UserError, match=r"mask .*broken.png: not an image file"):
        seg.read_mask(broken)


# ---------------------------------------------------------------- dataset


def _blocky_pair(tmp_path: Path, name: str = "p", w: int = 20, h: int = 12) -> tuple[str, str, np.ndarray]:
    """A mask of 2x2 blocks with values 0/255 and a photo-like image; returns the block values."""
    rng = np.random.default_rng(1)
    blocks = (rng.random((h // 2, w // 2)) < 0.5).astype(np.uint8)
    mask = np.kron(blocks, np.ones((2, 2), np.uint8)) * 255
    image = _save(tmp_path / "imgs" / f"{name}.png", _rgb(h, w))
    mask_path = _save(tmp_path / "masks" / f"{name}.png", mask, "L")
    return str(image), str(mask_path), blocks


def test_dataset_returns_float_image_and_class_indices(tmp_path):
    image, mask, blocks = _blocky_pair(tmp_path)
    x, y = seg.SegmentationDataset([(image, mask)], [0, 255], scale=1.0)[0]
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    torch.testing.assert_close(x, torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1) / 255.0)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), np.kron(blocks, np.ones((2, 2), np.int64)))
    x1, _ = seg.SegmentationDataset([(image, mask)], [0, 255], scale=1.0, in_chans=1)[0]
    assert x1.shape == (1, 12, 20)


def test_scale_halves_image_and_mask_with_nearest_neighbour_masks(tmp_path):
    image, mask, blocks = _blocky_pair(tmp_path)
    x, y = seg.SegmentationDataset([(image, mask)], [0, 255], scale=0.5)[0]
    assert x.shape == (3, 6, 10) and y.shape == (6, 10)
    assert set(torch.unique(y).tolist()) <= {0, 1}  # no interpolated in-between values
    np.testing.assert_array_equal(y.numpy(), blocks)  # each 2x2 block becomes its own value
    expected = np.array(Image.open(image).resize((10, 6), Image.BICUBIC)).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)


def test_scale_of_odd_sizes_rounds_down_and_keeps_class_values(tmp_path):
    rng = np.random.default_rng(3)
    mask = rng.choice(np.array([0, 100, 200], np.uint8), size=(45, 37))
    image = _save(tmp_path / "i.png", _rgb(45, 37))
    mask_path = _save(tmp_path / "m.png", mask, "L")
    x, y = seg.SegmentationDataset([(str(image), str(mask_path))], [0, 100, 200], scale=0.5)[0]
    assert x.shape == (3, 22, 18) and y.shape == (22, 18)
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}
    assert seg.scaled_size((37, 45), 0.5) == (18, 22) and seg.scaled_size((3, 1), 0.1) == (1, 1)


def test_colour_masks_become_class_indices(tmp_path):
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[:, 8:] = (0, 128, 0)
    colour[:4] = (128, 0, 0)
    image = _save(tmp_path / "i.png", _rgb(16, 16))
    mask = _save(tmp_path / "m.png", colour)
    values = seg.discover_mask_values([str(mask)])
    _, y = seg.SegmentationDataset([(str(image), str(mask))], values, scale=1.0)[0]
    assert y[8, 0] == 0 and y[8, 12] == 1 and y[0, 0] == 2


def test_augment_flips_image_and_mask_together(tmp_path):
    """The image is white exactly where the mask is foreground, in an asymmetric L shape:
    every flip must keep that correspondence, and all four orientations must occur."""
    mask = np.zeros((16, 16), np.uint8)
    mask[1:12, 2:5] = 255
    mask[9:12, 2:10] = 255
    image = np.repeat(mask[..., None], 3, axis=2)
    pair = (str(_save(tmp_path / "i.png", image)), str(_save(tmp_path / "m.png", mask, "L")))
    data = seg.SegmentationDataset([pair], [0, 255], scale=1.0, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(24):
        x, y = data[0]
        assert torch.equal(x[0] > 0.5, y == 1)
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == 4
    plain = seg.SegmentationDataset([pair], [0, 255], scale=1.0, augment=False)
    assert {tuple(plain[0][1].flatten().tolist()) for _ in range(5)} == {tuple((mask // 255).flatten())}
    no_vflip = seg.SegmentationDataset([pair], [0, 255], scale=1.0, augment=True, vflip=False)
    assert len({tuple(no_vflip[0][1].flatten().tolist()) for _ in range(24)}) == 2


def test_dataset_names_both_files_when_sizes_differ(tmp_path):
    image = _save(tmp_path / "i.png", _rgb(8, 8))
    mask = _save(tmp_path / "m.png", _binary(8, 9), "L")
    with pytest.raises(UserError) as err:
        seg.SegmentationDataset([(str(image), str(mask))], [0, 255], scale=1.0)[0]
    assert str(image) in str(err.value) and str(mask) in str(err.value) and "8x8" in str(err.value)


def test_dataset_is_picklable_for_spawn_workers(tmp_path):
    image, mask, _ = _blocky_pair(tmp_path)
    data = seg.SegmentationDataset([(image, mask)], [0, 255], scale=0.5, augment=False)
    clone = pickle.loads(pickle.dumps(data))
    assert len(clone) == 1
    assert torch.equal(clone[0][1], data[0][1])


def test_dataset_rejects_bad_scale():
    with pytest.raises(UserError, match="scale"):
        seg.SegmentationDataset([], [0, 1], scale=0.0)


# ---------------------------------------------------------------- splits


def test_split_pairs_sizes_and_determinism():
    pairs = [(f"i{i:02d}.png", f"m{i:02d}.png") for i in range(20)]
    train, val = seg.split_pairs(pairs, 10.0, seed=0)
    assert len(val) == 2 and len(train) == 18
    assert sorted(train + val) == pairs
    assert seg.split_pairs(pairs, 10.0, seed=0) == (train, val)
    assert seg.split_pairs(list(reversed(pairs)), 10.0, seed=0) == (train, val)
    others = {tuple(seg.split_pairs(pairs, 10.0, seed=s)[1]) for s in range(1, 6)}
    assert others - {tuple(val)}
    assert len(seg.split_pairs(pairs, 50.0, seed=0)[1]) == 10
    assert len(seg.split_pairs(pairs[:3], 10.0, seed=0)[1]) == 1  # at least one
    assert len(seg.split_pairs(pairs[:2], 99.0, seed=0)[0]) == 1  # at least one to train on
    with pytest.raises(UserError, match="at least 2"):
        seg.split_pairs(pairs[:1], 10.0, seed=0)
    with pytest.raises(UserError, match="between 0 and 100"):
        seg.split_pairs(pairs, 0.0, seed=0)


# ---------------------------------------------------------------- generated set


def test_make_shapes_dataset_writes_pairs_with_binary_masks(tmp_path):
    root = seg.make_shapes_dataset(tmp_path / "shapes", n=12, size=32, seed=1)
    pairs = seg.find_pairs(root)
    assert len(pairs) == 12
    assert all(Path(m).name == Path(i).stem + "_mask.png" for i, m in pairs)
    for image, mask in pairs:
        with Image.open(mask) as m, Image.open(image) as i:
            assert m.mode == "L" and m.size == i.size == (32, 32) and i.mode == "RGB"
            assert set(np.unique(np.array(m)).tolist()) == {0, 255}
    assert seg.check_pairs(pairs) == [0, 255]
    mtime = Path(pairs[0][1]).stat().st_mtime_ns
    seg.make_shapes_dataset(root, n=12, size=32, seed=1)  # the same set: reused as it is
    assert Path(pairs[0][1]).stat().st_mtime_ns == mtime
    assert len(seg.find_pairs(seg.make_shapes_dataset(root, n=5, size=32, seed=1))) == 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    with pytest.raises(UserError, match="not the generated shapes set"):
        seg.make_shapes_dataset(tmp_path / "mine", n=2)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me"


def test_shapes_images_differ_where_the_mask_is_foreground(tmp_path):
    """The task is learnable: shape pixels differ in colour from the background."""
    root = seg.make_shapes_dataset(tmp_path, n=6, size=48, seed=2)
    for image, mask in seg.find_pairs(root):
        x, y = seg.SegmentationDataset([(image, mask)], [0, 255], scale=1.0)[0]
        inside, outside = x[:, y == 1].mean(1), x[:, y == 0].mean(1)
        assert (inside - outside).abs().sum() > 0.25
