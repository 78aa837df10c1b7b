"""validate.py beyond the end-to-end run: top-5, per-class scores, output location; and the files
that are not what they claim (truncated, hand-edited, NaN weights, made elsewhere) in the tools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder

import gpu_train
import validate

CLASSES = ("a", "b", "c", "d", "e", "f")


def test_six_classes_report_top5_and_per_class_scores(tmp_path, capsys):
    data = tmp_path / "data"
    make_folder(data / "train", classes=CLASSES, per_class=4)
    make_folder(data / "val", classes=CLASSES, per_class=2, seed=3)
    out = tmp_path / "out"
    assert gpu_train.main([*FAST, "--data-dir", str(data), "--output", str(out), "--epochs", "1"]) == 0
    test_dir = tmp_path / "test"
    make_folder(test_dir, classes=("a", "c"), per_class=3, seed=4)  # a subset of the classes is fine
    capsys.readouterr()
    report = tmp_path / "report"
    results = tmp_path / "r.json"
    assert validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(test_dir),
                          "--output-dir", str(report), "--results-file", str(results),
                          "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "top-5 accuracy:" in printed
    payload = json.loads(results.read_text())
    assert payload["classes"] == list(CLASSES)
    assert payload["per_class"]["support"] == [3, 0, 3, 0, 0, 0]
    assert len(payload["confusion_matrix"]) == 6
    assert payload["metrics"]["top5"] >= payload["metrics"]["acc"]
    for name in CLASSES:
        assert any(line.startswith(name + " ") for line in printed.splitlines())
    assert (report / "confusion_matrix.png").stat().st_size > 1000
    assert not (out / "confusion_matrix.png").exists()


# ---------------------------------------------------------------- files that are not what they claim

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One real 1-epoch run: checkpoint.pth (with train state), best_model.pth, its data."""
    root = tmp_path_factory.mktemp("validate")
    data = root / "data"
    make_folder(data / "train", per_class=8, seed=1)
    make_folder(data / "val", per_class=4, seed=2)
    out = root / "out"
    assert gpu_train.main([*FAST, "--data-dir", str(data), "--output", str(out), "--epochs", "1"]) == 0
    return {"root": root, "data": data, "val": data / "val", "best": out / "best_model.pth",
            "checkpoint": out / "checkpoint.pth"}


def run_tool(tool, argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = tool.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_checkpoint_says_how_much_is_there(trained, tmp_path, capsys, fraction):
    """validate.py and gpu_train.py --resume: the length present and expected, no torch internals."""
    data = trained["checkpoint"].read_bytes()
    cut = tmp_path / "checkpoint.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    present = int(len(data) * fraction)
    expected = (f"error: checkpoint {cut} is truncated ({present} of {len(data)} bytes): it was not written "
                "or copied completely")
    for tool, argv in ((validate, ["--model", str(cut), "--data-dir", str(trained["val"])]),
                       (gpu_train, ["--resume", str(cut)])):
        code, _, err = run_tool(tool, argv, capsys)
        line = error_line(err)
        assert code == 2 and line.startswith(expected), line
        assert "miniz" not in line and "PytorchStreamReader" not in line


def test_checkpoint_cut_inside_its_first_record_has_an_unknown_length(trained, tmp_path, capsys):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(trained["best"].read_bytes()[:200])  # inside data.pkl: the sizes are not there yet
    code, _, err = run_tool(validate, ["--model", str(cut), "--data-dir", str(trained["val"])], capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: checkpoint {cut} is truncated (200 bytes, the end of the file "
                                      "is missing)")


def edited(ckpt: dict, change: str) -> dict:
    """A real checkpoint, hand-edited in one way (still loadable with weights_only)."""
    pre, spec = ckpt["preprocessing"], ckpt["model"]
    first = next(iter(ckpt["state_dict"]))
    if change == "unknown kwarg":
        spec["kwargs"]["depth"] = 3
    elif change == "kwarg type":
        spec["kwargs"]["num_classes"] = "2"
    elif change == "spec not a dict":
        ckpt["model"] = ["small_cnn", "local"]
    elif change == "state_dict not a dict":
        ckpt["state_dict"] = list(ckpt["state_dict"].values())
    elif change == "weight not a tensor":
        ckpt["state_dict"][first] = [1.0, 2.0]
    elif change == "classes not a list":
        ckpt["classes"] = "bottom,top"
    elif change == "classes count":
        ckpt["classes"] = ["bottom", "top", "side"]
    elif change == "no preprocessing":
        del ckpt["preprocessing"]
    elif change == "no img_size":
        del pre["img_size"]
    elif change == "mean type":
        pre["mean"] = "0.5"
    elif change == "std length":
        pre["std"] = pre["std"][:2]
    elif change == "channels type":
        pre["channels"] = "3"
    return ckpt


EDITS = {"unknown kwarg": "'depth'", "kwarg type": "model.kwargs.num_classes", "spec not a dict": "'model'",
         "state_dict not a dict": "'state_dict'", "weight not a tensor": "'state_dict.features.0.0.weight'",
         "classes not a list": "'classes'", "classes count": "'classes'",
         "no preprocessing": "'preprocessing'",
         "no img_size": "'preprocessing.img_size'", "mean type": "'preprocessing.mean'",
         "std length": "'preprocessing.std'", "channels type": "'preprocessing.channels'"}


@pytest.mark.parametrize("change", sorted(EDITS))
def test_hand_edited_checkpoint_is_one_line_naming_the_entry(trained, tmp_path, capsys, change):
    import export_onnx
    import finetune_gpu
    import predict
    import test_model
    from common.checkpoint import load_checkpoint

    path = tmp_path / "edited.pth"
    torch.save(edited(load_checkpoint(trained["best"]), change), path)
    runs = ((validate, ["--model", str(path), "--data-dir", str(trained["val"])]),
            (predict, ["-m", str(path), "-i", str(trained["val"])]),
            (export_onnx, ["--model", str(path), "--output", str(tmp_path / "m.onnx")]),
            (finetune_gpu, ["--model-path", str(path), "--data-dir", str(trained["data"]),
                            "--output", str(tmp_path / "ft")]))
    for tool, argv in runs:
        code, _, err = run_tool(tool, argv, capsys)
        line = error_line(err)
        assert code == 2 and EDITS[change] in line and str(path) in line, (tool.__name__, line)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()
    code, out, _ = run_tool(test_model, ["--model-path", str(path)], capsys)  # check 1 fails: exit 1
    check = next(line for line in out.splitlines() if " 1. file integrity: " in line)
    assert code == 1 and EDITS[change] in check and str(path) in check


# ---------------------------------------------------------------- files made elsewhere, NaN weights

def metric_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("images:", "loss:", "top-1"))]


