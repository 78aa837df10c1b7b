"""predict.py: top-k from the checkpoint alone, inputs, outputs, agreement with validate.py,
and the safety of loading (shared by every checkpoint tool)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST

import gpu_train
import predict
import validate
from common.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import make_folder

    root = tmp_path_factory.mktemp("predict")
    data = root / "dataset"
    make_folder(data / "train", per_class=16, seed=1)
    make_folder(data / "val", per_class=6, seed=2)
    out = root / "out"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "3"]) == 0
    return root / "out" / "best_model.pth", data


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_single_image_prints_classes_with_probabilities(trained, capsys):
    model, data = trained
    image = sorted((data / "val" / "top").iterdir())[0]
    capsys.readouterr()
    assert predict.main(["--model", str(model), "--input", str(image), "--num-workers", "0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(str(image)))
    shown = line.split(": ", 1)[1].split(", ")
    assert len(shown) == 2  # two classes: top-5 shows both
    names = [s.split(" (")[0] for s in shown]
    probs = [float(s.split("(")[1].rstrip(")")) for s in shown]
    assert sorted(names) == ["bottom", "top"]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_folders_globs_csv_json_and_unreadable_files(trained, tmp_path, capsys):
    model, data = trained
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    args = ["-m", str(model), "-i", str(data / "val"), str(data / "train" / "top" / "top_00*.png"),
            str(tmp_path / "broken.png"), "--topk", "1", "--batch-size", "5", "--num-workers", "0"]
    assert predict.main([*args, "-o", str(out_csv)]) == 0
    assert "1 unreadable and skipped" in capsys.readouterr().out
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label1", "prob1", "error"]
    assert len(rows) == 12 + 10 + 1  # val folder (recursive), glob top_000..009, the broken file
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken[0]["error"] and not broken[0]["label1"]
    assert predict.main([*args, "-o", str(out_json)]) == 0
    entries = json.loads(out_json.read_text())
    assert [e["path"] for e in entries] == [r["path"] for r in rows]
    good = [e for e in entries if not e["error"]]
    assert all(len(e["predictions"]) == 1 and 0 < e["predictions"][0]["probability"] <= 1 for e in good)
    correct = sum(e["predictions"][0]["label"] == Path(e["path"]).parent.name for e in good)
    assert correct / len(good) > 0.75  # the model learnt the two classes


def test_output_piped_into_a_reader_that_stops_early_still_finishes_the_work(trained, tmp_path):
    """`python predict.py ... | head -1`: after the reader has gone, the lines go nowhere and the
    results file is still written; no BrokenPipeError traceback, exit code 0."""
    import subprocess
    import sys

    model, data = trained
    results = tmp_path / "r.csv"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "predict.py"), "--model", str(model),
           "--input", str(data / "val"), "--output", str(results), "--num-workers", "0"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    child.stdout.readline()  # what `head -1` reads
    child.stdout.close()  # and then it exits
    err = child.stderr.read()
    assert child.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert len(results.read_text().splitlines()) == 1 + 12  # the header and every image


def test_predict_and_validate_agree_on_every_image(trained, tmp_path):
    model, data = trained
    results, out = tmp_path / "v.json", tmp_path / "p.json"
    assert validate.main(["--model", str(model), "--data-dir", str(data / "val"), "--results-file",
                          str(results), "--output-dir", str(tmp_path), "--num-workers", "0"]) == 0
    assert predict.main(["-m", str(model), "-i", str(data / "val"), "-o", str(out), "--topk", "1",
                         "--batch-size", "7", "--num-workers", "0"]) == 0
    validated = {p["path"]: p["predicted"] for p in json.loads(results.read_text())["predictions"]}
    predicted = {e["path"]: e["predictions"][0]["label"] for e in json.loads(out.read_text())}
    assert len(validated) == 12 and validated == predicted


def test_missing_input_and_bad_output_name(trained, tmp_path, capsys):
    model, _ = trained
    capsys.readouterr()
    assert predict.main(["-m", str(model), "-i", str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg does not exist" in error_line(capsys)
    assert predict.main(["-m", str(model), "-i", str(trained[1] / "val"), "-o", "r.txt"]) == 2
    assert "one .csv or .json file" in error_line(capsys)
    for flag in ("--topk", "--batch-size"):
        assert predict.main(["-m", str(model), "-i", str(trained[1] / "val"), flag, "0"]) == 2
        assert error_line(capsys) == f"error: {flag} must be 1 or more, got 0"


class Planted:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("tool", ["predict", "validate"])
def test_code_carrying_pickle_is_refused_and_never_run(trained, tmp_path, capsys, tool):
    _, data = trained
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "x", "payload": Planted(marker)}, evil)
    capsys.readouterr()
    argv = (["-m", str(evil), "-i", str(data / "val")] if tool == "predict"
            else ["--model", str(evil), "--data-dir", str(data / "val")])
    assert {"predict": predict, "validate": validate}[tool].main(argv) == 2
    line = error_line(capsys)
    assert "--trust-checkpoint" in line and str(evil) in line
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 50, None])
def test_truncated_or_random_checkpoint_is_one_line(trained, tmp_path, capsys, content):
    model, data = trained
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content if content is not None else model.read_bytes()[:3000])
    capsys.readouterr()
    assert predict.main(["-m", str(bad), "-i", str(data / "val")]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "--trust-checkpoint" not in line


def test_state_dict_that_does_not_fit_names_the_keys(trained, tmp_path, capsys):
    model, data = trained
    ckpt = load_checkpoint(model)
    ckpt["state_dict"]["head.2.weight"] = torch.zeros(5, 3)
    ckpt["state_dict"]["extra.bias"] = torch.zeros(1)
    del ckpt["state_dict"]["features.0.0.weight"]
    broken = tmp_path / "mismatch.pth"
    torch.save(ckpt, broken)
    capsys.readouterr()
    assert predict.main(["-m", str(broken), "-i", str(data / "val")]) == 2
    line = error_line(capsys)
    for part in ("missing: features.0.0.weight", "unexpected: extra.bias", "head.2.weight (5, 3)"):
        assert part in line
