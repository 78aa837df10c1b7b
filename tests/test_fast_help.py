"""`--help` and a mistyped flag answer before the heavy libraries load: every script parses its
command line with torch-free modules and imports torch (timm, onnx, matplotlib, ...) only after.

Checked with `python -X importtime`, which lists every module the interpreter imported (no timing
is asserted: machines differ, the import list does not)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("gpu_train.py", "multi_gpu_train.py", "finetune_gpu.py", "train_unet.py",
           "run_behavior_classification.py", "validate.py", "predict.py", "export_onnx.py",
           "test_model.py")
HEAVY = frozenset({"torch", "torchvision", "timm", "onnx", "onnxruntime", "matplotlib", "tensorboard"})


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def imported_modules(stderr: str) -> set[str]:
    """The module column of `import time:  self | cumulative | module` lines."""
    modules = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.add(name)
    return modules


def heavy_imports(stderr: str) -> set[str]:
    """The heavy libraries (top-level names) among the imported modules."""
    modules = imported_modules(stderr)
    assert "common.cli" in modules, "no importtime output: the check would pass vacuously"
    return {name.split(".")[0] for name in modules} & HEAVY


def test_imported_modules_parses_importtime_lines():
    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:       120 |        120 |   torch._C\n"
              "import time:      3000 |       9000 | torch\n"
              "error: something else\n")
    assert imported_modules(stderr) == {"torch._C", "torch"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_no_heavy_library(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {script}")
    assert heavy_imports(result.stderr) == set()


@pytest.mark.parametrize("script", SCRIPTS)
def test_mistyped_flag_is_rejected_before_torch_loads(script):
    result = run_script(script, "--no-such-flag")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines
    assert lines[0].endswith(f" (python {script} --help lists every flag)")  # one line, no usage block
    assert heavy_imports(result.stderr) == set()
