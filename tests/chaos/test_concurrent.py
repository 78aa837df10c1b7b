"""Two real training processes into one output folder: the second is refused with one `error:` line
(exit 2) and touches nothing of the first, which then finishes as if alone.

The first (tests/chaos/faulty_run.py running gpu_train.py) waits in its second epoch, after its
epoch-1 checkpoint writes have finished, while the second runs from start to end.
"""
from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, make_folder

from common.outdir import LOCK_NAME

pytestmark = pytest.mark.chaos

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 4  # 32 training images in batches of 8
GUARD_S = 180  # a deadlock guard, not a timing


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under folder (hidden ones too): content digest and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path):
    data = tmp_path / "data"
    make_folder(data / "train", per_class=16, seed=1)
    make_folder(data / "val", per_class=6, seed=2)
    out, marker, go, log = tmp_path / "out", tmp_path / "paused.json", tmp_path / "go", tmp_path / "first.log"
    argv = ["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "2"]
    with open(log, "wb") as sink:
        pause = ["--pause", f"step:{STEPS + 1}", "--quiet", "--marker", str(marker), "--go", str(go)]
        command = [sys.executable, str(HERE / "faulty_run.py"), *pause, "--", "gpu_train", *argv]
        first = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + GUARD_S
            while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert marker.exists(), f"the first run never reached epoch 2:\n{log.read_text()[-3000:]}"
            before = snapshot(out)
            second = subprocess.run([sys.executable, "gpu_train.py", *argv], cwd=ROOT, capture_output=True,
                                    text=True, timeout=GUARD_S)
            after = snapshot(out)
            go.touch()
            assert first.wait(timeout=GUARD_S) == 0, log.read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()

    assert second.returncode == 2
    assert "Traceback" not in second.stdout + second.stderr, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: output folder {out} is in use by another run (pid {first.pid} on ")
    assert "checkpoint.pth" in before and "best_model.pth" in before and LOCK_NAME in before
    assert after == before, "the refused run changed the first run's folder"

    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("done:"), last
    assert all(Path(p).is_file() for p in re.findall(r"(/\S+?\.pth)", last)), last
    with open(out / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]
    assert not list(out.glob("previous_run_*")), "the first run's files were moved aside"
    assert (out / "training.log").read_text().count("device: ") == 1  # no line of the second run
    assert not (out / LOCK_NAME).exists()
