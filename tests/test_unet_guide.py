"""Guide 002 (U-Net) as written: its small-memory recipes at -s 0.25 -b 1, checkpoint_epoch{N}.pth
files of about the weights' size that every tool loads, -f/--load vs --resume, Pytorch-UNet's own
state_dicts in every tool, predict's -n/-v/-t, and a readable val_samples.png (issue 12)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST as CLASSIFY_FAST
from conftest import make_folder
from PIL import Image

import export_onnx
import gpu_train
import predict
import test_model
import train_unet
import validate
from common import reporting
from common.checkpoint import load_checkpoint
from common.data import segmentation as seg
from common.errors import UserError
from common.inference import load_for_inference
from common.models.unet import UNet

FAST = ["--width", "8", "-l", "3e-3", "--num-workers", "0", "--log-interval", "2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    """Ten 64x64 shapes: -s 0.25 makes them 16x16, the U-Net's smallest input (1x1 bottleneck)."""
    return seg.make_shapes_dataset(tmp_path_factory.mktemp("guide") / "data", n=10, size=64)


@pytest.fixture(scope="module")
def run(data64, tmp_path_factory) -> dict:
    """Five epochs with the default --keep-last; the figures of val_samples.png are recorded."""
    out = tmp_path_factory.mktemp("run") / "checkpoints"
    figures: list[list[str]] = []
    original = reporting._save

    def spy(fig, path):
        if path.name == "val_samples.png":
            figures.append([ax.get_title() for ax in fig.axes])
        original(fig, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reporting, "_save", spy)
        assert train_unet.main(["--data-dir", str(data64), "--output", str(out), "-e", "5", "-b", "2",
                                "-s", "0.5", "-v", "20", *FAST]) == 0
    return {"out": out, "figures": figures, "data": data64}


def _image(data: Path, index: int = 0) -> str:
    return str(sorted((data / "imgs").iterdir())[index])


# ---------------------------------------------------------------- -s 0.25 -b 1


@pytest.mark.parametrize("recipe", [
    ["-b", "1", "-s", "0.25", "--bilinear", "--accumulate-grad-batches", "8"],  # the 4 GB recipe
    ["-b", "1", "-s", "0.25", "-v", "50", "-e", "2"],  # the quick check
])
def test_guide_recipes_at_scale_quarter_and_batch_one_train(recipe, data64, tmp_path):
    out = tmp_path / "o"
    assert train_unet.main(["--data-dir", str(data64), "--output", str(out), "-e", "1", *FAST, *recipe]) == 0
    best = load_checkpoint(out / "best_model.pth")
    assert np.isfinite(best["metrics"]["train_loss"]) and 0.0 <= best["metrics"]["val_dice"] <= 1.0
    assert best["preprocessing"]["scale"] == 0.25


