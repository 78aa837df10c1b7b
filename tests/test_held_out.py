"""val_files.txt: a run that splits its validation images off the training folder lists them, the
summary's validate command evaluates those only (--files), and validate.py's score on them is the
run's own validation score; a wrong list is one line."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
from conftest import FAST, make_folder

import gpu_train
import train_unet
import validate
from common.data.images import folder_splits
from common.data.segmentation import find_pairs, make_shapes_dataset, split_pairs

UNET = ["-s", "1", "--width", "8", "-l", "3e-3", "--num-workers", "0", "--log-interval", "2"]


def listed(listing: Path) -> list[str]:
    return [line for line in listing.read_text().splitlines() if line and not line.startswith("#")]


def best_row(out: Path, metric: str) -> dict[str, str]:
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return max(rows, key=lambda r: float(r[metric]))


def suggested_validate(out: str) -> list[str]:
    # the summary printed, or training.log (a time first)
    line = next(line for line in out.splitlines() if "  python validate.py " in line)
    return shlex.split(line.split("  python validate.py ", 1)[1])


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, Path]:
    """Class folders with no train/ or val/: --val-split 0.25 draws the validation images."""
    root = tmp_path_factory.mktemp("flat")
    data = make_folder(root / "data", per_class=12, seed=5)
    out = root / "out"
    assert gpu_train.main([*FAST, "--data-dir", str(data), "--output", str(out), "--epochs", "2",
                           "--val-split", "0.25"]) == 0
    return data, out


def test_a_split_run_lists_exactly_its_validation_images(flat_run):
    data, out = flat_run
    expected = folder_splits(data, 0.25, 42).val  # gpu_train.py --seed defaults to 42
    names = listed(out / "val_files.txt")
    assert names == sorted(Path(p).relative_to(data).as_posix() for p, _ in expected)
    assert len(names) == 6 and all((data / n).is_file() for n in names)
    assert (out / "val_files.txt").read_text().startswith(f"# data-dir: {data}\n")


def test_the_suggested_command_scores_the_held_out_images_as_training_did(flat_run, capsys, tmp_path):
    data, out = flat_run
    log = (out / "training.log").read_text()
    argv = suggested_validate(log)
    assert argv == ["--model", str(out / "best_model.pth"), "--data-dir", str(data),
                    "--files", str(out / "val_files.txt")]
    capsys.readouterr()
    results = tmp_path / "r.json"
    assert validate.main([*argv, "--num-workers", "0", "--results-file", str(results)]) == 0
    payload = json.loads(results.read_text())
    assert payload["images"] == 6 and payload["files"] == str(out / "val_files.txt")
    best = best_row(out, "val_acc")
    assert payload["metrics"]["acc"] == pytest.approx(float(best["val_acc"]), abs=1e-6)
    assert payload["metrics"]["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)
    whole = tmp_path / "whole.json"  # without the list: every image of the folder
    assert validate.main(argv[:4] + ["--num-workers", "0", "--results-file", str(whole)]) == 0
    assert json.loads(whole.read_text())["images"] == 24


def test_a_train_folder_without_val_lists_its_split_relative_to_train(tmp_path, capsys):
    data = tmp_path / "data"
    make_folder(data / "train", per_class=8, seed=6)
    out = tmp_path / "out"
    assert gpu_train.main([*FAST, "--data-dir", str(data), "--output", str(out), "--epochs", "1"]) == 0
    argv = suggested_validate(capsys.readouterr().out)
    assert argv[argv.index("--data-dir") + 1] == str(data / "train")
    assert all((data / "train" / n).is_file() for n in listed(out / "val_files.txt"))


def test_train_and_val_folders_need_no_list(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "val_files.txt").write_text(f"# data-dir: {dataset}\ntop/old.png\n")  # an earlier run's
    assert gpu_train.main([*FAST, "--data-dir", str(dataset), "--output", str(out), "--epochs", "1"]) == 0
    assert not (out / "val_files.txt").exists()  # moved aside with that run, not suggested
    assert suggested_validate(capsys.readouterr().out) == [
        "--model", str(out / "best_model.pth"), "--data-dir", str(dataset / "val")]


def test_unet_run_lists_its_validation_pairs_and_validate_gives_its_dice(tmp_path, capsys):
    data = tmp_path / "data"
    make_shapes_dataset(data, n=8, size=32)
    out = tmp_path / "out"
    assert train_unet.main(["--data-dir", str(data), "--output", str(out), "-e", "2", "-b", "2",
                            "-v", "25", *UNET]) == 0
    _, val = split_pairs(find_pairs(data), 25, 42)  # --seed 42 by default
    assert listed(out / "val_files.txt") == sorted(Path(i).relative_to(data).as_posix() for i, _ in val)
    argv = suggested_validate(capsys.readouterr().out)
    assert argv[-2:] == ["--files", str(out / "val_files.txt")]
    results = tmp_path / "r.json"
    assert validate.main([*argv, "--num-workers", "0", "--results-file", str(results)]) == 0
    payload = json.loads(results.read_text())
    assert payload["pairs"] == 2
    best = best_row(out, "val_dice")
    assert payload["metrics"]["dice"] == pytest.approx(float(best["val_dice"]), abs=1e-5)


@pytest.mark.parametrize("case", ["missing list", "empty list", "not a list", "image not there",
                                  "other data dir"])
def test_a_wrong_list_is_one_line(flat_run, tmp_path, capsys, case):
    data, out = flat_run
    listing = tmp_path / "list.txt"
    data_dir = data
    if case == "empty list":
        listing.write_text("# nothing\n\n")
    elif case == "not a list":
        listing.write_text("import os\nprint(os.getcwd())\n")
    elif case == "image not there":
        listing.write_text("top/top_000.png\ntop/gone.png\n")
    elif case == "other data dir":
        listing = out / "val_files.txt"
        data_dir = make_folder(tmp_path / "elsewhere", per_class=2, seed=9)
    capsys.readouterr()
    code = validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(data_dir),
                          "--files", str(listing), "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --files {listing}"), err
    expected = {"missing list": "does not exist; pass the val_files.txt that training wrote",
                "empty list": "lists no images",
                "not a list": "names no image file (its first line: 'import os'); pass the val_files.txt",
                "image not there": f"1 of 2 listed image(s) are not in {data_dir}, e.g. top/gone.png; "
                                   "pass the --data-dir the model was trained on",
                "other data dir": f"are not in {data_dir}, e.g. bottom/"}[case]
    assert expected in err[0], err
    if case == "other data dir":
        assert err[0].endswith(f"the list is for --data-dir {data}")
