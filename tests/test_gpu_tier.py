"""The GPU tier seen from a CPU machine: `make test-gpu` fails (does not skip) without a GPU, with one
clear line; the cuda tests import and are skipped here; bench/gpu.py exits 2 with one line, and its
table and ratios are right (a pure function, fed with made-up figures)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_check import load_bench, unload_bench

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_LINE = ("no CUDA device: make test-gpu needs a visible NVIDIA GPU "
                "(torch.cuda.is_available() is False)")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")


@pytest.fixture(scope="module")
def bench():
    module = load_bench("gpu", "bench_gpu")
    yield module
    unload_bench(module)


def makefile_check() -> str:
    """The guard command of the test-gpu target, as the Makefile defines it."""
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-gpu:.*\n\t@\$\(PY\) -c '\$\(CUDA_CHECK\)'\n\t\$\(PY\) -m pytest -m cuda$",
                     text, re.M), "test-gpu must run the guard, then pytest -m cuda"
    return re.search(r"^CUDA_CHECK := (.+)$", text, re.M)[1]


def test_the_guard_passes_exactly_where_cuda_is_visible():
    result = subprocess.run([sys.executable, "-c", makefile_check()], capture_output=True, text=True,
                            timeout=120)
    if torch.cuda.is_available():
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert result.stderr.strip() == NO_CUDA_LINE


@CPU_ONLY
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_gpu_fails_cleanly_without_a_gpu():
    # STAMP= skips the install step; PY: this interpreter (the venv's in `make test`)
    result = subprocess.run(["make", "-s", "test-gpu", "STAMP=", f"PY={sys.executable}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert NO_CUDA_LINE in result.stderr.splitlines(), result.stderr
    assert "Traceback" not in result.stderr
    assert "passed" not in result.stdout and "skipped" not in result.stdout  # pytest never started


@CPU_ONLY
def test_the_cuda_tests_import_and_are_skipped_here():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_cuda_*.py"))
    assert len(files) >= 5, files
    cmd = [sys.executable, "-m", "pytest", "-rs", "-m", "cuda", "-p", "no:cacheprovider", *files]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    summary = re.fullmatch(r"(\d+) skipped(, \d+ warnings?)? in .*", out.strip().splitlines()[-1])
    assert summary and int(summary[1]) >= 12, out[-3000:]  # nothing passed, failed or errored
    assert "needs a CUDA device (none visible)" in out


@CPU_ONLY
def test_bench_gpu_exits_2_with_one_line_without_cuda():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device: bench/gpu.py"), result.stderr
    assert "torch.cuda.is_available() is False" in lines[0]


def test_bench_gpu_table_prints_each_baseline_and_ratio(bench):
    Row = bench.Row
    rows = [Row("resnet50 224 px, AMP float16", 1500.0, "img/s", "float32 (TF32)", 1000.0),
            Row("resnet50 224 px, AMP + channels_last", None, "img/s", "AMP", 1500.0,
                note="out of memory at batch 32; try a smaller --batch-size"),
            Row("engine epoch vs bare loop", 960.0, "img/s", "bare loop", 1000.0, ratio=0.97,
                target=">= 0.95"),
            Row("data path", 5000.0, "img/s", "DataLoader 2w", 1000.0, ratio=4.5),
            Row("U-Net peak", 420.0, "MiB", "without checkpointing", 700.0, target="<= 0.6")]
    lines = bench.format_table(rows)
    assert lines[0].split() == ["measure", "result", "baseline", "ratio", "target"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    body = lines[2:]
    assert len(body) == len(rows)
    amp, oom, engine, data, unet = body
    assert "1,500.0 img/s" in amp and "float32 (TF32): 1,000.0 img/s" in amp and "1.50x" in amp
    assert "n/a (out of memory at batch 32; try a smaller --batch-size)" in oom
    assert "AMP: 1,500.0 img/s" in oom and re.search(r"\sn/a$", oom)
    assert "0.97x" in engine and engine.endswith(">= 0.95: met")  # the given ratio, not 960/1000
    assert "4.50x" in data and data.rstrip().endswith("4.50x")  # no target: nothing after the ratio
    assert "420.0 MiB" in unet and "without checkpointing: 700.0 MiB" in unet and "0.60x" in unet
    assert unet.endswith("<= 0.6: met")
    # columns line up: every ratio starts under the header's "ratio"
    column = lines[0].index("ratio")
    for line, ratio in zip(body, ("1.50x", "n/a", "0.97x", "4.50x", "0.60x"), strict=True):
        assert line.index(ratio, column - 1) == column, line
    assert json.loads(bench.ratios_json(rows)) == {
        "resnet50 224 px, AMP float16": 1.5, "resnet50 224 px, AMP + channels_last": None,
        "engine epoch vs bare loop": 0.97, "data path": 4.5, "U-Net peak": 0.6}


def test_bench_gpu_verdicts_and_arguments(bench):
    Row = bench.Row
    assert Row("m", 700.0, "MiB", "b", 1000.0, target="<= 0.6").verdict() == "<= 0.6: NOT met"
    assert Row("m", 900.0, "img/s", "b", 1000.0, target=">= 0.95").verdict() == ">= 0.95: NOT met"
    assert Row("m", None, "img/s", "b", 1000.0, target=">= 0.95").verdict() == ">= 0.95: not measured"
    assert Row("m", 1.0, "img/s", "b", None).the_ratio() is None
    quick = bench.parse_args(["--quick"])
    full = bench.parse_args([])
    assert (quick.steps, quick.rounds) == (6, 2) and (full.steps, full.rounds) == (20, 5)
    assert full.parts == ["steps", "engine", "data", "memory"]
    assert full.models == ["resnet50", "efficientnet_b0"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "steps,nope"])


def test_bench_gpu_step_rows_pair_each_variant_with_its_baseline(bench, monkeypatch):
    """The steps rows from made-up rates (no GPU): AMP against float32, AMP + channels_last against
    AMP, and a variant that runs out of memory is a row that says so."""
    made_up = {(False, False): 100.0, (True, False): 150.0}
    built = []

    class FakeSide:
        def __init__(self, base, amp, channels_last, device):
            built.append((amp, channels_last))
            self.key = (amp, channels_last)

        def epoch(self, batches):
            assert len(batches) == 3 and batches[0][0].shape == (2, 3, 224, 224)
            if self.key not in made_up:
                raise torch.OutOfMemoryError("CUDA out of memory (made up)")
            return made_up[self.key]

    monkeypatch.setattr(bench, "Side", FakeSide)
    args = bench.parse_args(["--models", "small_cnn", "--batch-size", "2", "--steps", "3", "--rounds", "2"])
    amp, channels_last = bench.step_rows(args, torch.device("cpu"))
    assert built == [(False, False), (True, False), (True, True)]
    assert (amp.value, amp.baseline, amp.the_ratio()) == (150.0, 100.0, 1.5)
    assert amp.baseline_name == "float32 (TF32)" and amp.measure == "small_cnn 224 px, AMP float16"
    assert channels_last.value is None and channels_last.baseline == 150.0
    assert channels_last.note == "out of memory at batch 2; try a smaller --batch-size"
