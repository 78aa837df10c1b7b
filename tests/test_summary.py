"""The end of a run: the summary block before the "done: ..." line (best result, time, the outputs that
exist with their sizes, disk used, the next commands, which parse with their scripts' parsers), and the
notice when earlier runs pile up in previous_run_* folders."""
from __future__ import annotations

import argparse
import logging
import re
import shlex
from pathlib import Path

import pytest
from conftest import FAST, make_folder

import export_onnx
import gpu_train
import predict
import validate
from common import outdir
from common import session as session_mod
from common.engine import TrainState
from common.reporting import LOGGER_NAME, run_outputs, run_summary
from common.trainer import best_text, next_commands

PARSERS = {"validate.py": validate.build_parser, "predict.py": predict.build_parser,
           "export_onnx.py": export_onnx.build_parser}


def parse_command(line: str) -> tuple[str, argparse.Namespace]:
    """A suggested command, parsed by the parser of the script it names (SystemExit if it does not)."""
    argv = shlex.split(line)
    assert argv[0] == "python" and argv[1] in PARSERS, line
    return argv[1], PARSERS[argv[1]]().parse_args(argv[2:])


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def block(lines: list[str], header: str) -> list[str]:
    """The indented entries under `header` in the summary."""
    entries = []
    for line in lines[lines.index(header) + 1:]:
        if not line.startswith("    "):
            break
        entries.append(line.strip())
    return entries


def test_the_block_lists_only_files_that_exist_with_sizes_and_disk_used(tmp_path):
    out = tmp_path / "out"
    write(out / "best_model.pth", 4000)
    write(out / "checkpoint.pth", 12000)
    write(out / "checkpoint_epoch10.pth", 4000)
    write(out / "checkpoint_epoch9.pth", 4000)
    write(out / "metrics.csv", 100)
    write(out / "tensorboard" / "events.out", 900)
    write(out / ".toolkit.lock", 50)  # hidden: not an output
    write(out / "previous_run_20240101-000000" / "best_model.pth", 7_000_000)  # an earlier run
    lines = run_summary(out, best="val accuracy 90.00% at epoch 3 (3 epochs trained)", seconds=192,
                        commands=[["python", "export_onnx.py", "--model", str(out / "best_model.pth")]])
    assert lines[0] == "summary:"
    assert "  best: val accuracy 90.00% at epoch 3 (3 epochs trained)" in lines
    assert "  time: 3m 12s" in lines
    listed = block(lines, f"  outputs in {out}:")
    names = [entry.split()[0] for entry in listed]
    assert names == ["best_model.pth", "checkpoint.pth", "checkpoint_epoch*.pth", "metrics.csv",
                     "tensorboard/"]
    assert "curves.png" not in "\n".join(lines) and "training.log" not in "\n".join(lines)  # not on disk
    assert "weights of epochs 9, 10" in listed[2] and "8.0 kB" in listed[2]
    assert "4.0 kB" in listed[0] and "12.0 kB" in listed[1]
    assert f"tensorboard --logdir {out / 'tensorboard'}" in listed[4]
    # disk used: the run's own files (25,000 bytes), not the earlier run's 7 MB nor the lock
    assert "  disk used by this run's outputs: 25.0 kB" in lines
    earlier = next(line for line in lines if line.startswith("  earlier runs kept"))
    assert "1 previous_run_* folder(s), 7.0 MB" in earlier and f"rm -r {out}/previous_run_*" in earlier
    assert lines[-2:] == ["  next:", f"    python export_onnx.py --model {out / 'best_model.pth'}"]


def test_outputs_outside_the_folder_count_once(tmp_path):
    out, board = tmp_path / "result", tmp_path / "logs_finetune" / "run1"
    write(out / "model_finetuned.pt", 1000)
    write(board / "events", 3000)
    lines = run_summary(out, best=None, seconds=5.0, extra=[board, tmp_path / "missing"])
    assert "  disk used by this run's outputs: 4.0 kB" in lines
    assert f"  also {board}/ (3.0 kB)" in lines
    assert "missing" not in "\n".join(lines) and not any(line.startswith("  best") for line in lines)
    assert run_outputs(tmp_path / "no such folder") == []


def history_state(records: list[dict], best_epoch: int, best: float, **kwargs) -> TrainState:
    return TrainState(epoch=len(records), best_epoch=best_epoch, best_metric=best, history=records, **kwargs)


