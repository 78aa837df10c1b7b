"""test_model.py: the five checks on a good checkpoint, on damaged files and on files made
elsewhere, the exit codes, and the ASCII marks for consoles that cannot show emoji."""
from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder

import gpu_train
import test_model
from common import selftest
from common.checkpoint import load_checkpoint
from common.inference import load_for_inference
from common.models.small import SmallCNN

PASS, FAIL, SKIP = (selftest.MARKS[k] for k in ("pass", "fail", "skip"))
QUICK = ["--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint (1 epoch) and its validation folder, shared by the whole file."""
    root = tmp_path_factory.mktemp("test_model")
    data = root / "data"
    make_folder(data / "train", per_class=8, seed=1)
    make_folder(data / "val", per_class=6, seed=2)
    out = root / "out"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *FAST, "--epochs", "1"]) == 0
    return {"root": root, "model": out / "best_model.pth", "val": data / "val"}


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = test_model.main([*QUICK, *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out


def check_line(out: str, number: int) -> str:
    """The marked line of check `number`."""
    lines = [line for line in out.splitlines() if re.match(rf"^\S+ {number}\. ", line)]
    assert len(lines) == 1, out
    return lines[0]


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


# ---------------------------------------------------------------- a good checkpoint

def test_good_checkpoint_passes_every_check(trained, capsys):
    code, out = run(capsys, "--model-path", str(trained["model"]), "--data-dir", str(trained["val"]))
    assert code == 0, out
    names = ["file integrity", "device", "forward pass", "quick evaluation", "memory"]
    for number, name in enumerate(names, 1):
        assert check_line(out, number).startswith(f"{PASS} {number}. {name}: "), out
    assert out.rstrip().splitlines()[-1] == f"{PASS} {selftest.READY}"

    ckpt = load_checkpoint(trained["model"])
    params = sum(p.numel() for p in SmallCNN(2).parameters())
    assert f"{params:,} parameters" in check_line(out, 1)
    assert hashlib.sha256(trained["model"].read_bytes()).hexdigest() in out
    assert "classes (2): bottom, top" in out
    assert "input (8, 3, 32, 32) -> output (8, 2), all finite" in check_line(out, 3)
    if torch.cuda.is_available():  # --device auto takes the GPU
        from common.device import describe

        shown = describe(torch.device("cuda", 0)).removeprefix("device: ")
        assert check_line(out, 2) == f"{PASS} 2. device: {shown}"
        assert re.fullmatch(rf"{re.escape(PASS)} 5\. memory: peak GPU memory of the forward pass \d+\.\d MiB "
                            r"at batch size 8 \(\d+\.\d% of \d+\.\d GiB\)", check_line(out, 5))
    else:  # no GPU: stated, not failed
        threads = torch.get_num_threads()
        assert check_line(out, 2) == (f"{PASS} 2. device: CPU only ({threads} threads), no GPU in use: fine "
                                      "for this test, slow for fine-tuning")
        assert re.fullmatch(rf"{re.escape(PASS)} 5\. memory: peak process memory \(RSS\) \d+\.\d MiB "
                            r"\(no GPU memory to measure on cpu\)", check_line(out, 5))

    # 3 batches of 8 cover all 12 validation images: the accuracy training measured on them
    match = re.search(r"accuracy (\d+\.\d\d)% \((\d+)/(\d+) images, 2 batch\(es\)\), loss (\d+\.\d+)",
                      check_line(out, 4))
    assert match, out
    assert int(match.group(3)) == 12
    assert float(match.group(1)) == pytest.approx(100 * ckpt["metrics"]["val_acc"], abs=0.005)
    assert int(match.group(2)) == round(ckpt["metrics"]["val_acc"] * 12)
    assert float(match.group(4)) == pytest.approx(ckpt["metrics"]["val_loss"], abs=1e-3)


def test_batches_limits_the_quick_evaluation(trained, capsys):
    code, out = run(capsys, "--model", str(trained["model"]), "--data-dir", str(trained["val"]),
                    "--batches", "1", "--batch-size", "5")
    assert code == 0, out
    assert "/5 images, 1 batch(es))" in check_line(out, 4)
    assert "data: 5 of 12 images" in out


def test_quick_evaluation_samples_across_classes(trained):
    """A few batches in folder order would all come from the first class."""
    args = test_model.build_parser().parse_args(["--model-path", str(trained["model"]), "--batches", "1",
                                                 "--batch-size", "4"])
    loaded = load_for_inference(trained["model"], torch.device("cpu"))
    run = selftest.Run(args, set(), torch.device("cpu"), None, [], loaded=loaded, num_classes=2)
    chosen, details = selftest.eval_samples(trained["val"], run)
    assert len(chosen) == 4 and {label for _, label in chosen} == {0, 1}
    assert all(Path(path).parent.name == ["bottom", "top"][label] for path, label in chosen)
    assert details == [f"data: 4 of 12 images in {trained['val']} (random sample)"]


def test_equals_form_and_skipped_evaluation_without_data(trained, capsys):
    code, out = run(capsys, f"--model-path={trained['model']}")
    assert code == 0, out
    assert check_line(out, 4) == f"{SKIP} 4. quick evaluation: no --data-dir (pass a folder of class " \
                                 "folders to measure accuracy)"
    assert out.rstrip().endswith(selftest.READY)


def test_unknown_class_folders_fail_the_evaluation(trained, capsys, tmp_path):
    data = make_folder(tmp_path / "data", classes=("top", "cat", "dog"), per_class=2)
    code, out = run(capsys, "--model", str(trained["model"]), "--data-dir", str(data))
    assert code == 1
    line = check_line(out, 4)
    assert line.startswith(f"{FAIL} 4.") and "cat, dog" in line and "bottom, top" in line
    assert check_line(out, 3).startswith(PASS)
    assert "1 of 5 checks failed (quick evaluation)" in out


# ---------------------------------------------------------------- damaged files

def flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


DAMAGE = {
    "flipped": (flipped, "corrupt"),
    "truncated": (lambda data: data[: len(data) // 2], "truncated"),
    "random": (lambda data: bytes(range(256)) * 16, "not a PyTorch file"),
    "empty": (lambda data: b"", "empty"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_fails_check_1(trained, capsys, tmp_path, kind):
    damage, words = DAMAGE[kind]
    path = tmp_path / "damaged.pth"
    path.write_bytes(damage(trained["model"].read_bytes()))
    code, out = run(capsys, "--model-path", str(path))
    assert code == 1
    line = check_line(out, 1)
    assert line.startswith(f"{FAIL} 1. file integrity: ") and words in line and str(path) in line
    assert check_line(out, 3).startswith(f"{SKIP} 3. forward pass: needs a model that loads")
    assert "trust-checkpoint" not in line  # never advise the unsafe loader for garbage


def test_a_model_path_that_does_not_exist_is_a_command_line_error(capsys, tmp_path):
    """A typo in the path is the command's fault, not the model's: one line, exit 2, no check."""
    for path, words in ((tmp_path / "nope.pth", "does not exist"), (tmp_path, "is a folder")):
        assert test_model.main(["--model-path", str(path)]) == 2
        captured = capsys.readouterr()
        errors = captured.err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and words in errors[0]
        assert "1. file integrity" not in captured.out


def test_nan_weight_is_named(trained, capsys, tmp_path):
    ckpt = load_checkpoint(trained["model"])
    ckpt["state_dict"]["features.1.0.weight"].view(-1)[3] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(ckpt, path)
    code, out = run(capsys, "--model-path", str(path))
    assert code == 1
    line = check_line(out, 1)
    assert line.startswith(FAIL) and "features.1.0.weight (1 NaN)" in line
    assert "features.0.0.weight" not in line  # only the damaged tensor is named


def test_newer_checkpoint_version_fails(trained, capsys, tmp_path):
    ckpt = load_checkpoint(trained["model"])
    ckpt["version"] = 99
    path = tmp_path / "future.pth"
    torch.save(ckpt, path)
    code, out = run(capsys, "--model-path", str(path))
    assert code == 1 and "version 99, newer" in check_line(out, 1)


# ---------------------------------------------------------------- files made elsewhere

def test_plain_state_dict_needs_arch(trained, capsys, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(state_dict_of(trained["model"]), path)
    code, out = run(capsys, "--model-path", str(path))
    assert code == 1 and "--arch" in check_line(out, 1) and check_line(out, 1).startswith(FAIL)

    code, out = run(capsys, "--model-path", str(path), "--arch", "small_cnn", "--num-classes", "2",
                    "--img-size", "32", "--data-dir", str(trained["val"]))
    assert code == 0, out
    assert check_line(out, 1).startswith(f"{PASS} 1. file integrity: a plain state_dict, small_cnn")
    assert "output (8, 2)" in check_line(out, 3)
    assert "/12 images" in check_line(out, 4)  # folders in sorted order are labels 0..1


def test_state_dict_that_does_not_fit_arch_names_the_keys(trained, capsys, tmp_path):
    state = state_dict_of(trained["model"])
    state["extra.weight"] = state.pop("head.2.weight")
    path = tmp_path / "other.pth"
    torch.save(state, path)
    code, out = run(capsys, "--model-path", str(path), "--arch", "small_cnn", "--num-classes", "2",
                    "--img-size", "32")
    assert code == 1
    line = check_line(out, 1)
    assert "missing: head.2.weight" in line and "unexpected: extra.weight" in line


def whole_model(trained, tmp_path: Path) -> Path:
    model = SmallCNN(2)
    model.load_state_dict(state_dict_of(trained["model"]))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    return path


def test_whole_pickled_model_needs_trust(trained, capsys, tmp_path):
    path = whole_model(trained, tmp_path)
    code, out = run(capsys, "--model-path", str(path), "--img-size", "32")
    assert code == 1 and "--trust-checkpoint" in check_line(out, 1)

    code, out = run(capsys, "--model-path", str(path), "--img-size", "32", "--trust-checkpoint")
    assert code == 0, out
    assert check_line(out, 1).startswith(f"{PASS} 1. file integrity: a whole pickled model, SmallCNN")
    assert "input (8, 3, 32, 32) -> output (8, 2)" in check_line(out, 3)


def test_output_width_must_match_num_classes(trained, capsys, tmp_path):
    path = whole_model(trained, tmp_path)
    code, out = run(capsys, "--model-path", str(path), "--img-size", "32", "--trust-checkpoint",
                    "--num-classes", "3")
    assert code == 1
    assert check_line(out, 3) == f"{FAIL} 3. forward pass: input (8, 3, 32, 32) gives output (8, 2), " \
                                 "expected (8, 3)"


class Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_not_run(trained, capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": state_dict_of(trained["model"]), "payload": evil}, path)
    code, out = run(capsys, "--model-path", str(path), "--arch", "small_cnn", "--num-classes", "2")
    assert code == 1
    assert "--trust-checkpoint" in check_line(out, 1) and check_line(out, 1).startswith(FAIL)
    assert not marker.exists()


# ---------------------------------------------------------------- command line and output

def test_argument_errors_exit_2(trained, capsys):
    with pytest.raises(SystemExit) as info:
        test_model.main([])
    assert info.value.code == 2 and "--model-path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        test_model.main(["--model-path", str(trained["model"]), "--batches", "three"])
    assert info.value.code == 2
    for bad in (["--batches", "0"], ["--arch", "no_such_net"], ["--device", "tpu"]):
        capsys.readouterr()
        assert test_model.main(["--model-path", str(trained["model"]), *bad]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.out == ""  # no check ran


def test_ascii_marks_when_the_console_cannot_encode_emoji(trained, monkeypatch):
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp936")  # a Chinese Windows console
    monkeypatch.setattr(sys, "stdout", console)
    code = test_model.main([*QUICK, "--model-path", str(trained["model"])])
    console.flush()
    text = raw.getvalue().decode("cp936")
    assert code == 0
    assert re.search(r"^\[PASS\] 1\. file integrity: ", text, re.M)
    assert re.search(r"^\[SKIP\] 4\. quick evaluation: ", text, re.M)
    assert text.rstrip().splitlines()[-1] == f"[PASS] {selftest.READY}"
    assert PASS not in text and SKIP not in text
    assert selftest.pick_marks(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")) == selftest.MARKS


def test_peak_rss_fallbacks(monkeypatch, tmp_path):
    assert selftest.peak_rss_bytes() > 10 * 2**20  # getrusage: a Python process with torch loaded
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: the import fails
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n")
    assert selftest.peak_rss_bytes(status) == 123456 * 1024
    assert selftest.peak_rss_bytes(tmp_path / "missing") is None


def test_memory_check_says_unavailable(monkeypatch):
    monkeypatch.setattr(selftest, "peak_rss_bytes", lambda: None)
    args = test_model.build_parser().parse_args(["--model-path", "x"])
    result = selftest.check_memory(selftest.Run(args, set(), torch.device("cpu"), None, []))
    assert result.status == "skip" and "unavailable" in result.summary
