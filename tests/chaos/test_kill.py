"""kill -9 at reproducible random instants of a short training, inside every kind of save included:
whatever the instant, every checkpoint left in the folder loads, the checkpoint never counts on a best
model that is not on disk, and `--resume` (or, before the first checkpoint, the same command again)
finishes with exit 0, its last line naming files that exist and a best model that is the one it says.

A real process (tests/chaos/faulty_run.py running gpu_train.py) stops at the instant and is killed
with SIGKILL; the resume runs in this process. `make test` kills at 4 instants: inside a checkpoint
save, inside a best-model save, between the two writes of an epoch, and one drawn at random;
`make chaos` at 20 (CHAOS_KILLS). CHAOS_SEED (default 11) draws the random ones; each test's id is
its instant, and a failure names both.
"""
from __future__ import annotations

import csv
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, make_folder

import gpu_train
from common.checkpoint import load_checkpoint
from common.errors import UserError

pytestmark = pytest.mark.chaos

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EPOCHS, STEPS = 3, 4  # 32 training images in batches of 8
KILLS = int(os.environ.get("CHAOS_KILLS", "4"))
SEED = int(os.environ.get("CHAOS_SEED", "11"))
GUARD_S = 180  # a run that reaches no instant in this long is broken, not slow

# Always: inside a checkpoint save with the previous checkpoint on disk, inside a best-model save,
# and between the two writes of an epoch (after whichever comes first). Syntax: faulty_run.py.
ESSENTIAL = ["write:checkpoint.pth:2:40", "write:best_model.pth:1:40",
             "replaced:best_model.pth,checkpoint.pth:1"]
# With more kills also: inside each checkpoint save, just before a rename, metrics.csv, curves.png
# (drawn after epoch 1, in the writer thread, and at the end, in the training thread).
EVERY_SAVE = ["write:checkpoint.pth:1:10", "write:checkpoint.pth:3:150", "replace:checkpoint.pth:2",
              "write:metrics.csv:2:1", "write:curves.png:1:1", "write:curves.png:2:1"]


def candidates() -> list[str]:
    """Every instant a kill may be drawn from (each is sure to come in a 3-epoch run)."""
    steps = [f"step:{k}" for k in range(1, EPOCHS * STEPS + 1)]
    writes = [f"write:checkpoint.pth:{n}:{c}" for n in range(1, EPOCHS + 1) for c in (1, 10, 40, 150)]
    writes += [f"write:best_model.pth:1:{c}" for c in (1, 10, 40)]
    writes += [f"write:metrics.csv:{n}:1" for n in range(1, EPOCHS + 1)] + ["write:curves.png:2:1"]
    saves = {"checkpoint.pth": EPOCHS, "best_model.pth": 1, "metrics.csv": EPOCHS, "curves.png": 2}
    renames = [f"{kind}:{name}:{n}" for kind in ("replace", "replaced") for name, count in saves.items()
               for n in range(1, count + 1)]
    return steps + writes + renames


def instants(kills: int, seed: int) -> list[str]:
    fixed = (ESSENTIAL + (EVERY_SAVE if kills >= 10 else []))[:kills]
    rest = [i for i in candidates() if i not in fixed]
    return fixed + random.Random(seed).sample(rest, max(0, kills - len(fixed)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill") / "data"
    make_folder(root / "train", per_class=16, seed=1)
    make_folder(root / "val", per_class=6, seed=2)
    return root


def training(data: Path, out: Path, epochs: int = EPOCHS) -> list[str]:
    return ["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", str(epochs)]


def kill_at(instant: str, argv: list[str], tmp_path: Path, where: str) -> None:
    """Run gpu_train.py in a process of its own until it reaches `instant`, then SIGKILL it."""
    marker, log = tmp_path / "reached.json", tmp_path / "killed_run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, str(HERE / "faulty_run.py"), "--pause", instant, "--marker",
                                 str(marker), "--", "gpu_train", *argv], cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + GUARD_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no handler, no finally, no atexit
        proc.wait()
    ran = log.read_text(errors="replace")[-3000:]
    assert marker.exists(), f"{where}: the run never reached that instant (exit {proc.returncode}):\n{ran}"


def check_left_behind(out: Path, where: str) -> dict | None:
    """Every checkpoint in the folder loads; the checkpoint's best model is on disk and at least as
    good as it says (a newer best written just before the kill may be better). Returns checkpoint.pth."""
    loaded = {}
    for path in sorted(out.glob("*.pth")):
        try:
            loaded[path.name] = load_checkpoint(path)
        except UserError as exc:
            pytest.fail(f"{where}: {path.name} does not load after the kill: {exc}")
    ckpt = loaded.get("checkpoint.pth")
    if ckpt is not None and ckpt["train_state"].get("best_metric") is not None:
        best = loaded.get("best_model.pth")
        assert best is not None, f"{where}: checkpoint.pth counts on a best model, best_model.pth is missing"
        assert best["metrics"]["val_acc"] >= ckpt["train_state"]["best_metric"] - 1e-9, \
            f"{where}: best_model.pth is older than the best checkpoint.pth knows of"
    return ckpt


def check_last_line(stdout: str, out: Path, epochs: int, where: str) -> None:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("done:"), f"{where}: the last line is not the closing one: {last}"
    named = re.findall(r"(/\S+?\.pth)", last)
    assert named, last
    for path in named:
        assert Path(path).is_file(), f"{where}: the last line names {path}, which does not exist: {last}"
    best = load_checkpoint(out / "best_model.pth")
    said = re.search(r"best val accuracy ([\d.]+)% at epoch (\d+)", last)
    assert said and f"{100 * best['metrics']['val_acc']:.2f}" == said[1], \
        f"{where}: best_model.pth holds val acc {best['metrics']['val_acc']}, the last line says: {last}"
    assert load_checkpoint(out / "checkpoint.pth")["train_state"]["epoch"] == epochs, where
    with open(out / "metrics.csv", newline="") as fh:
        rows = [int(r["epoch"]) for r in csv.DictReader(fh)]
    assert rows == list(range(1, epochs + 1)), f"{where}: metrics.csv has the epochs {rows}"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], f"{where}: temporary files were left"


@pytest.mark.parametrize("instant", instants(KILLS, SEED))
def test_a_kill_at_any_instant_leaves_a_run_that_resumes(instant, data, tmp_path, capsys):
    where = f"kill -9 at {instant} (CHAOS_SEED={SEED}, CHAOS_KILLS={KILLS})"
    out = tmp_path / "out"
    kill_at(instant, training(data, out), tmp_path, where)
    ckpt = check_left_behind(out, where)
    if ckpt is None:  # killed before the first checkpoint: the same command again
        epochs, argv = EPOCHS, training(data, out)
    else:  # a kill after the last epoch's checkpoint leaves a finished run: train one epoch more
        epochs = max(EPOCHS, ckpt["train_state"]["epoch"] + 1)
        argv = [*training(data, out, epochs), "--resume", str(out / "checkpoint.pth")]
    capsys.readouterr()
    code = gpu_train.main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{where}: the run after the kill failed (exit {code}):\n{captured.err[-3000:]}"
    assert "was locked by a run that has ended" in captured.out, where  # the killed run's lock
    check_last_line(captured.out, out, epochs, where)