def test_best_text_names_the_metric_and_its_epoch():
    acc = history_state([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.975}], 2, 0.975)
    assert best_text("acc", acc) == "val accuracy 97.50% at epoch 2 (2 epochs trained)"
    dice = history_state([{"epoch": 1, "val_dice": 0.81234, "val_iou": 0.7}], 1, 0.81234)
    assert best_text("dice", dice) == "val Dice 0.8123 (IoU 0.7000) at epoch 1 (1 epoch trained)"
    start = history_state([{"epoch": 1, "val_acc": 0.4}], 0, 0.6)  # fine-tuning: nothing beat the start
    assert best_text("acc", start) == \
        "the starting model, val accuracy 60.00%: no epoch beat it (1 epoch trained)"
    train_only = history_state([{"epoch": 1, "train_acc": 0.7}], 1, 0.7)
    assert best_text("acc", train_only).startswith("train accuracy 70.00% at epoch 1")
    ema = history_state([{"epoch": 1, "val_acc": 0.5, "val_ema_acc": 0.6}], 1, 0.6, best_from_ema=True)
    assert "at epoch 1 (the weights' moving average)" in best_text("acc", ema)
    assert best_text("acc", TrainState()) is None


def namespace(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"dataset": "imagefolder", "data_glob": None, **kwargs})


@pytest.mark.parametrize("layout, expected", [(("train", "val", "test"), "test"), (("train", "val"), "val"),
                                              ((), "")])
def test_classification_commands_parse_and_use_this_runs_paths(tmp_path, layout, expected):
    data, out = tmp_path / "my data", tmp_path / "out dir"  # spaces: the commands quote them
    for split in layout:
        make_folder(data / split, per_class=1)
    if not layout:
        make_folder(data, per_class=1)  # one folder of class folders, split at training time
    model = write(out / "best_model.pth", 10)
    commands = [" ".join(shlex.quote(a) for a in argv)
                for argv in next_commands("classification", model, out, namespace(data_dir=str(data)))]
    parsed = dict(parse_command(line) for line in commands)
    assert list(parsed) == ["validate.py", "predict.py", "export_onnx.py"]
    eval_dir = str(data / expected) if expected else str(data)
    assert parsed["validate.py"].model == str(model) and parsed["validate.py"].data_dir == eval_dir
    assert parsed["predict.py"].input == [eval_dir]
    assert parsed["predict.py"].output == [str(out / "predictions.csv")]
    assert parsed["export_onnx.py"].output == str(out / "model.onnx")


def test_after_skipping_unreadable_images_the_validate_command_skips_them_too(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data / "val", per_class=1)
    model = write(out / "best_model.pth", 10)
    plain = next_commands("classification", model, out, namespace(data_dir=str(data)))
    skipped = next_commands("classification", model, out, namespace(data_dir=str(data), skip_bad_images=True))
    assert "--skip-bad-images" not in plain[0]
    assert skipped[0] == [*plain[0], "--skip-bad-images"]
    assert parse_command(shlex.join(skipped[0]))[1].skip_bad_images
    assert skipped[1:] == plain[1:]  # predict.py skips and lists unreadable files by itself


def test_segmentation_commands_predict_one_real_image(tmp_path):
    data, out = tmp_path / "data", tmp_path / "checkpoints"
    for name in ("b.png", "a.jpg", "notes.txt"):
        write(data / "imgs" / name, 10)
    (data / "masks").mkdir()
    model = write(out / "best_model.pth", 10)
    parsed = dict(parse_command(shlex.join(argv)) for argv in
                  next_commands("segmentation", model, out, namespace(data_dir=str(data))))
    assert parsed["validate.py"].data_dir == str(data)
    assert parsed["predict.py"].input == [str(data / "imgs" / "a.jpg")]  # first image, the text file aside
    assert parsed["predict.py"].output == [str(out / "a_mask.png")] and parsed["predict.py"].viz
    assert parsed["export_onnx.py"].model == str(model)


