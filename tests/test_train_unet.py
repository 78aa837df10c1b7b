"""train_unet.py end to end on generated shapes, masks from predict.py, validate.py's Dice,
and the guide's accumulation promise for segmentation."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import predict
import train_unet
import validate
from common.checkpoint import load_checkpoint
from common.data.segmentation import make_shapes_dataset
from common.engine import StepConfig, TrainState, train_one_epoch
from common.optim import Schedule
from common.precision import make_precision
from common.tasks import SegmentationTask

FAST = ["-s", "1", "--width", "8", "-l", "3e-3", "--num-workers", "0", "--log-interval", "2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", n=24, size=32)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unet") / "checkpoints"
    assert train_unet.main(["--data-dir", str(shapes), "--output", str(out), "-e", "3", "-b", "4",
                            "-v", "25", "--keep-last", "2", *FAST]) == 0
    return out


def test_outputs_and_checkpoint_contents(trained):
    for name in ("checkpoint.pth", "best_model.pth", "metrics.csv", "training.log", "curves.png",
                 "val_samples.png", "config.json"):
        assert (trained / name).is_file(), name
    state = load_checkpoint(trained / "checkpoint.pth", need_train_state=True)["train_state"]
    best_epoch = state["best_epoch"]
    assert sorted(p.name for p in trained.glob("checkpoint_epoch*.pth")) == sorted(
        {f"checkpoint_epoch{n}.pth" for n in (2, 3, best_epoch)})  # --keep-last 2, and the best epoch's
    ckpt = load_checkpoint(trained / "best_model.pth", task="segmentation")
    assert ckpt["mask_values"] == [0, 255]
    assert ckpt["model"]["kwargs"] == {"num_classes": 2, "bilinear": False, "base": 8}
    assert ckpt["preprocessing"]["scale"] == 1.0
    # changed on purpose (issue 12): an epoch checkpoint holds weights and metadata, not a resume state
    epoch3 = load_checkpoint(trained / "checkpoint_epoch3.pth", task="segmentation")
    assert "train_state" not in epoch3 and epoch3["mask_values"] == [0, 255]
    assert state["epoch"] == 3  # checkpoint.pth is the one resume state
    grid = Image.open(trained / "val_samples.png")
    assert grid.width >= 3 * 200  # input | true mask | predicted mask, titled, each panel readable


def test_validate_reports_dice_and_predict_writes_masks(trained, shapes, tmp_path, capsys):
    results = tmp_path / "v.json"
    assert validate.main(["--model", str(trained / "best_model.pth"), "--data-dir", str(shapes),
                          "--results-file", str(results), "--num-workers", "0"]) == 0
    metrics = json.loads(results.read_text())["metrics"]
    assert 0.0 <= metrics["iou"] <= metrics["dice"] <= 1.0
    image = sorted((shapes / "imgs").iterdir())[0]
    out = tmp_path / "mask.png"
    capsys.readouterr()
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", str(image), "-o", str(out), "-v"]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}  # original values and size
    assert (tmp_path / "mask_viz.png").is_file()
    assert "foreground" in capsys.readouterr().out
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", str(image), "-c", "3"]) == 2
    assert "-c 3 contradicts" in capsys.readouterr().err
    jpeg = tmp_path / "mask.jpg"  # written (an image), with a word on what JPEG does to mask values
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", str(image), "-o", str(jpeg)]) == 0
    assert f"notice: {jpeg}: JPEG compression changes some mask values" in capsys.readouterr().out
    assert Image.open(jpeg).format == "JPEG"


def test_default_output_name_and_no_save(trained, shapes, tmp_path):
    image = tmp_path / "photo.png"
    Image.open(sorted((shapes / "imgs").iterdir())[1]).save(image)
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", str(image), "-n"]) == 0
    assert not (tmp_path / "photo_OUT.png").exists()
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", str(image)]) == 0
    assert (tmp_path / "photo_OUT.png").is_file()


def test_load_accepts_another_trainers_state_dict_with_mask_values(trained, shapes, tmp_path, capsys):
    state = load_checkpoint(trained / "best_model.pth")["state_dict"]
    foreign = tmp_path / "other_unet.pth"
    torch.save({**state, "mask_values": [0, 1]}, foreign)
    capsys.readouterr()
    assert train_unet.main(["--data-dir", str(shapes), "--output", str(tmp_path / "o"), "-e", "1",
                            "-b", "4", "-f", str(foreign), *FAST]) == 0
    assert f"weights: loaded {len(state)}/{len(state)} tensors from {foreign}" in capsys.readouterr().out


def test_bad_segmentation_input_is_one_line(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.new("RGB", (20, 20)).save(data / "imgs" / "lonely.png")
    Image.new("RGB", (20, 20)).save(data / "imgs" / "paired.png")
    Image.new("L", (20, 20)).save(data / "masks" / "paired_mask.png")
    capsys.readouterr()
    assert train_unet.main(["--data-dir", str(data), "--output", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lonely" in err and "Traceback" not in err
    assert train_unet.main(["--data-dir", str(shapes), "--output", str(tmp_path / "o"), "-c", "3",
                            *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "-c" in err
    assert not (tmp_path / "o").exists()


class TinySeg(nn.Module):
    """Convolutions without batch norm: batch splits give identical updates."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.net(x)