def test_scale_below_the_networks_minimum_is_one_line_with_the_smallest_scale(data64, tmp_path, capsys):
    capsys.readouterr()
    assert train_unet.main(["--data-dir", str(data64), "--output", str(tmp_path / "o"), "-b", "1",
                            "-s", "0.2", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -s 0.2 scales image") and "12x12" in err and "pass -s 0.25 or more" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_smallest_scale_and_images_too_small_at_any_scale():
    assert seg.smallest_scale(64, 16) == 0.25
    assert seg.smallest_scale(48, 16) == 0.34 and seg.scaled_size((48, 48), 0.34)[0] == 16
    assert seg.smallest_scale(16, 16) == 1.0 and seg.smallest_scale(15, 16) is None
    pairs = [("a.png", "a_mask.png"), ("b.png", "b_mask.png")]
    seg.check_min_size(pairs, [(64, 64), (100, 40)], 0.4, 16, "the U-Net")  # 25x16: enough
    with pytest.raises(UserError, match=r"b.png \(100x40\) to 20x8 .* pass -s 0.4 or more"):
        seg.check_min_size(pairs, [(64, 64), (100, 40)], 0.2, 16, "the U-Net")
    with pytest.raises(UserError, match=r"b.png is 100x12 pixels, .* even at -s 1"):
        seg.check_min_size(pairs, [(64, 64), (100, 12)], 1.0, 16, "the U-Net")


# ---------------------------------------------------------------- epoch checkpoints


def test_epoch_checkpoints_are_weights_sized_and_the_last_three_and_best_are_kept(run):
    out = run["out"]
    state = load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]
    assert state["epoch"] == 5
    kept = sorted(p.name for p in out.glob("checkpoint_epoch*.pth"))
    assert kept == sorted({f"checkpoint_epoch{n}.pth" for n in (3, 4, 5, state["best_epoch"])})
    model = UNet(2, base=8)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    size = (out / "checkpoint_epoch5.pth").stat().st_size
    assert weights <= size <= 1.05 * weights + 65_536
    assert (out / "checkpoint.pth").stat().st_size > 2 * weights  # the resume state: AdamW's moments too
    epoch5 = load_checkpoint(out / "checkpoint_epoch5.pth", task="segmentation")
    assert "train_state" not in epoch5
    with pytest.raises(UserError, match="checkpoint_epoch"):
        load_checkpoint(out / "checkpoint_epoch5.pth", need_train_state=True)


def test_every_tool_loads_an_epoch_checkpoint(run, tmp_path, capsys):
    out, data = run["out"], run["data"]
    epoch = out / "checkpoint_epoch5.pth"
    image = _image(data)
    masks = [tmp_path / "from_epoch.png", tmp_path / "from_resume_state.png"]
    for model, mask in zip((epoch, out / "checkpoint.pth"), masks, strict=True):
        assert predict.main(["-m", str(model), "-i", image, "-o", str(mask)]) == 0
    assert np.array_equal(np.asarray(Image.open(masks[0])), np.asarray(Image.open(masks[1])))
    assert validate.main(["--model", str(epoch), "--data-dir", str(data), "--num-workers", "0"]) == 0
    assert test_model.main(["--model-path", str(epoch), "--batch-size", "2", "--batches", "1"]) == 0
    assert export_onnx.main(["--model", str(epoch), "--output", str(tmp_path / "e.onnx"),
                             "--img-size", "32"]) == 0
    capsys.readouterr()
    assert train_unet.main(["--data-dir", str(data), "--output", str(tmp_path / "f"), "-e", "1", "-b", "2",
                            "-s", "0.5", "-f", str(epoch), *FAST]) == 0
    log = capsys.readouterr().out
    tensors = len(UNet(2, base=8).state_dict())
    assert f"loaded {tensors}/{tensors} tensors from {epoch}" in log
    # the guide calls -f resuming: it is not, and the log says how to continue that run
    assert ("weights loaded; to continue the run with its optimizer and epoch, use --resume "
            f"(here: --resume {out / 'checkpoint.pth'})") in log


def test_val_samples_png_is_drawn_with_column_titles_at_a_readable_size(run):
    assert run["figures"], "val_samples.png was not drawn with matplotlib"
    assert run["figures"][-1][:3] == ["image", "true mask", "predicted"]
    with Image.open(run["out"] / "val_samples.png") as grid:
        assert grid.width >= 3 * 200 and grid.height >= 2 * 200  # 2 validation samples, 32 px each


# ---------------------------------------------------------------- --load vs --resume


def test_resume_never_reopens_the_load_file(run, tmp_path, capsys):
    start = tmp_path / "start.pth"
    shutil.copy(run["out"] / "checkpoint_epoch5.pth", start)
    out = tmp_path / "o"
    assert train_unet.main(["--data-dir", str(run["data"]), "--output", str(out), "-e", "1", "-b", "2",
                            "-s", "0.5", "-f", str(start), *FAST]) == 0
    start.rename(tmp_path / "moved_away.pth")
    capsys.readouterr()
    assert train_unet.main(["--resume", str(out / "checkpoint.pth"), "-e", "2", "--num-workers", "0"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["load"] is None
    # typed again with --resume, the -f file is not opened either (it is gone)
    assert train_unet.main(["--resume", str(out / "checkpoint.pth"), "-e", "3", "--num-workers", "0",
                            "-f", str(start)]) == 0
    assert f"-f/--load {start} ignored" in capsys.readouterr().out


def test_gpu_train_resume_never_reopens_the_weights_file(tmp_path):
    from common.models import build_model

    data = tmp_path / "data"
    make_folder(data / "train", per_class=4, seed=1)
    make_folder(data / "val", per_class=2, seed=2)
    weights = tmp_path / "weights.pth"
    torch.save(build_model("small_cnn", 2)[0].state_dict(), weights)
    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *CLASSIFY_FAST, "--epochs", "1",
                           "--weights", str(weights)]) == 0
    weights.unlink()
    assert gpu_train.main(["--resume", str(out / "checkpoint.pth"), "--epochs", "2",
                           "--num-workers", "0"]) == 0
    assert load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]["epoch"] == 2