def test_commands_name_the_scripts_by_path_outside_the_project_folder(tmp_path, monkeypatch):
    """Run from the project folder, the scripts are named as the guides write them; from anywhere
    else (the data paths being relative to there) by their full path, so each line runs as printed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data / "val", per_class=1)
    model = write(out / "best_model.pth", 10)
    monkeypatch.chdir(root)
    assert [a[1] for a in next_commands("classification", model, out, namespace(data_dir=str(data)))] == [
        "validate.py", "predict.py", "export_onnx.py"]
    monkeypatch.chdir(tmp_path)
    commands = next_commands("classification", model, out, namespace(data_dir=str(data)))
    scripts = ("validate.py", "predict.py", "export_onnx.py")
    assert [a[1] for a in commands] == [str(root / n) for n in scripts]
    shown = subprocess.run([sys.executable, commands[0][1], "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: validate.py")


def test_timeseries_commands_and_data_validate_cannot_read(tmp_path):
    out = tmp_path / "behavior_results"
    model = write(out / "cnn" / "best_model.pth", 10)
    data = tmp_path / "hyx_data"
    (data / "test").mkdir(parents=True)
    parsed = dict(parse_command(shlex.join(argv)) for argv in
                  next_commands("timeseries", model, out, namespace(data_dir=str(data))))
    assert parsed["validate.py"].data_dir == str(data / "test")
    assert parsed["export_onnx.py"].output == str(out / "cnn.onnx")
    # a torchvision set, merged folders, or a folder that is gone: export only
    for args in (namespace(data_dir=str(data), dataset="cifar10"),
                 namespace(data_dir=str(data), data_glob="*"), namespace(data_dir=str(tmp_path / "gone"))):
        commands = next_commands("classification", model, out, args)
        assert [argv[1] for argv in commands] == ["export_onnx.py"]


def test_a_training_run_ends_with_the_block_then_the_done_line(tmp_path, capsys):
    data = tmp_path / "dataset"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        make_folder(data / split, per_class=4 if split != "train" else 8, seed=seed)
    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "1",
                           "--test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("done: best val accuracy ")  # still the last line
    start = lines.index("summary:")
    summary = lines[start:-1]
    test_line = next(i for i, line in enumerate(lines) if line.startswith("test: accuracy"))
    assert test_line < start  # the block comes after the test evaluation, and lists its file
    assert any(line.startswith("  best: val accuracy") and "at epoch 1 (1 epoch trained)" in line
               for line in summary)
    assert any(re.fullmatch(r"  time: [\d.]+s", line) for line in summary)
    listed = block(lines, f"  outputs in {out}:")
    names = [entry.split()[0] for entry in listed]
    assert {"best_model.pth", "checkpoint.pth", "metrics.csv", "curves.png", "training.log",
            "test_metrics.json"} <= set(names)
    assert all((out / name.rstrip("/")).exists() for name in names)
    commands = summary[summary.index("  next:") + 1:]
    parsed = dict(parse_command(line.strip()) for line in commands)
    assert parsed["validate.py"].data_dir == str(data / "test")
    assert parsed["predict.py"].model == str(out / "best_model.pth")
    log = (out / "training.log").read_text(encoding="utf-8")
    assert "summary:" in log and "  next:" in log  # the block is in training.log too


def test_previous_runs_beyond_three_are_a_notice_with_count_size_and_removal(tmp_path):
    out = tmp_path / "out"
    logged: list[str] = []
    for i in range(3):
        write(out / f"previous_run_2024010{i}-000000" / "checkpoint.pth", 1_000_000)
    outdir.note_previous_runs(out, logged.append)
    assert logged == []  # a few earlier runs are no news
    write(out / "previous_run_20240105-000000" / "best_model.pth", 500_000)
    outdir.note_previous_runs(out, logged.append)
    (notice,) = logged
    assert notice.startswith(f"notice: {out} holds 4 earlier runs")
    assert "3.5 MB in all" in notice and f"rm -r {out}/previous_run_*" in notice


def test_a_new_run_into_a_crowded_folder_says_so(tmp_path):
    out = tmp_path / "out"
    for i in range(3):
        write(out / f"previous_run_2024010{i}-000000" / "metrics.csv", 10)
    write(out / "metrics.csv", 10)  # the run before this one
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(LOGGER_NAME)
    handler = Keep()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        session_mod.archive_previous_run(out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(outdir.previous_runs(out)) == 4
    assert any(r.startswith(f"notice: {out} holds 4 earlier runs") for r in records), records


def test_human_size():
    assert [outdir.human_size(n) for n in (0, 999, 4100, 12.34e6, 372e6, 2.9e9)] == \
        ["0 B", "999 B", "4.1 kB", "12.3 MB", "372 MB", "2.9 GB"]


def test_finish_run_outside_a_session_logs_at_once_without_a_time(tmp_path):
    from types import SimpleNamespace

    from common.trainer import finish_run

    out = tmp_path / "out"
    model = write(out / "best_model.pth", 10)
    logged: list[str] = []
    s = SimpleNamespace(output=out, is_main=True, log=logged.append)
    finish_run(s, namespace(data_dir=None), "done: it worked", task="classification", model=model,
               best="val accuracy 50.00% at epoch 1 (1 epoch trained)")
    assert logged[0] == "summary:" and logged[-1] == "done: it worked"
    assert not any(line.startswith("  time:") for line in logged)
    assert logged[-2] == f"    python export_onnx.py --model {model} --output {out / 'model.onnx'}"
