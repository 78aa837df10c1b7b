"""Every user mistake ends with one `error:` line naming the file and the fix, exit code 2."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_folder
from PIL import Image

import gpu_train
import predict
import validate
from common.checkpoint import load_checkpoint


def run_train(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = gpu_train.main([*FAST, "--epochs", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return one_error_line(err)


def one_error_line(err: str) -> str:
    """The lines of stderr as a terminal shows them (a progress bar redrawn with \r and cleared
    at the end is not a line of its own)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_data_dir(tmp_path, capsys):
    line = run_train(capsys, "--data-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert str(tmp_path / "nope") in line and "--demo" in line and "train/<class>" in line
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_no_arguments_and_no_dataset_explains_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert gpu_train.main([]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "dataset" in line and "--demo" in line


def test_no_class_folders(tmp_path, capsys):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "train" / "readme.txt").write_text("x")
    line = run_train(capsys, "--data-dir", str(tmp_path / "d"), "--output", str(tmp_path / "o"))
    assert "no class folders" in line and str(tmp_path / "d" / "train") in line


def test_empty_class(dataset, tmp_path, capsys):
    (dataset / "train" / "empty").mkdir()
    (dataset / "val" / "empty").mkdir()
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"))
    assert "holds no images" in line and str(dataset / "train" / "empty") in line


def test_train_and_val_classes_differ(dataset, tmp_path, capsys):
    make_folder(dataset / "val", classes=("extra",), per_class=2)
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"))
    assert "differ" in line and "extra" in line


def test_num_classes_disagrees(dataset, tmp_path, capsys):
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"),
                     "--num-classes", "5")
    assert "--num-classes 5" in line and "2 classes" in line


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {
    "zero.png": b"",
    "truncated.jpg": _jpeg_bytes()[:700],
    "notes.jpg": b"this is not an image at all\n" * 20,
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_is_found_before_epoch_one(dataset, tmp_path, capsys, name):
    bad = dataset / "train" / "top" / name
    bad.write_bytes(BAD_FILES[name])
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"))
    assert str(bad) in line and "--skip-bad-images" in line
    assert not (tmp_path / "o").exists()


def test_truncated_jpeg_found_in_full_mode_too(dataset, tmp_path, capsys):
    bad = dataset / "val" / "top" / "cut.jpg"
    bad.write_bytes(_jpeg_bytes()[:1500])
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"),
                     "--check-images", "full")
    assert str(bad) in line


def test_skip_bad_images_lists_them_and_trains(dataset, tmp_path):
    for name, data in BAD_FILES.items():
        (dataset / "train" / "top" / name).write_bytes(data)
    out = tmp_path / "o"
    assert gpu_train.main([*FAST, "--epochs", "1", "--data-dir", str(dataset), "--output", str(out),
                           "--skip-bad-images"]) == 0
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == sorted(BAD_FILES)
    assert "30 train / 12 val" not in (out / "training.log").read_text()
    assert "32 train / 12 val" in (out / "training.log").read_text()


