"""A full disk (ENOSPC) and a folder without permission (EACCES) at every writer: the checkpoint, the
best model, training.log, metrics.csv, TensorBoard, the plots (curves.png, the confusion matrix),
ONNX, predictions (CSV/JSON, U-Net masks). Each is one `error:` line naming the file (for a checkpoint
also the room it needs and that the previous one is intact), exit 2, no traceback, and nothing
already saved is lost: what was on disk still loads, the file that failed is as it was, a file the
user had is not truncated, no temporary file is left behind.

The faults are injected in this process at the OS calls the writers make (tests/chaos/interpose.py):
a full disk fails the first write of a file opened for writing, a forbidden folder fails the open.
"""
from __future__ import annotations

import errno
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder
from interpose import DiskFault, Interposer

import export_onnx
import gpu_train
import predict
import train_unet
import validate
from common.checkpoint import atomic_save, load_checkpoint
from common.errors import UserError
from common.reporting import TensorBoard

# a writer thread's traceback (TensorBoard's own, say) is on the user's console too: it fails the test
pytestmark = [pytest.mark.chaos,
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

CODES = [pytest.param(errno.ENOSPC, id="ENOSPC"), pytest.param(errno.EACCES, id="EACCES")]
REASON = {errno.ENOSPC: "the disk is full", errno.EACCES: "Permission denied"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    make_folder(root / "train", per_class=16, seed=1)
    make_folder(root / "val", per_class=6, seed=2)
    return root


@pytest.fixture(scope="module")
def template(data, tmp_path_factory) -> Path:
    """A run after its first epoch: every output of a training run is on disk."""
    out = tmp_path_factory.mktemp("template") / "out"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "1"]) == 0
    # The resumed epoch must be a new best for sure (its best_model.pth write is one the faults hit).
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["train_state"]["best_metric"] = -1.0
    atomic_save(ckpt, out / "checkpoint.pth")
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def inject(pattern: str, code: int, call, *args, **where: int):
    """call(*args) with the fault installed (where: DiskFault's skip, at_write); returns (exit code,
    the fault)."""
    fault = DiskFault(pattern, code, **where)
    with Interposer(fault):
        result = call(*args)
    return result, fault


def error_line(capsys) -> str:
    """The run's one `error:` line (after any progress bars); no traceback anywhere."""
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out, err
    assert err.count("error:") == 1, err
    line = err[err.index("error: "):]
    assert line.count("\n") == 1, line
    return line.strip()


def no_temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------- training writers