def test_plain_state_dict_and_pickled_model_evaluate_like_the_checkpoint(trained, tmp_path, capsys):
    """--arch/--num-classes (a plain state_dict) and --trust-checkpoint (a whole pickled model) read
    the same weights as the checkpoint: the same numbers, the class folders as labels 0..N-1."""
    from common.checkpoint import load_checkpoint
    from common.models.small import SmallCNN

    ckpt = load_checkpoint(trained["best"])
    weights, whole = tmp_path / "weights.pth", tmp_path / "whole.pt"
    torch.save({f"module.{k}": v for k, v in ckpt["state_dict"].items()}, weights)
    model = SmallCNN(2)
    model.load_state_dict(ckpt["state_dict"])
    torch.save(model, whole)
    base = ["--data-dir", str(trained["val"]), "--output-dir", str(tmp_path / "report"), "--num-workers", "0"]
    code, reference, _ = run_tool(validate, ["--model", str(trained["best"]), *base], capsys)
    assert code == 0 and len(metric_lines(reference)) == 3
    for argv in (["--model", str(weights), "--arch", "small_cnn", "--num-classes", "2", "--img-size", "32"],
                 ["--model", str(whole), "--trust-checkpoint", "--img-size", "32"]):
        code, out, err = run_tool(validate, [*argv, *base], capsys)
        assert code == 0, err
        assert metric_lines(out) == metric_lines(reference)
        assert "class folders in sorted order are labels 0..1" in out
    code, _, err = run_tool(validate, ["--model", str(whole), *base], capsys)
    assert code == 2 and "--trust-checkpoint" in error_line(err)


def test_non_finite_weights_are_named_in_validate_and_predict(trained, tmp_path, capsys):
    import predict
    from common.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained["best"])
    ckpt["state_dict"]["features.1.0.weight"].view(-1)[:2] = float("nan")
    ckpt["state_dict"]["head.2.bias"][0] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(ckpt, path)
    warning = (f"warning: {path} holds non-finite weights (NaN/Inf) in 2 tensor(s): features.1.0.weight "
               "(2 NaN), head.2.bias (1 Inf); its outputs are meaningless")
    for tool, argv in ((validate, ["--model", str(path), "--data-dir", str(trained["val"]),
                                   "--output-dir", str(tmp_path)]),
                       (predict, ["-m", str(path), "-i", str(trained["val"])])):
        code, out, _ = run_tool(tool, argv, capsys)
        assert code == 0 and sum(line.startswith(warning) for line in out.splitlines()) == 1, out
    code, out, _ = run_tool(validate, ["--model", str(trained["best"]), "--data-dir", str(trained["val"]),
                                       "--output-dir", str(tmp_path)], capsys)
    assert code == 0 and "warning:" not in out


def test_missing_test_folder_suggests_val_beside_it(trained, tmp_path, capsys, monkeypatch):
    """The guide's `--data-dir ./dataset/test` on a set with train/ and val/ only."""
    import shutil

    shutil.copytree(trained["data"], tmp_path / "dataset")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_tool(validate, ["--model", str(trained["best"]), "--data-dir", "./dataset/test",
                                         "--output-dir", "first"], capsys)
    assert code == 2
    assert error_line(err) == ("error: data folder ./dataset/test does not exist (./dataset holds val/, "
                               "train/); to use val/ instead, pass --data-dir ./dataset/val")
    assert not (tmp_path / "first").exists()  # refused before any output
    # and the folder it names works
    code, out, _ = run_tool(validate, ["--model", str(trained["best"]), "--data-dir", "./dataset/val",
                                       "--output-dir", "report", "--num-workers", "0"], capsys)
    assert code == 0 and "images: 8" in out


def test_missing_data_folder_without_splits_beside_it(trained, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "test"
    code, _, err = run_tool(validate, ["--model", str(trained["best"]), "--data-dir", str(missing)], capsys)
    assert code == 2
    line = error_line(err)
    assert f"data folder {missing} does not exist; pass --data-dir with one folder per class" in line
    assert "instead" not in line
