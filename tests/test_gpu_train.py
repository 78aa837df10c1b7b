"""gpu_train.py end to end: training, outputs, resume, the demo, and validate.py on the result."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder

import gpu_train
import validate
from common import session as session_mod
from common.checkpoint import load_checkpoint


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def train(dataset: Path, out: Path, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, *extra])


def test_train_then_validate(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(dataset, out, "--epochs", "4", "--num-classes", "2", "--label-smoothing", "0.1") == 0
    for name in ("training.log", "checkpoint.pth", "best_model.pth", "metrics.csv", "config.json",
                 "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "tensorboard").iterdir())
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    best = max(float(r["val_acc"]) for r in rows)
    assert best > 0.75  # two easy classes: well above chance (0.5)
    log = (out / "training.log").read_text()
    assert "epoch 4/4" in log  # --device auto: the GPU where there is one, else the CPU
    assert ("device: cuda:0 (" if torch.cuda.is_available() else "device: cpu (") in log
    config = json.loads((out / "config.json").read_text())
    assert config["label_smoothing"] == 0.1 and config["model"] == "small_cnn"

    ckpt = load_checkpoint(out / "best_model.pth", task="classification")
    assert ckpt["classes"] == ["bottom", "top"]
    assert ckpt["model"] == {"name": "small_cnn", "source": "local", "kwargs": {"num_classes": 2}}
    assert ckpt["preprocessing"]["img_size"] == 32
    assert "train_state" not in ckpt
    assert abs(ckpt["metrics"]["val_acc"] - best) < 1e-9
    assert "train_state" in load_checkpoint(out / "checkpoint.pth")

    capsys.readouterr()
    results = tmp_path / "results.json"
    (out / "confusion_matrix.png").write_bytes(b"the user's own picture")  # beside the model: kept
    assert validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(dataset / "val"),
                          "--results-file", str(results), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(results.read_text())
    assert data["images"] == 12
    assert abs(data["metrics"]["acc"] - best) < 1e-6  # same images, same preprocessing
    assert f"top-1 accuracy: {100 * best:.2f}%" in printed
    assert "top-5" not in printed  # only two classes
    assert sum(map(sum, data["confusion_matrix"])) == 12
    assert (out / "validation" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "confusion_matrix.png").read_bytes() == b"the user's own picture"
    assert f"confusion matrix: {out / 'validation' / 'confusion_matrix.png'}" in printed


class StopAfter(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(dataset, tmp_path, monkeypatch):
    flags = ["--epochs", "4", "--deterministic", "--scheduler", "cosine", "--warmup-epochs", "1"]
    assert train(dataset, tmp_path / "full", *flags) == 0

    original = session_mod.EpochWriter.__call__

    def stop_after_two(self, state, record, improved):
        original(self, state, record, improved)
        if state.epoch == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl+C after epoch 2 was saved

    monkeypatch.setattr(session_mod.EpochWriter, "__call__", stop_after_two)
    assert train(dataset, tmp_path / "cut", *flags) == 130
    monkeypatch.setattr(session_mod.EpochWriter, "__call__", original)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pth")["train_state"]["epoch"] == 2

    assert gpu_train.main(["--resume", str(tmp_path / "cut" / "checkpoint.pth"), "--num-workers", "0"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert resumed["train_state"]["epoch"] == 4
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    rows = read_rows(tmp_path / "cut" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_resume_extends_epochs_and_flags_override(dataset, tmp_path):
    out = tmp_path / "out"
    assert train(dataset, out, "--epochs", "2") == 0
    assert gpu_train.main(["--resume", str(out / "checkpoint.pth"), "--epochs", "3",
                           "--num-workers", "0", "--clip-grad", "1.0"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["train_state"]["epoch"] == 3
    assert ckpt["config"]["clip_grad"] == 1.0 and ckpt["config"]["model"] == "small_cnn"
    assert not list(out.glob("previous_run_*"))  # resume continues in place


def test_resume_with_too_few_epochs_is_a_clear_error(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(dataset, out, "--epochs", "2") == 0
    capsys.readouterr()
    assert gpu_train.main(["--resume", str(out / "checkpoint.pth"), "--epochs", "2"]) == 2
    captured = capsys.readouterr()
    assert "already trained 2 epochs" in captured.err
    assert "data:" not in captured.out and "model:" not in captured.out  # said before the work


def test_new_run_moves_an_earlier_run_aside(dataset, tmp_path):
    out = tmp_path / "out"
    assert train(dataset, out, "--epochs", "1") == 0
    first = (out / "best_model.pth").read_bytes()
    assert train(dataset, out, "--epochs", "1", "--seed", "7") == 0
    archived = list(out.glob("previous_run_*"))
    assert len(archived) == 1
    assert (archived[0] / "best_model.pth").read_bytes() == first


def test_val_split_when_val_folder_is_missing(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=10)
    out = tmp_path / "out"
    assert train(root, out, "--epochs", "1", "--val-split", "0.3") == 0
    log = (out / "training.log").read_text()
    assert "14 train / 6 val images" in log


def test_gradient_accumulation_and_sgd_step_schedule(dataset, tmp_path):
    out = tmp_path / "out"
    assert train(dataset, out, "--epochs", "2", "--accumulate-grad-batches", "3", "--optimizer", "sgd",
                 "--scheduler", "step", "--step-size", "1", "--gamma", "0.5") == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    # 32 images / batch 8 = 4 micro-batches -> groups of 3 + 1 -> 2 optimizer steps per epoch
    assert ckpt["train_state"]["step"] == 4
    rows = read_rows(out / "metrics.csv")
    assert float(rows[0]["lr"]) == pytest.approx(0.0025)
    assert float(rows[1]["lr"]) == pytest.approx(0.00125)


def test_early_stopping(dataset, tmp_path):
    out = tmp_path / "out"
    # an impossible min-delta: no epoch after the first counts as an improvement
    assert train(dataset, out, "--epochs", "10", "--early-stopping-patience", "2", "--min-delta", "2") == 0
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 3
    assert "early stopping" in (out / "training.log").read_text()


def test_config_file_sets_defaults_and_flags_win(dataset, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"epochs": 1, "batch-size": 4, "label_smoothing": 0.2}))
    out = tmp_path / "out"
    assert train(dataset, out, "--config", str(config), "--label-smoothing", "0.05") == 0
    saved = json.loads((out / "config.json").read_text())
    # FAST passes --batch-size 8 on the command line, which wins over the file
    assert saved["epochs"] == 1 and saved["batch_size"] == 8 and saved["label_smoothing"] == 0.05


def test_demo_reduced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gpu_train.main(["--demo", "--demo-images", "40", "--epochs", "4", "--num-workers", "0"]) == 0
    rows = read_rows(tmp_path / "demo_output" / "metrics.csv")
    assert max(float(r["val_acc"]) for r in rows) >= 0.85
    assert sorted(p.name for p in (tmp_path / "demo_data" / "train").iterdir()) == ["horizontal", "vertical"]


def test_list_models(capsys):
    assert gpu_train.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "small_cnn" in out and "efficientnet_b0" in out and "vit_base_patch16_224" in out


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_b1", "resnet50", "vit_base_patch16_224"])
def test_guide_model_names_build(name):
    from common.models import build_model

    model, spec = build_model(name, 2)
    model.eval()
    size = 224 if name.startswith("vit") else 64
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 2)
    assert spec["kwargs"]["num_classes"] == 2


def test_weights_from_a_local_file(dataset, tmp_path, capsys):
    first = tmp_path / "first"
    assert train(dataset, first, "--epochs", "1") == 0
    capsys.readouterr()
    second = tmp_path / "second"
    assert train(dataset, second, "--epochs", "1", "--weights", str(first / "best_model.pth"),
                 "--lr", "1e-9", "--warmup-epochs", "0", "--scheduler", "none") == 0
    assert "weights: loaded" in capsys.readouterr().out
    a = load_checkpoint(first / "best_model.pth")["state_dict"]
    b = load_checkpoint(second / "checkpoint.pth")["state_dict"]
    conv = "features.0.0.weight"
    assert torch.allclose(a[conv], b[conv], atol=1e-6)  # started from those weights, lr ~ 0


def test_pretrained_offline_is_a_clear_error(dataset, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models, "get_model",
                        lambda name, weights=None, **kw: offline() if weights else None)
    capsys.readouterr()
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(tmp_path / "o"), "--model",
                           "torchvision/resnet18", "--pretrained", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not get pretrained weights for resnet18") and "--weights" in err


def test_pretrained_timm_offline_is_a_clear_error(dataset, tmp_path, capsys, monkeypatch):
    """A bare name of the guide's table is timm's; its weights come from the Hugging Face hub."""
    timm = pytest.importorskip("timm")
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            raise FileNotFoundError("An error happened while trying to locate the file on the Hub")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    capsys.readouterr()
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(tmp_path / "o"), "--model",
                           "efficientnet_b0", "--pretrained", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not get pretrained weights for efficientnet_b0")
    assert "--weights" in err


def test_worker_processes_with_spawn_as_on_windows(dataset, tmp_path, monkeypatch):
    """Windows starts DataLoader workers with spawn: the dataset and transforms must pickle."""
    from common.data import loaders

    monkeypatch.setattr(loaders, "WORKER_START_METHOD", "spawn")
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST[:-6],
                           "--num-workers", "1", "--epochs", "1"]) == 0
    assert read_rows(out / "metrics.csv")[0]["epoch"] == "1"


def test_compiled_model_is_saved_unwrapped(dataset, tmp_path, monkeypatch):
    """--compile trains the compiled wrapper but saves the plain model (no _orig_mod. prefix).
    torch.compile itself takes minutes on a CPU, so a wrapper of the same shape stands in."""
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append(1)
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    out = tmp_path / "o"
    assert train(dataset, out, "--epochs", "1", "--compile") == 0
    assert calls  # the compiled module did the training
    keys = load_checkpoint(out / "best_model.pth")["state_dict"].keys()
    assert keys and not any(k.startswith(("_orig_mod", "module.")) for k in keys)


def test_killed_process_leaves_a_checkpoint_that_resumes(dataset, tmp_path):
    """SIGKILL in the middle of training: checkpoint.pth still loads and the run completes."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, str(Path(gpu_train.__file__)), "--data-dir", str(dataset), "--output",
           str(out), *FAST, "--epochs", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pth").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # somewhere inside a later epoch, possibly inside a save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_checkpoint(out / "checkpoint.pth")["train_state"]["epoch"]
    assert 1 <= saved < 30
    (out / ".checkpoint.pth.stale.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    assert gpu_train.main(["--resume", str(out / "checkpoint.pth"), "--epochs", str(saved + 2),
                           "--num-workers", "0"]) == 0
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, saved + 3))
    assert not list(out.glob(".*.tmp"))  # a temp file left by the kill is cleaned up on resume


def test_config_json_of_a_run_can_be_passed_back(dataset, tmp_path):
    first = tmp_path / "first"
    assert train(dataset, first, "--epochs", "1", "--label-smoothing", "0.15") == 0
    second = tmp_path / "second"
    assert gpu_train.main(["--config", str(first / "config.json"), "--output", str(second)]) == 0
    a = json.loads((first / "config.json").read_text())
    b = json.loads((second / "config.json").read_text())
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    assert "resume" not in a and "config" not in a
