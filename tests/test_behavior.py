"""run_behavior_classification.py: the guide's pipeline on generated activity recordings in each
layout, the guide's JSON config keys, --test-gpu, predict.py agreeing with the pipeline, bad input."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_timeseries_data import make_activity_recordings, write_long, write_recordings

import predict
import run_behavior_classification as rbc
from common import behavior, selftest
from common.checkpoint import load_checkpoint
from common.data import timeseries as ts
from common.envreport import report

FAST = ["--num-workers=0", "--epochs=25", "--batch-size=8", "--lr=0.003", "--width=16", "--log-interval=2",
        "--patience=10"]
MODELS = ("cnn", "transformer", "fusion")


@pytest.fixture(scope="module")
def recordings() -> list[tuple[str, np.ndarray]]:
    """3 classes x 20 recordings of 3 channels, 48 to 64 steps."""
    return make_activity_recordings(np.random.default_rng(7), per_class=20, channels=3, min_len=48,
                                    max_len=64)


def write_layout(root: Path, layout: str, recs) -> tuple[Path, list[str]]:
    """The recordings in layout a (a CSV per recording), b (one long CSV) or c (.npz); returns the
    --data-dir and the flags the layout needs."""
    if layout == "a":
        write_recordings(root / "data", recs, time=True)
        return root / "data", ["--window-size=64"]
    if layout == "b":
        segments = [(f"s{i:02d}", name, values) for i, (name, values) in enumerate(recs)]
        return write_long(root / "long.csv", segments), ["--group-column=subject", "--window-size=32",
                                                         "--stride=16"]
    X = np.stack([values[:48] for _, values in recs])
    np.savez(root / "set.npz", X=X, y=np.array([name for name, _ in recs]))
    return root / "set.npz", []


def run(root: Path, data: Path, *extra: str) -> int:
    return rbc.main(["--full-pipeline", f"--data-dir={data}", f"--output={root / 'out'}", *FAST, *extra])


@pytest.mark.parametrize("layout", ["a", "b", "c"])
def test_full_pipeline_each_model_reaches_90_percent(tmp_path, recordings, layout, capsys):
    data, flags = write_layout(tmp_path, layout, recordings)
    started = time.perf_counter()
    assert run(tmp_path, data, *flags) == 0
    elapsed = time.perf_counter() - started
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["evaluated_on"] == "test" and set(results["models"]) == set(MODELS)
    for name, r in results["models"].items():
        assert r["test_accuracy"] >= 0.9, (name, r["test_accuracy"])
        assert 0 <= r["macro_f1"] <= 1 and r["parameters"] > 0 and r["train_seconds"] > 0
        assert (out / name / "best_model.pth").is_file() and (out / name / "checkpoint.pth").is_file()
        assert (out / name / "confusion_matrix_test.png").read_bytes()[:4] == b"\x89PNG"
        ckpt = load_checkpoint(out / name / "best_model.pth", task="timeseries")
        assert ckpt["preprocessing"]["channels"] == ["acc_x", "acc_y", "acc_z"] or layout == "c"
    for name in ("report.md", "splits.json", "config.json", "training.log"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "done: best model" in printed and "macro-F1" in printed
    report_md = (out / "report.md").read_text()
    assert all(f"| {name} |" in report_md for name in MODELS)
    print(f"layout {layout}: the full pipeline for three models took {elapsed:.1f} s")  # the 60 s


def test_splits_do_not_leak_and_normalisation_is_from_training_only(tmp_path, recordings):
    data, flags = write_layout(tmp_path, "b", recordings)
    assert run(tmp_path, data, *flags, "--models", "cnn", "--epochs=1") == 0
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for rid in splits[split]:
            assert seen.setdefault(rid, split) == split, rid
    again = ts.load_series_data(data, group_column="subject", window_size=32, stride=16, seed=42)
    stats = ts.fit_normalizer(again.splits["train"].X)
    pre = load_checkpoint(tmp_path / "out" / "cnn" / "best_model.pth")["preprocessing"]
    assert pre["mean"] == pytest.approx(stats["mean"]) and pre["std"] == pytest.approx(stats["std"])
    everything = ts.fit_normalizer(np.concatenate([s.X for s in again.splits.values()]))
    assert pre["mean"] != pytest.approx(everything["mean"])


def test_predict_on_a_csv_gives_the_pipelines_class(tmp_path, recordings):
    data, flags = write_layout(tmp_path, "a", recordings)
    assert run(tmp_path, data, *flags, "--models", "cnn") == 0
    predicted = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["cnn"]["predictions"]
    assert len(predicted) >= 3
    files = [str(data / rid) for rid in predicted]
    table = tmp_path / "p.csv"
    assert predict.main(["-m", str(tmp_path / "out" / "cnn" / "best_model.pth"), "-i", *files,
                         "-o", str(table), "--topk", "1"]) == 0
    with open(table, newline="") as fh:
        rows = {Path(r["path"]).relative_to(data).as_posix(): r["label1"] for r in csv.DictReader(fh)}
    assert rows == predicted


def guide_config(path: Path, data: Path, **changes) -> Path:
    """gpu_config.json exactly as the guide writes it (with a small run and our data)."""
    config = {"data_dir": str(data), "batch_size": 16, "learning_rate": 0.003, "num_epochs": 3,
              "model_types": ["cnn"], "use_gpu": True, "device_id": 0, "use_amp": True,
              "compile_model": False, "multi_gpu": False,
              "dataloader_params": {"num_workers": 0, "pin_memory": True, "persistent_workers": True,
                                    "prefetch_factor": 4, "drop_last": True}}
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def test_guide_config_file_runs_and_is_written_back(tmp_path, recordings, capsys):
    data, flags = write_layout(tmp_path, "a", recordings)
    config = guide_config(tmp_path / "gpu_config.json", data)
    assert rbc.main(["--full-pipeline", "--config", str(config), f"--output={tmp_path / 'out'}", "--width=16",
                     *flags]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["cnn"]  # model_types
    with open(out / "cnn" / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3  # num_epochs
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["lr"], resolved["batch_size"]) == (0.003, 16)
    assert resolved["amp"] is True and resolved["drop_last"] is True
    printed = capsys.readouterr().out
    # use_amp reached the precision setup: float16 with a GradScaler on a GPU, a notice on the CPU
    if torch.cuda.is_available():
        assert "precision: float16 autocast + GradScaler" in printed
    else:
        assert "notice: --amp is off on cpu (float16 autocast needs CUDA)" in printed
        assert "precision: float32" in printed
    # the written config is a valid --config itself
    args = behavior.resolve_args(rbc.build_parser(), ["--config", str(out / "config.json")])
    assert args.lr == 0.003 and args.models == ["cnn"]


def resolved(tmp_path: Path, data: Path, *argv: str, **changes):
    config = guide_config(tmp_path / "c.json", data, **changes)
    return behavior.resolve_args(rbc.build_parser(), ["--config", str(config), *argv])


def test_config_device_keys(tmp_path):
    args = resolved(tmp_path, tmp_path, use_gpu=False, device_id=1, use_amp=True, compile_model=True)
    assert (args.no_gpu, args.gpu_id, args.amp, args.compile) == (True, 1, True, True)
    args = resolved(tmp_path, tmp_path, use_gpu=True, use_amp=False)
    assert (args.no_gpu, args.amp) == (False, False)


def test_config_training_keys_and_the_command_line_wins(tmp_path):
    args = resolved(tmp_path, tmp_path / "d", learning_rate=1e-4, num_epochs=100, batch_size=32,
                    model_types=["cnn", "transformer", "fusion"])
    assert (args.lr, args.epochs, args.batch_size, args.models) == (1e-4, 100, 32, list(MODELS))
    assert args.data_dir == str(tmp_path / "d")
    args = resolved(tmp_path, tmp_path, "--batch-size", "8", "--models", "fusion")
    assert args.batch_size == 8 and args.models == ["fusion"]


def test_config_dataloader_keys_reach_the_loaders(tmp_path, recordings):
    from common.session import start_session

    data, _ = write_layout(tmp_path, "a", recordings)
    params = {"num_workers": 1, "pin_memory": False, "persistent_workers": False, "prefetch_factor": 3,
              "drop_last": True}
    args = resolved(tmp_path, data, dataloader_params=params)
    s = start_session(args, None)
    assert s.num_workers == 1 and s.pin_memory is False
    series = ts.load_series_data(data, seed=42)
    loaders = behavior.make_loaders(args, s, series, ts.fit_normalizer(series.splits["train"].X))
    train = loaders["train"]
    assert (train.num_workers, train.persistent_workers, train.prefetch_factor, train.drop_last) == (1, False,
                                                                                                     3, True)
    assert loaders["val"].drop_last is False  # evaluation sees every window


def test_multi_gpu_key_launches_ddp_through_torchrun(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rbc, "processes_to_launch", lambda nproc, no_gpu: 2)
    monkeypatch.setattr(rbc, "relaunch",
                        lambda script, n, restarts, argv, no_gpu: calls.append((n, argv)) or 0)
    config = guide_config(tmp_path / "c.json", tmp_path, multi_gpu=True)
    assert rbc.main(["--full-pipeline", "--config", str(config)]) == 0
    assert calls == [(2, ["--full-pipeline", "--config", str(config)])]


@pytest.mark.parametrize("change, expected", [
    ({"learning_rte": 0.1}, "unknown key 'learning_rte'"),
    ({"dataloader_params": {"workers": 2}}, "unknown key(s) workers in dataloader_params"),
    ({"model_types": ["cnn", "lstm"]}, "model_types must be a list of cnn, transformer, fusion"),
    ({"num_epochs": "many"}, "'epochs': bad value"),
])
def test_bad_config_is_refused_with_the_valid_keys(tmp_path, capsys, change, expected):
    config = guide_config(tmp_path / "c.json", tmp_path, **change)
    assert rbc.main(["--full-pipeline", "--config", str(config), f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    if "unknown key '" in expected:
        assert "learning_rate" in err and "num_epochs" in err and "dataloader_params" in err
    assert not (tmp_path / "out").exists()


def test_mixed_precision_is_amp():
    args = behavior.resolve_args(rbc.build_parser(), ["--full-pipeline", "--mixed-precision"])
    assert args.amp is True and args.data_dir == "./hyx_data" and args.output == "./behavior_results"
    quick = behavior.resolve_args(rbc.build_parser(), ["--quick-start"])
    assert quick.epochs == behavior.QUICK_START["epochs"] < args.epochs


def test_test_gpu_without_a_gpu_says_so_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, wherever it runs
    assert rbc.main(["--test-gpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "no CUDA GPU is available" in out
    assert "TFLOP/s" in out and "DataLoader:" in out and "GPU check: passed" in out


class FakeCuda:
    """Stand-in for torch.cuda with one Ampere and one Turing card."""

    def __init__(self):
        self.cards = [SimpleNamespace(name="RTX 3090", total_memory=24 * 2**30, major=8, minor=6),
                      SimpleNamespace(name="RTX 2080", total_memory=8 * 2**30, major=7, minor=5)]

    def is_available(self):
        return True

    def device_count(self):
        return len(self.cards)

    def get_device_properties(self, i):
        return self.cards[i]

    def is_bf16_supported(self):
        return True


def test_gpu_report_lists_each_gpu_and_fails_on_a_broken_autocast(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr("common.envreport.dataloader_check", lambda workers, pin: f"pin_memory={pin}")
    code = report(lines.append, cuda=FakeCuda(), measure=lambda d: 42.0, smoke=lambda d, t: "float16")
    text = "\n".join(lines)
    assert code == 0 and "GPUs: 2" in text
    assert "GPU 0: RTX 3090, 24.0 GiB, compute capability 8.6; TF32: yes; bfloat16: yes" in text
    assert "GPU 1: RTX 2080, 8.0 GiB, compute capability 7.5; TF32: no" in text
    assert "matmul 1024x1024 float32 on cuda:0: 42.00 TFLOP/s" in text and "pin_memory=True" in text

    def broken(device, dtype):
        raise RuntimeError("CUDA error: no kernel image is available")

    lines.clear()
    assert report(lines.append, cuda=FakeCuda(), measure=lambda d: 1.0, smoke=broken) == 1
    assert any("autocast float16: FAILED (CUDA error: no kernel image" in line for line in lines)


def test_bad_csv_is_one_line_naming_file_and_line_and_writes_nothing(tmp_path, recordings, capsys):
    data, flags = write_layout(tmp_path, "a", recordings)
    bad = sorted((data / "run").glob("*.csv"))[0]
    rows = bad.read_text().splitlines()
    rows[5] = rows[5].replace(rows[5].split(",")[2], "oops", 1)
    bad.write_text("\n".join(rows) + "\n")
    assert run(tmp_path, data, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(bad) in err and "line 6" in err, err
    assert not (tmp_path / "out").exists()


def test_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(tmp_path, tmp_path / "empty") == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_an_earlier_run_is_kept_aside(tmp_path, recordings, capsys):
    data, flags = write_layout(tmp_path, "c", recordings)
    assert run(tmp_path, data, *flags, "--models", "cnn", "--epochs=1") == 0
    first = (tmp_path / "out" / "results.json").read_text()
    assert run(tmp_path, data, *flags, "--models", "transformer", "--epochs=1") == 0
    (previous,) = (tmp_path / "out").glob("previous_run_*")
    assert (previous / "results.json").read_text() == first
    assert (previous / "cnn" / "best_model.pth").is_file()
    assert not (tmp_path / "out" / "cnn").exists() and (tmp_path / "out" / "transformer").is_dir()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, recordings) -> tuple[Path, Path]:
    """(data folder of layout a, the cnn's best_model.pth) from one short pipeline run."""
    root = tmp_path_factory.mktemp("trained")
    data, flags = write_layout(root, "a", recordings)
    assert run(root, data, *flags, "--models", "cnn") == 0
    return data, root / "out" / "cnn" / "best_model.pth"


def test_validate_on_a_folder_of_recordings(trained, tmp_path, capsys):
    import validate

    data, model = trained
    results = tmp_path / "v.json"
    assert validate.main(["--model", str(model), "--data-dir", str(data), "--results-file", str(results),
                          "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(results.read_text())
    assert got["windows"] == 60 and sum(map(sum, got["confusion_matrix"])) == 60
    assert got["metrics"]["acc"] >= 0.9 and f"top-1 accuracy: {100 * got['metrics']['acc']:.2f}%" in printed
    assert "windows: 60" in printed and (tmp_path / "confusion_matrix.png").is_file()


def test_the_test_recordings_are_listed_and_validate_files_scores_them_as_the_run_did(trained, tmp_path,
                                                                                      capsys):
    """test_files.txt lists the test split (splits.json's ids); validate.py --files with it scores
    exactly those recordings, with the run's own test accuracy; the summary prints that command."""
    import validate

    data, model = trained
    out = model.parent.parent
    listed = [line for line in (out / "test_files.txt").read_text().splitlines() if not line.startswith("#")]
    assert listed == json.loads((out / "splits.json").read_text())["test"] and listed
    assert f"--data-dir {data} --files {out / 'test_files.txt'}" in (out / "training.log").read_text()
    results = tmp_path / "v.json"
    assert validate.main(["--model", str(model), "--data-dir", str(data), "--files",
                          str(out / "test_files.txt"), "--results-file", str(results),
                          "--output-dir", str(tmp_path)]) == 0
    got = json.loads(results.read_text())
    assert got["windows"] == len(listed)  # one window per recording at --window-size 64
    run_result = json.loads((out / "results.json").read_text())["models"]["cnn"]
    assert got["metrics"]["acc"] == pytest.approx(run_result["test_accuracy"], abs=1e-9)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("walk/nope.csv\n")
    capsys.readouterr()
    assert validate.main(["--model", str(model), "--data-dir", str(data), "--files", str(wrong)]) == 2
    assert "1 of 1 listed recording(s) are not in" in capsys.readouterr().err


def test_export_onnx_of_a_behaviour_model_matches_onnxruntime(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    import export_onnx

    _, model = trained
    out = tmp_path / "behaviour.onnx"
    assert export_onnx.main(["--model", str(model), "--output", str(out)]) == 0
    assert "onnxruntime vs PyTorch max |diff|" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == "timeseries" and json.loads(meta["channels"]) == ["acc_x", "acc_y", "acc_z"]
    assert meta["window_size"] == "64" and json.loads(meta["classes"]) == ["run", "sit", "walk"]


def test_test_model_checks_a_behaviour_model(trained, capsys):
    import test_model

    data, model = trained
    assert test_model.main(["--model-path", str(model), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "forward pass: input (32, 3, 64) -> output (32, 3)" in out
    assert "windows)" in out and out.rstrip().endswith(selftest.READY_OTHER["timeseries"])


def test_predict_cuts_a_long_recording_into_windows(trained, tmp_path, capsys):
    data, model = trained
    long = np.concatenate([values for name, values in make_activity_recordings(
        np.random.default_rng(3), classes=("walk", "run", "sit"), per_class=1, min_len=64, max_len=64)])
    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["time", "acc_x", "acc_y", "acc_z"])
        writer.writerows([[t, *row] for t, row in enumerate(long)])
    table = tmp_path / "p.csv"
    assert predict.main(["-m", str(model), "-i", str(path), "-o", str(table), "--topk", "1"]) == 0
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["window_start"] == "" and [r["window_start"] for r in rows[1:]] == ["0", "64", "128"]
    assert "[mean of 3 windows]" in capsys.readouterr().out


def test_pipeline_under_torchrun_two_processes(tmp_path, recordings):
    from test_distributed import torchrun

    data, flags = write_layout(tmp_path, "c", recordings)
    root = Path(__file__).resolve().parents[1]
    result = torchrun(root / "run_behavior_classification.py", "--full-pipeline", f"--data-dir={data}",
                      f"--output={tmp_path / 'out'}", "--models", "cnn", *FAST, "--epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "out" / "training.log").read_text()
    assert "2 processes on gloo" in log and "done: best model cnn" in log
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["cnn"]["samples"] == results["windows"]["test"]  # every test window once


def test_tools_advice_names_flags_they_accept(trained, tmp_path, capsys):
    import shutil

    import test_model

    data, model = trained
    rows = sorted((data / "walk").glob("*.csv"))[0].read_text().splitlines()
    cells = rows[3].split(",")
    cells[2] = ""
    rows[3] = ",".join(cells)
    gap = tmp_path / "gap.csv"
    gap.write_text("\n".join(rows) + "\n")
    assert predict.main(["-m", str(model), "-i", str(gap)]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "--fill-missing" in out and "run_behavior_classification.py" not in out
    assert predict.main(["-m", str(model), "-i", str(gap), "--fill-missing", "ffill"]) == 0
    assert "1 recording(s) predicted" in capsys.readouterr().out
    held_out = tmp_path / "held_out" / "walk"
    held_out.mkdir(parents=True)
    shutil.copy(gap, held_out / "gap.csv")
    assert test_model.main(["--model-path", str(model), "--data-dir", str(held_out.parent)]) == 1
    assert "run_behavior_classification.py --fill-missing" in capsys.readouterr().out  # no such flag here
