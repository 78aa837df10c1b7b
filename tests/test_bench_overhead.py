"""bench/overhead.py: runs through main(argv) and prints its table and a `ratio:` line.

Timings are never asserted. What is asserted: the measurement runs, both sides really train, and
every figure it prints is computed the promised way from the rows it prints (to their printed
precision): the ratio is engine / bare throughput, the reported row is the median over rounds
(epoch mode) or the paired step figure (step mode). On a clock the test drives, the reported
ratio is a hand-computed number, so an inverted ratio fails even when both sides run as fast.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from bench_check import agrees, load_bench, median, unload_bench

ROOT = Path(__file__).resolve().parents[1]

ROUND = re.compile(r"^round (\d+): bare +([\d.]+) img/s +engine +([\d.]+) img/s +engine/bare ([\d.]+)$")
ROW = re.compile(r"^(median|best|paired|per-round) +([\d.]+) +([\d.]+) +([\d.]+)( +<- reported)?$")
STEP = re.compile(r"outside its steps: (-?[\d.]+) ms \(median\); median bare step ([\d.]+) ms; "
                  r"median bare/engine step time ([\d.]+)$", flags=re.MULTILINE)


@pytest.fixture(scope="module")
def bench():
    module = load_bench("overhead", "bench_overhead")
    yield module
    unload_bench(module)


def ratio_of(out: str) -> float:
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"ratio: (\d+\.\d{3})", last)
    assert match, f"last line is not `ratio: X.XXX`: {last!r}"
    return float(match.group(1))


def parse(out: str) -> tuple[list[tuple[str, ...]], dict[str, tuple[str, ...]]]:
    lines = out.splitlines()
    rounds = [m.groups()[1:] for m in map(ROUND.match, lines) if m]
    rows = {m[1]: m.groups()[1:4] for m in map(ROW.match, lines) if m}
    reported = [m[1] for m in map(ROW.match, lines) if m and m[5]]
    assert len(reported) == 1, out
    rows["reported"] = rows[reported[0]]
    return rounds, rows


def check_table(out: str, mode: str, batches: int, batch_size: int) -> float:
    """Every printed figure against the printed rows; returns the reported ratio."""
    rounds, rows = parse(out)
    ratio = ratio_of(out)
    assert rounds
    for bare, engine, r in rounds:
        assert agrees(r, lambda b, e: e / b, bare, engine), (bare, engine, r)
    bares, engines = [r[0] for r in rounds], [r[1] for r in rounds]
    for name, pick in (("median", median), ("best", lambda *v: max(v))):
        bare, engine, r = rows[name]
        assert agrees(bare, pick, *bares) and agrees(engine, pick, *engines), (name, rows[name], rounds)
        assert agrees(r, lambda b, e: e / b, bare, engine), (name, rows[name])
    bare, engine, r = rows["reported"]
    assert agrees(r, lambda b, e: e / b, bare, engine), rows["reported"]  # engine / bare, not bare / engine
    assert float(r) == ratio
    if mode == "epoch":
        assert "per-round" in rows and "paired" not in rows
        assert agrees(bare, median, *bares)
        assert agrees(r, median, *[x[2] for x in rounds])  # the median of the round ratios
    else:
        assert "paired" in rows and "per-round" not in rows
        outside_ms, step_ms, pair = STEP.search(out).groups()
        images = batches * batch_size
        assert agrees(bare, lambda s: batch_size / (s / 1e3), step_ms)
        assert agrees(engine, lambda s, p, o: images / (batches * s / 1e3 / p + o / 1e3), step_ms, pair,
                      outside_ms)
    return ratio


@pytest.mark.parametrize("mode", ["step", "epoch"])
def test_main_prints_the_ratio_its_rows_give(bench, capsys, mode):
    argv = ["--batches", "3", "--batch-size", "16", "--rounds", "2", "--device", "cpu", "--interleave", mode]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert f"interleaved by {mode}" in out
    assert "target: >= 0.95" in out
    check_table(out, mode, batches=3, batch_size=16)


def test_auto_interleaves_by_step_on_cpu(bench, capsys):
    assert bench.main(["--batches", "2", "--batch-size", "16", "--rounds", "1", "--warmup", "0",
                       "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "interleaved by step" in out
    check_table(out, "step", batches=2, batch_size=16)


class Clock:
    """time.perf_counter for the bench module, moved on only by the fake steps below."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


BARE_STEP, ENGINE_STEP, ENGINE_SETUP, ENGINE_END = 0.001, 0.002, 0.010, 0.004


@pytest.fixture
def driven(bench, monkeypatch):
    """The bench with its clock driven by fake steps: a bare step takes 1 ms, an engine step 2 ms,
    and an engine epoch spends 10 ms before its first step and 4 ms after its last one."""
    clock = Clock()
    monkeypatch.setattr(bench, "time", clock)

    def bare_step(model, opt, x, y):
        clock.now += BARE_STEP

    def bare_epoch(side, batches):
        for _ in batches:
            bare_step(None, None, None, None)

    def engine_epoch(side, loader, device):
        clock.now += ENGINE_SETUP
        for _ in loader:
            clock.now += ENGINE_STEP
        clock.now += ENGINE_END

    monkeypatch.setattr(bench, "bare_step", bare_step)
    monkeypatch.setattr(bench, "bare_epoch", bare_epoch)
    monkeypatch.setattr(bench, "engine_epoch", engine_epoch)
    return bench


@pytest.mark.parametrize("mode", ["step", "epoch"])
def test_reported_ratio_is_engine_over_bare_throughput_on_a_known_clock(driven, capsys, mode):
    n, batch = 4, 8
    assert driven.main(["--batches", str(n), "--batch-size", str(batch), "--rounds", "3",
                        "--device", "cpu", "--interleave", mode]) == 0
    out = capsys.readouterr().out
    bare_s = n * BARE_STEP                                        # 4 ms per epoch
    engine_s = n * ENGINE_STEP + ENGINE_SETUP + ENGINE_END        # 22 ms per epoch
    assert ratio_of(out) == round(bare_s / engine_s, 3) == 0.182  # engine / bare throughput
    bare, engine, _ = parse(out)[1]["reported"]
    assert float(bare) == pytest.approx(n * batch / bare_s, abs=0.05)
    assert float(engine) == pytest.approx(n * batch / engine_s, abs=0.05)
    if mode == "step":
        assert "outside its steps: 14.00 ms (median); median bare step 1.00 ms; " \
               "median bare/engine step time 0.5000" in out
    check_table(out, mode, batches=n, batch_size=batch)


def test_lockstep_trains_both_sides_and_times_every_step(bench):
    torch.manual_seed(0)
    base = bench.SmallCNN(bench.NUM_CLASSES)
    batches = bench.make_batches(3, 8, seed=0, device=torch.device("cpu"))
    bare, engine = bench.Side(base), bench.Side(base)
    loader = bench.Lockstep(batches, bare)
    bench.engine_epoch(engine, loader, torch.device("cpu"))
    assert len(loader.bare_steps) == len(loader.engine_steps) == 3
    start = base.state_dict()
    for side in (bare, engine):
        moved = [not torch.equal(v, start[k]) for k, v in side.model.state_dict().items()
                 if v.is_floating_point()]
        assert all(moved), "every weight of both sides should have been updated"