# ---------------------------------------------------------------- Pytorch-UNet's state_dicts


def _pytorch_unet_file(path: Path, state: dict, mask_values=None) -> Path:
    """What Pytorch-UNet's train.py saves: the model's state_dict with a mask_values entry."""
    payload = dict(state)
    if mask_values is not None:
        payload["mask_values"] = mask_values
    torch.save(payload, path)
    return path


def test_predict_gives_the_same_masks_for_a_pytorch_unet_file(run, tmp_path, capsys):
    epoch = run["out"] / "checkpoint_epoch5.pth"
    foreign = _pytorch_unet_file(tmp_path / "MODEL.pth", load_checkpoint(epoch)["state_dict"], [0, 255])
    images = [_image(run["data"], i) for i in range(3)]
    ours = [str(tmp_path / f"ours{i}.png") for i in range(3)]
    theirs = [str(tmp_path / f"theirs{i}.png") for i in range(3)]
    assert predict.main(["-m", str(epoch), "-i", *images, "-o", *ours]) == 0
    capsys.readouterr()
    assert predict.main(["-m", str(foreign), "-i", *images, "-o", *theirs, "-s", "0.5"]) == 0
    assert "Pytorch-UNet layout" in capsys.readouterr().out
    for a, b in zip(ours, theirs, strict=True):
        mask = np.asarray(Image.open(b))
        assert np.array_equal(np.asarray(Image.open(a)), mask) and set(np.unique(mask)) <= {0, 255}
    loaded = load_for_inference(foreign, CPU, tasks=("segmentation",))
    assert loaded.spec["kwargs"] == {"num_classes": 2, "bilinear": False, "base": 8}
    assert loaded.mask_values == [0, 255] and loaded.preprocessing["scale"] == 0.5
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), load_for_inference(epoch, CPU, tasks=("segmentation",)).model(x))


def test_validate_export_and_test_model_accept_a_pytorch_unet_file(run, tmp_path, capsys):
    epoch = run["out"] / "checkpoint_epoch5.pth"
    foreign = _pytorch_unet_file(tmp_path / "MODEL.pth", load_checkpoint(epoch)["state_dict"], [0, 255])
    dice = []
    for model in (epoch, foreign):
        results = tmp_path / f"{model.stem}.json"
        assert validate.main(["--model", str(model), "--data-dir", str(run["data"]), "--num-workers", "0",
                              "--results-file", str(results)]) == 0
        dice.append(json.loads(results.read_text())["metrics"]["dice"])
    assert dice[0] == pytest.approx(dice[1], abs=1e-6)  # the same weights at the same scale (0.5)
    capsys.readouterr()
    assert test_model.main(["--model-path", str(foreign), "--data-dir", str(run["data"]),
                            "--batch-size", "2", "--batches", "1"]) == 0
    assert "quick evaluation: Dice" in capsys.readouterr().out
    onnx_file = tmp_path / "foreign.onnx"
    assert export_onnx.main(["--model", str(foreign), "--output", str(onnx_file), "--img-size", "32"]) == 0
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert meta["task"] == "segmentation" and json.loads(meta["mask_values"]) == [0, 255]


