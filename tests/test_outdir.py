"""One output folder, one run: the lock, the writability check before any work, the sweep of
temporary files of killed saves, and the numbers a run refuses before it starts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import FAST

import gpu_train
from common.errors import UserError
from common.outdir import LOCK_NAME, OutputLock


def run(dataset, out, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1", *extra])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(dataset, out) == 0
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-12-02T10:00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder))  # a live run (pytest's parent) holds it
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run(dataset, out) == 2
    err = capsys.readouterr().err
    assert f"output folder {out} is in use by another run (pid {os.getppid()} on " in err
    assert "pass another --output" in err and err.count("\n") == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing moved or written


def test_a_lock_from_another_host_is_refused_too(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-machine"}))
    assert run(dataset, out) == 2
    assert "pid 1 on some-other-machine" in capsys.readouterr().err


def test_the_lock_of_a_dead_run_is_taken_over_with_a_notice(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert run(dataset, out) == 0
    assert f"was locked by a run that has ended (pid {pid}); taking it over" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_the_lock_is_held_during_the_run_and_released_after_an_error(dataset, tmp_path, monkeypatch):
    from common import session

    out = tmp_path / "out"
    seen = []
    original = session.EpochWriter.__call__

    def look(self, state, record, improved):
        seen.append(json.loads((out / LOCK_NAME).read_text())["pid"])
        original(self, state, record, improved)
        raise KeyboardInterrupt

    monkeypatch.setattr(session.EpochWriter, "__call__", look)
    assert run(dataset, out) == 130
    assert seen == [os.getpid()] and not (out / LOCK_NAME).exists()


def test_lock_acquire_is_exclusive(tmp_path):
    first, second = OutputLock(tmp_path), OutputLock(tmp_path)
    first.acquire(print)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match="in use by another run"):
        second.acquire(print)
    first.release()


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_an_output_that_cannot_be_a_folder_is_one_line_before_any_work(dataset, tmp_path, capsys, kind):
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    out = blocker if kind == "file" else blocker / "out"
    assert run(dataset, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(out) in err
    assert blocker.read_text() == "mine"


def test_temporary_files_of_a_killed_save_are_swept_with_the_space_freed(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint.pth.abc123.tmp").write_bytes(b"\0" * 3_000_000)
    assert run(dataset, out) == 0
    assert "removed 1 temporary file(s) of an interrupted save (3.0 MB freed)" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr must be a number > 0, got nan"),
    ("--lr", "inf", "--lr must be a number > 0, got inf"),
    ("--label-smoothing", "1", "--label-smoothing must be a number >= 0 and < 1, got 1.0"),
    ("--weight-decay", "-0.1", "--weight-decay must be a number >= 0, got -0.1"),
    ("--clip-grad", "-1", "--clip-grad must be a number > 0, got -1.0"),
    ("--momentum", "1.5", "--momentum must be a number >= 0 and <= 1, got 1.5"),
    ("--warmup-epochs", "-2", "--warmup-epochs must be a number >= 0, got -2.0"),
    ("--step-size", "0", "--step-size must be a number > 0, got 0"),
    ("--t-mult", "0", "--t-mult must be a number >= 1, got 0"),
])
def test_numbers_a_run_cannot_use_are_refused_before_it_starts(dataset, tmp_path, capsys, flag, value,
                                                               message):
    out = tmp_path / "out"
    assert run(dataset, out, flag, value) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not out.exists()


def test_resume_into_another_folder_continues_there_with_every_output(dataset, tmp_path, capsys):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    assert run(dataset, first, "--epochs", "1") == 0
    capsys.readouterr()
    assert gpu_train.main(["--resume", str(first / "checkpoint.pth"), "--epochs", "2",
                           "--output", str(elsewhere)]) == 0
    out = capsys.readouterr().out
    assert f"copied the best model so far from {first / 'best_model.pth'}" in out
    last = out.strip().splitlines()[-1]
    named = [word.rstrip(",;") for word in last.split() if word.endswith((".pth", ".pth,", ".pth;"))]
    assert named and all(os.path.isfile(name) for name in named), last
    assert all(str(elsewhere) in name for name in named)


def test_resume_into_a_folder_holding_another_run_moves_that_run_aside(dataset, tmp_path, capsys):
    """--resume A/checkpoint.pth --output B, where B holds run B: B's files go to previous_run_*
    (as for a new run into B), never replaced; the resumed run then has B to itself."""
    import csv

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(dataset, a, "--epochs", "2") == 0
    assert run(dataset, b, "--epochs", "1", "--seed", "7") == 0
    b_metrics, b_best = (b / "metrics.csv").read_text(), (b / "best_model.pth").read_bytes()
    capsys.readouterr()
    assert gpu_train.main(["--resume", str(a / "checkpoint.pth"), "--epochs", "3", "--output", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"notice: {b} held an earlier run; moved its files to " in out
    (archive,) = b.glob("previous_run_*")
    assert (archive / "metrics.csv").read_text() == b_metrics
    assert (archive / "best_model.pth").read_bytes() == b_best
    rows = list(csv.DictReader((b / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # run A's history, continued
    assert f"copied the best model so far from {a / 'best_model.pth'}" in out  # not run B's best model


def test_results_files_in_missing_folders_are_created_and_impossible_ones_refused_first(dataset, tmp_path,
                                                                                         capsys):
    import predict
    import validate

    out = tmp_path / "out"
    assert run(dataset, out) == 0
    model = str(out / "best_model.pth")
    results = tmp_path / "new" / "deeper" / "results.json"
    assert validate.main(["--model", model, "--data-dir", str(dataset / "val"), "--num-workers", "0",
                          "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["images"] == 12
    preds = tmp_path / "other" / "preds.csv"
    image = next((dataset / "val" / "top").iterdir())
    assert predict.main(["--model", model, "--input", str(image), "--output", str(preds)]) == 0
    assert preds.read_text().count("\n") >= 2
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    capsys.readouterr()
    assert validate.main(["--model", model, "--data-dir", str(dataset / "val"),
                          "--results-file", str(blocker / "results.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: cannot write --results-file {blocker / 'results.json'}")
    assert "top-1" not in captured.out  # refused before the evaluation