def test_b2_with_accumulation_4_equals_b8_including_a_short_last_group():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(44, 3, 16, 16, generator=g), torch.randint(0, 2, (44, 16, 16), generator=g)
    torch.manual_seed(0)
    small, big = TinySeg(), None
    big = copy.deepcopy(small)

    def run(model, batch, accumulate):
        data = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 44, batch)]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        steps = -(-len(data) // accumulate)
        state = TrainState()
        train_one_epoch(model, SegmentationTask(2), data, opt, Schedule(opt, "none", epochs=1,
                        steps_per_epoch=steps), make_precision(torch.device("cpu"), amp=False),
                        torch.device("cpu"), StepConfig(accumulate=accumulate, show_progress=False), state)
        return state.step

    # 44 samples: -b 8 gives 5 batches of 8 and a short one of 4; -b 2 x 4 gives the same 6
    # groups (the last one of 2 micro-batches, weighted by its real size)
    assert run(small, 2, 4) == 6 and run(big, 8, 1) == 6
    for a, b in zip(small.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_out_of_memory_turns_on_checkpointing_and_training_goes_on(shapes, tmp_path, monkeypatch):
    """An injected CUDA out-of-memory error in the U-Net: checkpointing goes on, the epoch is not
    lost, and checkpoint.pth remembers it for a resume."""
    from common.models.unet import UNet

    original = UNet.forward
    raised = []

    def forward(self, x):
        # a training batch of 4 (the memory check's dry run before training uses 2 inputs)
        if self.training and not self.grad_checkpointing and x.shape[0] == 4:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, x)

    monkeypatch.setattr(UNet, "forward", forward)
    out = tmp_path / "o"
    assert train_unet.main(["--data-dir", str(shapes), "--output", str(out), "-e", "1", "-b", "4",
                            *FAST]) == 0
    assert raised == [1]
    ts = load_checkpoint(out / "checkpoint.pth")["train_state"]
    assert ts["grad_checkpointing"] is True and ts["micro_batch"] == 4 and ts["epoch"] == 1
    assert "turned on gradient checkpointing" in (out / "training.log").read_text()


def test_export_onnx_handles_a_unet(trained, tmp_path):
    import onnx
    import onnxruntime

    import export_onnx

    out = tmp_path / "unet.onnx"
    assert export_onnx.main(["--model", str(trained / "best_model.pth"), "--output", str(out),
                             "--img-size", "32"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == "segmentation" and json.loads(meta["mask_values"]) == [0, 255]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.random.rand(3, 3, 32, 32).astype(np.float32)})
    assert logits.shape == (3, 2, 32, 32)  # dynamic batch, a class map per pixel


def test_test_model_checks_a_unet(trained, shapes, capsys):
    import test_model

    capsys.readouterr()
    assert test_model.main(["--model-path", str(trained / "best_model.pth"), "--data-dir", str(shapes),
                            "--batch-size", "4", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> masks (4, 2, 64, 64)" in out
    assert "quick evaluation: Dice" in out and "(8 pairs)" in out


def test_predict_masks_give_the_dice_validate_reports(trained, shapes, tmp_path):
    """At scale 1, the masks predict.py writes score exactly the Dice that validate.py prints."""
    from common.data.segmentation import find_pairs, mask_to_index, read_mask
    from common.tasks import dice_iou_per_image

    pairs = find_pairs(shapes)
    outs = [str(tmp_path / f"{Path(img).stem}.png") for img, _ in pairs]
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", *[img for img, _ in pairs],
                         "-o", *outs]) == 0
    scores = []
    for (_, mask), out in zip(pairs, outs, strict=True):
        truth = torch.from_numpy(mask_to_index(read_mask(mask), [0, 255]))[None]
        guess = torch.from_numpy(mask_to_index(np.asarray(Image.open(out)), [0, 255]))[None]
        scores.append(float(dice_iou_per_image(guess, truth, range(1, 2))[0]))
    results = tmp_path / "v.json"
    assert validate.main(["--model", str(trained / "best_model.pth"), "--data-dir", str(shapes),
                          "--results-file", str(results), "--num-workers", "0"]) == 0
    reported = json.loads(results.read_text())["metrics"]["dice"]
    assert sum(scores) / len(scores) == pytest.approx(reported, abs=1e-6)


def test_acceptance_demo_shapes_reach_dice_090_on_cpu(tmp_path):
    """The issue's acceptance: a few hundred generated 64x64 shapes, val Dice >= 0.90 on a CPU
    in well under a few minutes (about 40 s on 2 cores)."""
    out = tmp_path / "checkpoints"
    assert train_unet.main(["--demo", "--data-dir", str(tmp_path / "data"), "--output", str(out),
                            "--num-workers", "0"]) == 0
    best = load_checkpoint(out / "best_model.pth")["metrics"]
    assert best["val_dice"] >= 0.90
    assert len(list((tmp_path / "data" / "imgs").iterdir())) == 300


def test_bilinear_flag_contradiction_and_tensorboard_image_grid(trained, shapes, capsys):
    image = str(sorted((shapes / "imgs").iterdir())[0])
    capsys.readouterr()
    assert predict.main(["-m", str(trained / "best_model.pth"), "-i", image, "--bilinear", "-n"]) == 2
    assert "--bilinear contradicts" in capsys.readouterr().err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    assert "val/input_true_predicted" in events.Tags()["images"]
    assert "val/dice" in events.Tags()["scalars"]


def test_images_of_different_sizes_need_batch_one(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "masks").mkdir()
    for name, side in (("a", 32), ("b", 32), ("c", 40)):
        Image.new("RGB", (side, side), (200, 10, 10)).save(data / "imgs" / f"{name}.png")
        mask = Image.new("L", (side, side), 0)
        mask.paste(255, (0, 0, side // 2, side // 2))
        mask.save(data / "masks" / f"{name}_mask.png")
    capsys.readouterr()
    assert train_unet.main(["--data-dir", str(data), "--output", str(tmp_path / "o"), "-b", "2",
                            "-v", "34", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: images differ in size") and "-b 1" in err and "Traceback" not in err
    assert train_unet.main(["--data-dir", str(data), "--output", str(tmp_path / "o"), "-b", "1",
                            "-v", "34", "-e", "1", *FAST]) == 0
