"""validate.py beyond the end-to-end run: top-5, per-class scores, output location."""
from __future__ import annotations

import json

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