def test_validate_takes_the_scale_a_pytorch_unet_file_does_not_record(run, tmp_path, capsys):
    """Without -s a Pytorch-UNet file is validated at 0.5, and a notice names -s/--scale (a flag
    validate.py has); with -s it is validated at that scale, as the toolkit's checkpoint is with -s."""
    epoch = run["out"] / "checkpoint_epoch5.pth"
    foreign = _pytorch_unet_file(tmp_path / "MODEL.pth", load_checkpoint(epoch)["state_dict"], [0, 255])

    def dice(model: Path, *extra: str) -> tuple[float, float, str]:
        results = tmp_path / "r.json"
        capsys.readouterr()
        assert validate.main(["--model", str(model), "--data-dir", str(run["data"]), "--num-workers", "0",
                              "--results-file", str(results), *extra]) == 0
        payload = json.loads(results.read_text())
        return payload["metrics"]["dice"], payload["scale"], capsys.readouterr().out

    plain, scale, out = dice(foreign)
    assert scale == 0.5 and "pass that scale with -s/--scale" in out
    assert "-s SCALE, --scale SCALE" in validate.build_parser().format_help()
    theirs, scale, out = dice(foreign, "-s", "0.25")
    assert scale == 0.25 and "using -s/--scale 0.25" in out
    ours, scale, _ = dice(epoch, "-s", "0.25")
    assert scale == 0.25 and theirs == pytest.approx(ours, abs=1e-6)
    assert theirs != pytest.approx(plain, abs=1e-9)  # the scale did change what was measured
    capsys.readouterr()
    assert validate.main(["--model", str(foreign), "--data-dir", str(run["data"]), "-s", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: -s/--scale must be above 0 (e.g. 0.5), got 0"
    assert predict.main(["-m", str(foreign), "-i", _image(run["data"], 0), "-s", "-1", "-n"]) == 2
    assert capsys.readouterr().err.strip() == "error: -s/--scale must be above 0 (e.g. 0.5), got -1"


@pytest.mark.parametrize("classes,bilinear,in_chans,base", [(1, True, 3, 4), (3, False, 1, 6)])
def test_the_unets_shape_is_read_from_the_tensors(classes, bilinear, in_chans, base, tmp_path):
    torch.manual_seed(0)
    model = UNet(classes, in_chans=in_chans, bilinear=bilinear, base=base).eval()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from a DataParallel
    file = _pytorch_unet_file(tmp_path / "m.pth", prefixed)
    loaded = load_for_inference(file, CPU, tasks=("segmentation",))
    kwargs = {"num_classes": classes, "bilinear": bilinear, "base": base}
    assert loaded.spec["kwargs"] == (kwargs if in_chans == 3 else {**kwargs, "in_chans": in_chans})
    assert loaded.mask_values == list(range(max(2, classes)))  # none in the file: class indices
    assert any("no mask_values" in note for note in loaded.notes)
    assert loaded.preprocessing["channels"] == in_chans
    x = torch.rand(1, in_chans, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_pytorch_unet_file_with_wrong_mask_values_is_one_line(tmp_path, capsys):
    bad = _pytorch_unet_file(tmp_path / "m.pth", UNet(3, base=4).state_dict(), [0, 255])
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    capsys.readouterr()
    assert predict.main(["-m", str(bad), "-i", str(image)]) == 2
    err = capsys.readouterr().err
    assert "'mask_values' has 2 values but the U-Net has 3 output channel(s)" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- predict -n / -v / -t


def test_no_save_with_viz_writes_nothing(run, tmp_path, capsys):
    image = tmp_path / "photo.png"
    shutil.copy(_image(run["data"]), image)
    capsys.readouterr()
    assert predict.main(["-m", str(run["out"] / "checkpoint_epoch5.pth"), "-i", str(image), "-n", "-v"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    out = capsys.readouterr().out
    assert "-n/--no-save writes no files" in out and "foreground" in out


def test_threshold_notice_once_for_a_softmax_model_and_none_for_one_channel(run, tmp_path, capsys):
    images = [_image(run["data"], i) for i in range(2)]
    two = str(run["out"] / "checkpoint_epoch5.pth")
    capsys.readouterr()
    assert predict.main(["-m", two, "-i", *images, "-n", "-t", "0.3"]) == 0
    assert capsys.readouterr().out.count("-t/--mask-threshold 0.3 is not used") == 1
    assert predict.main(["-m", two, "-i", *images, "-n"]) == 0
    assert "mask-threshold" not in capsys.readouterr().out
    torch.manual_seed(0)
    one = _pytorch_unet_file(tmp_path / "one.pth", UNet(1, base=4).state_dict(), [0, 255])
    outs = []
    for threshold in ("0.01", "0.99"):
        target = tmp_path / f"t{threshold}.png"
        assert predict.main(["-m", str(one), "-i", images[0], "-o", str(target), "-t", threshold]) == 0
        outs.append(np.asarray(Image.open(target)))
    assert "is not used" not in capsys.readouterr().out
    assert (outs[0] == 255).sum() > (outs[1] == 255).sum()  # the threshold does decide here
