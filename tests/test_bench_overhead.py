"""bench/overhead.py: runs through main(argv) and prints its table and a `ratio:` line.

Timings are never asserted; only that the measurement runs, has the promised shape, and
that both sides really train.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "bench" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def ratio_of(out: str) -> float:
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"ratio: (\d+\.\d{3})", last)
    assert match, f"last line is not `ratio: X.XXX`: {last!r}"
    return float(match.group(1))


@pytest.mark.parametrize("mode", ["step", "epoch"])
def test_main_prints_a_positive_ratio(bench, capsys, mode):
    assert bench.main(["--batches", "4", "--rounds", "1", "--device", "cpu", "--interleave", mode]) == 0
    out = capsys.readouterr().out
    assert f"interleaved by {mode}" in out
    assert "target: >= 0.95" in out
    assert ratio_of(out) > 0


def test_auto_interleaves_by_step_on_cpu(bench, capsys):
    assert bench.main(["--batches", "2", "--rounds", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "interleaved by step" in out
    assert ratio_of(out) > 0


def test_lockstep_trains_both_sides_and_times_every_step(bench):
    torch.manual_seed(0)
    base = bench.SmallCNN(bench.NUM_CLASSES)
    batches = bench.make_batches(3, 8, seed=0, device=torch.device("cpu"))
    bare, engine = bench.Side(base), bench.Side(base)
    loader = bench.Lockstep(batches, bare)
    bench.engine_epoch(engine, loader, torch.device("cpu"))
    assert len(loader.bare_steps) == len(loader.engine_steps) == 3
    assert all(t > 0 for t in loader.bare_steps + loader.engine_steps)
    start = base.state_dict()
    for side in (bare, engine):
        moved = [not torch.equal(v, start[k]) for k, v in side.model.state_dict().items()
                 if v.is_floating_point()]
        assert all(moved), "every weight of both sides should have been updated"
