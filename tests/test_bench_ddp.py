"""bench/ddp_overhead.py: runs through main(argv), launches its 2 DDP workers with torchrun on
gloo, prints its table, the note on what the ratio means, and a `ratio:` line.

Timings are never asserted; only that the measurement runs, has the promised shape, and that
both sides do the same global work.
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
    spec = importlib.util.spec_from_file_location("bench_ddp_overhead", ROOT / "bench" / "ddp_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_main_compares_ddp_with_one_process_and_prints_a_positive_ratio(bench, capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--batch-size", "4", "--steps", "3", "--epochs", "2"]) == 0
    assert torch.get_num_threads() == threads  # the 1-process side gave its threads back
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    match = re.fullmatch(r"ratio: (\d+\.\d{3})", lines[-1])
    assert match, f"last line is not `ratio: X.XXX`: {lines[-1]!r}"
    assert float(match.group(1)) > 0
    assert "cost of gradient communication" in out and "not a speed-up" in out
    assert "on N GPUs the expected speed-up is close to N" in out
    assert "1 process x 2 threads vs 2 processes x 1 thread" in out
    # one row per side, with the batch per step and one time per timed epoch
    single = next(line for line in lines if line.startswith("1 process x 2 threads"))
    ddp = next(line for line in lines if line.startswith("DDP 2 x 1 thread(s), gloo"))
    assert re.search(r"\s8\s", single) and "4 x 2" in ddp
    for row in (single, ddp):
        assert len(row.split("  ")[-1].split()) == 2, row


def test_both_sides_take_the_same_steps_over_the_same_images(bench):
    args = bench.parse_args(["--batch-size", "4", "--steps", "3"])
    data = bench.make_dataset(args)
    assert len(data) == 3 * 4 * 2
    one = bench.make_loader(data, 8, train=True, num_workers=0, pin_memory=False)
    ranks = [bench.make_loader(data, 4, train=True, num_workers=0, pin_memory=False, rank=r, world_size=2)
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    assert sorted(i for loader in ranks for i in loader.sampler) == sorted(one.sampler)


def test_bad_settings_are_refused(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--steps", "0"])
    assert exc.value.code == 2
