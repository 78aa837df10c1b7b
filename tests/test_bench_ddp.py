"""bench/ddp_overhead.py: runs through main(argv), launches its 2 DDP workers with torchrun on
gloo, prints its table, the note on what the ratio means, and a `ratio:` line.

Timings are never asserted; only that the measurement runs, has the promised shape, that both
sides do the same global work, and that every figure it prints is computed the promised way from
the epoch times it prints (to their printed precision), and on epoch times the test chooses.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
import torch
from bench_check import agrees, load_bench, median, unload_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    module = load_bench("ddp_overhead", "bench_ddp_overhead")
    yield module
    unload_bench(module)


def check_table(out: str, images: int) -> dict:
    """Every figure against the printed rows: per side img/s median and best from its epoch times,
    each round's DDP / 1-process ratio (1-process seconds / DDP seconds), and the last line as their
    median. Returns the parsed rows."""
    lines = out.strip().splitlines()
    match = re.fullmatch(r"ratio: (\d+\.\d{3})", lines[-1])
    assert match, f"last line is not `ratio: X.XXX`: {lines[-1]!r}"
    rows = {}
    for line in lines:
        m = re.match(r"^(1 process x \d+ threads|DDP \d+ x \d+ thread\(s\), \w+) +(\d+(?: x \d+)?) +"
                     r"([\d.]+) +([\d.]+)  ((?:[\d.]+ ?)+)$", line)
        if m:
            rows["single" if m[1].startswith("1 process") else "ddp"] = {
                "name": m[1], "batch": m[2], "median": m[3], "best": m[4], "times": m[5].split()}
    assert set(rows) == {"single", "ddp"}, out
    for row in rows.values():
        assert agrees(row["median"], lambda *t: images / statistics.median(t), *row["times"]), row
        assert agrees(row["best"], lambda *t: images / min(t), *row["times"]), row
    paired = re.search(r"^DDP / 1 process, per round: ((?:[\d.]+ ?)+) \(the ratio is their median\)$", out,
                       flags=re.MULTILINE)
    assert paired, out
    per_round = paired[1].split()
    single, ddp = rows["single"]["times"], rows["ddp"]["times"]
    assert len(per_round) == len(single) == len(ddp)
    for r, s, d in zip(per_round, single, ddp, strict=True):
        assert agrees(r, lambda a, b: a / b, s, d), (r, s, d)  # DDP / 1-process throughput
    assert agrees(match[1], median, *per_round), (match[1], per_round)
    return rows


def test_main_compares_ddp_with_one_process_and_prints_the_ratio_its_rows_give(bench, capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--batch-size", "4", "--steps", "3", "--epochs", "2"]) == 0
    assert torch.get_num_threads() == threads  # the 1-process side gave its threads back
    out = capsys.readouterr().out
    assert "cost of gradient communication" in out and "not a speed-up" in out
    assert "on N GPUs the expected speed-up is close to N" in out
    assert "1 process x 2 threads vs 2 processes x 1 thread" in out
    rows = check_table(out, images=3 * 4 * 2)
    # one row per side, with the batch per step and one time per timed epoch
    assert rows["single"]["name"] == "1 process x 2 threads" and rows["single"]["batch"] == "8"
    assert rows["ddp"]["name"] == "DDP 2 x 1 thread(s), gloo" and rows["ddp"]["batch"] == "4 x 2"
    assert len(rows["single"]["times"]) == len(rows["ddp"]["times"]) == 2


def test_ratio_is_one_process_seconds_over_ddp_seconds_on_known_times(bench, capsys, monkeypatch):
    """The table and the ratio from epoch times the test chooses: DDP twice as slow in the median
    round gives 0.500 (an inverted ratio gives 2.000, a mean of the rounds 0.583)."""
    def measure(args, workdir):
        return [2.0, 3.0, 1.0], [4.0, 3.0, 4.0], {"backend": "gloo", "threads_per_process": 1}

    monkeypatch.setattr(bench, "measure", measure)
    assert bench.main(["--batch-size", "4", "--steps", "3", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    rows = check_table(out, images=24)
    assert (rows["single"]["median"], rows["single"]["best"]) == ("12.0", "24.0")
    assert (rows["ddp"]["median"], rows["ddp"]["best"]) == ("6.0", "8.0")
    assert "DDP / 1 process, per round: 0.500 1.000 0.250 (the ratio is their median)" in out
    assert out.strip().splitlines()[-1] == "ratio: 0.500"


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