def test_odd_image_modes_are_converted_not_errors(dataset, tmp_path):
    folder = dataset / "train" / "top"
    base = Image.open(next(folder.glob("*.png"))).convert("RGB")
    base.convert("L").save(folder / "gray.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    out = tmp_path / "o"
    assert gpu_train.main([*FAST, "--epochs", "1", "--data-dir", str(dataset), "--output", str(out),
                           "--check-images", "full"]) == 0
    assert "37 train / 12 val" in (out / "training.log").read_text()


@pytest.fixture
def trained(dataset, tmp_path):
    out = tmp_path / "trained"
    assert gpu_train.main([*FAST, "--epochs", "1", "--data-dir", str(dataset), "--output", str(out)]) == 0
    return out


def test_missing_checkpoint_for_resume_and_validate(dataset, tmp_path, capsys):
    missing = tmp_path / "gone" / "checkpoint.pth"
    assert "does not exist" in run_train(capsys, "--resume", str(missing))
    assert gpu_train.main(["--resume", str(missing)]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err)
    assert validate.main(["--model", str(missing), "--data-dir", str(dataset / "val")]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err)


def test_truncated_checkpoint(trained, dataset, tmp_path, capsys):
    data = (trained / "checkpoint.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert gpu_train.main(["--resume", str(cut)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(cut) in line and "truncated" in line
    assert validate.main(["--model", str(cut), "--data-dir", str(dataset / "val")]) == 2
    assert "truncated" in one_error_line(capsys.readouterr().err)


def test_checkpoint_of_another_task(trained, dataset, tmp_path, capsys):
    ckpt = load_checkpoint(trained / "best_model.pth")
    ckpt["task"] = "audio"
    other = tmp_path / "audio.pth"
    torch.save(ckpt, other)
    capsys.readouterr()
    assert validate.main(["--model", str(other), "--data-dir", str(dataset / "val")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "audio" in line and "classification" in line and str(other) in line
    # an image classifier relabelled as a time-series model: it lacks the recording settings
    ckpt["task"] = "timeseries"
    torch.save(ckpt, other)
    for tool, argv in ((validate, ["--model", str(other), "--data-dir", str(dataset / "val")]),
                       (predict, ["-m", str(other), "-i", str(dataset / "val")])):
        assert tool.main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "timeseries checkpoint but lacks how to read recordings" in line and str(other) in line


def test_resume_from_best_model_has_no_train_state(trained, capsys):
    capsys.readouterr()
    assert gpu_train.main(["--resume", str(trained / "best_model.pth")]) == 2
    assert "checkpoint.pth" in one_error_line(capsys.readouterr().err)


def test_validate_unknown_class_folder(trained, dataset, capsys):
    target = dataset / "val"
    shutil.copytree(target / "top", target / "sideways")
    capsys.readouterr()
    assert validate.main(["--model", str(trained / "best_model.pth"), "--data-dir", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sideways" in line and "unknown to the model" in line


def test_unknown_config_key(dataset, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 1, "learning_rate": 0.1}')
    line = run_train(capsys, "--config", str(cfg), "--data-dir", str(dataset))
    assert "learning_rate" in line and "valid keys" in line and "lr" in line


def test_unknown_model(dataset, tmp_path, capsys):
    capsys.readouterr()
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(tmp_path / "o"), "--num-workers",
                           "0", "--model", "efficientnet_b9", "--epochs", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "efficientnet_b9" in line and "--list-models" in line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_image_with_checks_off_is_still_one_clear_line(dataset, tmp_path, capsys, workers):
    """--check-images off skips the upfront check; a bad file met while training (in the main
    process or in a DataLoader worker) still ends with one line naming it."""
    bad = dataset / "train" / "top" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    line = run_train(capsys, "--data-dir", str(dataset), "--output", str(tmp_path / "o"),
                     "--check-images", "off", "--num-workers", workers)
    assert str(bad) in line and "--skip-bad-images" in line


@pytest.mark.parametrize("content, words", [
    ('{"amp": "false"}', ["'amp'", "true or false"]),
    ('{"epochs": 1.5}', ["'epochs'", "whole number"]),
    ('{"lr": [0.1]}', ["'lr'", "bad value"]),
    ('{"optimizer": "lion"}', ["'optimizer'", "adamw"]),
    ('[1, 2]', ["JSON object"]),
    ('{"epochs": 2,}', ["not valid JSON"]),
])
def test_config_values_are_checked_like_flags(tmp_path, capsys, content, words):
    cfg = tmp_path / "c.json"
    cfg.write_text(content)
    line = run_train(capsys, "--config", str(cfg), "--output", str(tmp_path / "o"))
    assert str(cfg) in line
    for word in words:
        assert word in line
    assert not (tmp_path / "o").exists()