# writer: (regex on the path under the output folder, what the error line names, where a full disk
# fails it: in a checkpoint not the first write, which torch.save raises as it is, but a later one,
# which its C++ writer reports as "unexpected pos"; TensorBoard opens its events file for each write:
# the second open is the first epoch's scalars, after the file's header)
TRAINING_WRITERS = {
    "checkpoint": (r"checkpoint\.pth", "checkpoint.pth", {"at_write": 3}),
    "best_model": (r"best_model\.pth", "best_model.pth", {"at_write": 3}),
    "training.log": (r"training\.log$", "training.log", {}),
    "metrics.csv": (r"metrics\.csv", "metrics.csv", {}),
    "tensorboard": (r"tensorboard/[^/]*tfevents", "tensorboard", {"skip": 1}),
    "curves.png": (r"curves[^/]*\.png$", "curves.png", {}),
}


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("writer", list(TRAINING_WRITERS))
def test_a_training_writer_that_fails_is_one_line_and_loses_nothing(writer, code, data, template, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    shutil.copytree(template, out)
    before = files(out)
    pattern, named, full_disk = TRAINING_WRITERS[writer]
    resume = ["--data-dir", str(data), "--num-workers", "0", "--resume", str(out / "checkpoint.pth"),
              "--epochs", "2"]
    capsys.readouterr()
    code_out, fault = inject(re.escape(str(out)) + "/.*" + pattern, code, gpu_train.main, resume,
                             **(full_disk if code == errno.ENOSPC else {}))
    assert fault.fired, f"the {writer} fault never fired: the writer no longer writes where expected"
    assert code_out == 2
    line = error_line(capsys)
    failed = re.match(r"error: could not write (.+?): ", line)
    assert failed, line
    if writer == "tensorboard":  # the events file, or the folder when the error names no file
        assert str(out / named) in failed[1], line
    else:
        assert failed[1] == str(out / named), line
    assert REASON[code] in line
    assert "is intact: make room or fix the folder, then continue with --resume " \
        f"{out / 'checkpoint.pth'}" in line
    if writer in ("checkpoint", "best_model") and code == errno.ENOSPC:
        assert re.search(r"\(about \d+ MB needed\); the previous checkpoint\.pth in ", line), line

    after = files(out)
    for name, old in before.items():  # what the failed writer had written before is as it was
        if re.search(pattern, str(out / name)) and name != "training.log":
            assert after.get(name) == old, f"{name} was changed or lost"
    assert (out / "training.log").read_bytes().startswith((template / "training.log").read_bytes())
    for saved in ("checkpoint.pth", "best_model.pth"):  # still (or newly, completely) loadable
        load_checkpoint(out / saved)
    if writer in ("checkpoint", "best_model", "training.log"):  # failed before this epoch's checkpoint
        assert after["checkpoint.pth"] == before["checkpoint.pth"]
    assert not no_temporary_files(out)
    assert not (out / ".toolkit.lock").exists()


def test_after_a_full_disk_the_advised_resume_finishes(data, template, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(template, out)
    resume = ["--data-dir", str(data), "--num-workers", "0", "--resume", str(out / "checkpoint.pth"),
              "--epochs", "2"]
    code, fault = inject(re.escape(str(out)) + r"/.*checkpoint\.pth", errno.ENOSPC, gpu_train.main, resume)
    assert code == 2 and fault.fired
    assert f"--resume {out / 'checkpoint.pth'}" in error_line(capsys)
    assert gpu_train.main(resume) == 0
    assert load_checkpoint(out / "checkpoint.pth")["train_state"]["epoch"] == 2


def test_a_full_disk_in_the_first_epoch_says_that_nothing_was_saved(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, fault = inject(re.escape(str(out)) + r"/.*checkpoint\.pth", errno.ENOSPC, gpu_train.main,
                         ["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "1"], at_write=3)
    assert code == 2 and fault.fired
    line = error_line(capsys)
    assert line.startswith(f"error: could not write {out / 'checkpoint.pth'}: the disk is full")
    assert "nothing was saved yet: make room or fix the folder, then run the same command again" in line
    assert "intact" not in line and "--resume" not in line
    assert not (out / "checkpoint.pth").exists() and not no_temporary_files(out)


def test_tensorboard_scalars_that_cannot_be_written_are_one_user_error_once(tmp_path):
    pytest.importorskip("tensorboard")
    board = TensorBoard(tmp_path / "tb", log=print)
    fault = DiskFault(re.escape(str(tmp_path / "tb")) + "/.*tfevents", errno.ENOSPC)
    with Interposer(fault), pytest.raises(UserError, match=r"could not write the TensorBoard log in .*tb: "
                                          "the disk is full; make room on the disk"):
        board.scalars({"epoch": 1, "train_loss": 0.5, "lr": 0.1})
    assert fault.fired
    board.close()  # the broken writer is gone: closing the run does not fail a second time


# --------------------------------------------------------------------- tools after training

USER_FILE = b"the user's own file, which must survive\n"


@pytest.fixture
def model(template, tmp_path) -> Path:
    """A copy of the best model in a folder of its own."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy2(template / "best_model.pth", folder / "best_model.pth")
    return folder / "best_model.pth"


def survives(root: Path, content: bytes) -> bool:
    """The user's file is still somewhere under root, byte for byte (unchanged, or moved aside)."""
    return any(p.is_file() and p.read_bytes() == content for p in root.rglob("*"))


@pytest.mark.parametrize("code", CODES)
def test_validate_confusion_matrix(code, model, data, tmp_path, capsys):
    (model.parent / "confusion_matrix.png").write_bytes(USER_FILE)
    capsys.readouterr()
    result, fault = inject(re.escape(str(tmp_path)) + r"/.*confusion_matrix[^/]*\.png$", code, validate.main,
                           ["--model", str(model), "--data-dir", str(data / "val"), "--num-workers", "0"])
    assert fault.fired and result == 2
    line = error_line(capsys)
    assert "confusion_matrix.png" in line and REASON[code] in line
    assert "--resume" not in line  # validate.py takes no --resume: no training run to continue here
    assert survives(tmp_path, USER_FILE)
    assert not no_temporary_files(tmp_path)


@pytest.mark.parametrize("code", CODES)
def test_export_onnx(code, model, tmp_path, capsys):
    target = tmp_path / "export" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(USER_FILE)
    capsys.readouterr()
    result, fault = inject(re.escape(str(target.parent)) + r"/.*\.onnx", code, export_onnx.main,
                           ["--model", str(model), "--output", str(target)])
    assert fault.fired and result == 2
    line = error_line(capsys)
    assert str(target) in line and REASON[code] in line
    assert target.read_bytes() == USER_FILE
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]  # no temporary folder


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_results_file(suffix, code, model, data, tmp_path, capsys):
    target = tmp_path / "predictions" / f"results{suffix}"
    target.parent.mkdir()
    target.write_bytes(USER_FILE)
    capsys.readouterr()
    result, fault = inject(re.escape(str(target.parent)) + "/.*results", code, predict.main,
                           ["-m", str(model), "-i", str(data / "val"), "--output", str(target)])
    assert fault.fired and result == 2
    line = error_line(capsys)
    assert str(target) in line and REASON[code] in line
    assert survives(target.parent, USER_FILE)
    assert not no_temporary_files(target.parent)


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny U-Net's best_model.pth, an image to predict)."""
    from common.data.segmentation import make_shapes_dataset

    root = tmp_path_factory.mktemp("unet")
    shapes = make_shapes_dataset(root / "data", n=8, size=32)
    out = root / "out"
    assert train_unet.main(["--data-dir", str(shapes), "--output", str(out), "-e", "1", "-b", "4", "-v", "25",
                            "-s", "1", "--width", "8", "--num-workers", "0"]) == 0
    return out / "best_model.pth", sorted((shapes / "imgs").iterdir())[0]


@pytest.mark.parametrize("code", CODES)
def test_predict_unet_mask(code, unet, tmp_path, capsys):
    checkpoint, image = unet
    target = tmp_path / "masks" / "mask.png"
    target.parent.mkdir()
    target.write_bytes(USER_FILE)
    capsys.readouterr()
    result, fault = inject(re.escape(str(target.parent)) + r"/\.?mask\.png[^/]*$", code, predict.main,
                           ["-m", str(checkpoint), "-i", str(image), "-o", str(target)])
    assert fault.fired and result == 2
    line = error_line(capsys)
    assert str(target) in line and REASON[code] in line
    assert survives(target.parent, USER_FILE)
    assert not no_temporary_files(target.parent)
