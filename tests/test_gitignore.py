"""The folders the scripts write by default stay out of `git status` of a clone of this project,
and the project's own folders (common/data/) are not ignored by those rules."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# script -> the flags whose default is a folder the script creates
WRITES = {"gpu_train": ["output"], "train_unet": ["output", "data_dir"],
          "finetune_gpu": ["output", "log_dir"], "run_behavior_classification": ["output"]}
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and a git checkout")


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_default_output_folders_are_ignored():
    folders = set()
    for script, dests in WRITES.items():
        parser = importlib.import_module(script).build_parser()
        defaults = {a.dest: a.default for a in parser._actions}
        folders |= {str(defaults[d]).rstrip("/") for d in dests}
    folders |= {"./demo_data", "./demo_output", "./data"}  # make demo; --dataset cifar10 --data-dir ./data
    assert {"./output", "checkpoints", "data", "./result", "./logs_finetune"} <= folders
    not_ignored = [f for f in sorted(folders) if not ignored(f"{f}/some_file.pth")]
    assert not not_ignored, f"not in .gitignore: {not_ignored}"


def test_the_projects_own_folders_are_not_ignored():
    assert not ignored("common/data/images.py")
    assert not ignored("tests/test_gitignore.py")
