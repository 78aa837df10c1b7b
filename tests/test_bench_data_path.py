"""bench/data_path.py, bench/time_to_accuracy.py and bench/wall_time.py: each runs through main(argv)
with tiny settings and ends with a JSON line whose ratio is the one its own table gives.

Timings are never asserted; only that each measurement runs, has the promised shape, and that the
figures it reports are computed the promised way from the rows it prints (an inverted ratio, the
worse loader as the baseline, a mean instead of a median or a wrong epoch count all fail here).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from bench_check import load_bench

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    return load_bench(name)


@pytest.fixture(scope="module")
def benches():
    modules = {name: load(name) for name in ("data_path", "time_to_accuracy", "wall_time")}
    yield modules
    for module in modules.values():
        sys.modules.pop(module.__name__, None)


def last_json(out: str, keys: set[str]) -> dict:
    last = out.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict) and set(result) == keys, f"last line: {last!r}"
    return result


def close(a: float, b: float, rel: float = 1e-2, abs_: float = 2e-3) -> bool:
    return abs(a - b) <= rel * abs(b) + abs_


# ------------------------------------------------------------------ data_path


def data_path_tables(out: str) -> dict[str, dict]:
    """part -> {"rounds": [{column: value}], "median": {column: value}} from the printed tables."""
    tables: dict[str, dict] = {}
    header: list[str] | None = None
    for line in out.splitlines():
        words = line.split("<-")[0].split()  # the median row ends with "<- reported"
        if words[:2] == ["part", "round"]:
            header = words[2:]
        elif (header and len(words) == len(header) + 2 and words[0] in ("data32", "data224", "epoch")
              and (words[1].isdigit() or words[1] == "median")):
            values = dict(zip(header, map(float, words[2:]), strict=True))
            table = tables.setdefault(words[0], {"rounds": [], "median": None})
            if words[1] == "median":
                table["median"] = values
            else:
                table["rounds"].append(values)
    return tables


def test_data_path_ratios_are_cache_over_the_best_loader(benches, capsys):
    threads = torch.get_num_threads()
    argv = ["--images-32", "24", "--images-224", "6", "--epoch-images", "16", "--batch-size", "8",
            "--workers", "0,1", "--rounds", "1", "--warmup", "0", "--probe-reps", "1"]
    assert benches["data_path"].main(argv) == 0
    assert torch.get_num_threads() == threads  # the 1-thread side gave the threads back
    out = capsys.readouterr().out
    result = last_json(out, {"data_ratio_32", "data_ratio_224", "epoch_ratio"})
    assert "target data_ratio_32 >= 10" in out and "target epoch_ratio >= 1.5" in out
    assert "the better of the loaders" in out
    assert re.search(r"cache build 32 px: 24 images decoded and written in [\d.]+ s", out)
    probe = re.findall(r"^(BatchAugment 32 px|BatchAugment 224 px|SmallCNN step 32 px)\s+([\d.]+)\s+([\d.]+)"
                       r"\s+([\d.]+)$", out, flags=re.MULTILINE)
    assert len(probe) == 3  # the threads part: 1 thread against the default count
    for _, one, many, ratio in probe:
        assert close(float(ratio), float(many) / float(one), rel=2e-2, abs_=1e-2)
    tables = data_path_tables(out)
    assert set(tables) == {"data32", "data224", "epoch"}
    for part, key in (("data32", "data_ratio_32"), ("data224", "data_ratio_224"), ("epoch", "epoch_ratio")):
        rounds = tables[part]["rounds"]
        assert len(rounds) == 1
        assert set(rounds[0]) == {"loader-0w", "loader-1w", "cache", "cache-1t", "ratio"}
        computed = [r["cache"] / max(r["loader-0w"], r["loader-1w"]) for r in rounds]
        for r, value in zip(rounds, computed, strict=True):
            assert all(r[side] > 0 for side in ("loader-0w", "loader-1w", "cache", "cache-1t"))
            assert close(r["ratio"], value), (part, r, value)
        assert close(result[key], statistics.median(computed)), (part, result[key], computed)
        assert close(tables[part]["median"]["ratio"], result[key])


def test_data_path_table_reports_the_median_of_the_round_ratios(benches, capsys):
    bench = benches["data_path"]
    rounds = [{"loader-0w": 100.0, "loader-2w": 200.0, "cache": 1000.0},   # 5.0
              {"loader-0w": 300.0, "loader-2w": 100.0, "cache": 6000.0},   # 20.0
              {"loader-0w": 100.0, "loader-2w": 50.0, "cache": 600.0}]     # 6.0
    part = bench.Part("data32", "synthetic", dict.fromkeys(rounds[0]), 10, rounds)
    assert part.loader_names == ["loader-0w", "loader-2w"]
    assert bench.part_ratio(part) == 6.0
    bench.print_table([part])
    table = data_path_tables(capsys.readouterr().out)["data32"]
    assert [r["ratio"] for r in table["rounds"]] == [5.0, 20.0, 6.0]
    assert table["median"]["ratio"] == 6.0


def test_data_path_leaves_out_parts_not_asked_for(benches, capsys):
    argv = ["--parts", "data32", "--images-32", "12", "--batch-size", "4", "--workers", "0",
            "--rounds", "1", "--warmup", "0"]
    assert benches["data_path"].main(argv) == 0
    out = capsys.readouterr().out
    result = last_json(out, {"data_ratio_32", "data_ratio_224", "epoch_ratio"})
    assert result["data_ratio_224"] is None and result["epoch_ratio"] is None
    tables = data_path_tables(out)
    assert set(tables) == {"data32"}
    [row] = tables["data32"]["rounds"]
    assert set(row) == {"loader-0w", "cache", "cache-1t", "ratio"}
    assert close(row["ratio"], row["cache"] / row["loader-0w"])
    assert close(result["data_ratio_32"], row["ratio"])
    assert close(tables["data32"]["median"]["ratio"], row["ratio"])


# ------------------------------------------------------------------ time_to_accuracy


EPOCH_ROW = re.compile(r"^(off|cache)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([\d.]+)$")


def seconds_from_table(out: str, target: float) -> dict[str, float | None]:
    """Time to target per side (median over rounds) recomputed from the per-epoch rows."""
    runs: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for line in out.splitlines():
        m = EPOCH_ROW.match(line)
        if m:
            runs.setdefault((m[1], int(m[2])), []).append((int(m[3]), float(m[4]), float(m[5])))
    assert runs, "no per-epoch rows"
    seconds: dict[str, list[float | None]] = {"off": [], "cache": []}
    for (side, _), rows in sorted(runs.items()):
        assert [e for e, _, _ in rows] == list(range(1, len(rows) + 1))
        reached = next((i for i, (_, acc, _) in enumerate(rows) if acc >= target), None)
        seconds[side].append(None if reached is None else sum(t for _, _, t in rows[:reached + 1]))
    return {side: None if not times or None in times else statistics.median(times)
            for side, times in seconds.items()}


def check_tta(out: str, target: float) -> dict:
    result = last_json(out, {"seconds_off", "seconds_cache", "ratio"})
    expected = seconds_from_table(out, target)
    for side in ("off", "cache"):
        if expected[side] is None:
            assert result[f"seconds_{side}"] is None
        else:
            assert close(result[f"seconds_{side}"], expected[side], rel=0, abs_=1e-3)
    if None in expected.values():
        assert result["ratio"] is None
    else:
        assert close(result["ratio"], expected["off"] / expected["cache"], rel=1e-3, abs_=1e-4)
    return result


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny runs on one intra-op thread (in this process and in child processes): on a busy 2-core
    machine a second OpenMP thread can make each tiny step several times slower, which only costs
    test time here."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_time_to_accuracy_trains_both_ways_and_sums_epoch_times(benches, capsys, one_thread):
    argv = ["--per-class", "4", "--val-per-class", "2", "--epochs", "2", "--batch-size", "8",
            "--target", "0"]
    assert benches["time_to_accuracy"].main(argv) == 0
    out = capsys.readouterr().out
    result = check_tta(out, 0.0)
    assert result["seconds_off"] > 0 and result["seconds_cache"] > 0
    assert "--data-cache off vs ram" in out
    assert len([line for line in out.splitlines() if EPOCH_ROW.match(line)]) == 4  # 2 epochs x 2 sides


def tta_run(bench, side: str, r: int, accs: list[float], times: list[float]):
    rows = [{"epoch": str(i + 1), "val_acc": f"{a:.6g}", "epoch_time": f"{t:.6g}"}
            for i, (a, t) in enumerate(zip(accs, times, strict=True))]
    return bench.Run(side, r, 10.0 + r, rows)


def test_time_to_accuracy_report_takes_the_first_epoch_at_target_and_medians(benches, capsys):
    bench = benches["time_to_accuracy"]
    runs = [tta_run(bench, "off", 1, [0.5, 0.89, 0.91, 0.95], [2.0, 2.5, 3.0, 9.0]),   # 7.5 s
            tta_run(bench, "cache", 1, [0.6, 0.9, 0.99, 0.99], [1.0, 1.0, 1.0, 1.0]),  # 2.0 s
            tta_run(bench, "cache", 2, [0.95, 0.9, 0.9, 0.9], [1.5, 1.0, 1.0, 1.0]),   # 1.5 s
            tta_run(bench, "off", 2, [0.2, 0.2, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0]),      # 4.0 s
            tta_run(bench, "off", 3, [0.9, 0.2, 0.2, 0.2], [1.0, 1.0, 1.0, 1.0]),      # 1.0 s
            tta_run(bench, "cache", 3, [0.1, 0.1, 0.1, 0.92], [3.0, 3.0, 3.0, 3.0])]   # 12.0 s
    result = bench.report(runs, 0.9)
    out = capsys.readouterr().out
    assert result == check_tta(out, 0.9)
    assert result == {"seconds_off": 4.0, "seconds_cache": 2.0, "ratio": 2.0}


def test_time_to_accuracy_report_gives_null_when_a_side_never_reaches_the_target(benches, capsys):
    bench = benches["time_to_accuracy"]
    runs = [tta_run(bench, "off", 1, [0.5, 0.7], [2.0, 2.0]),
            tta_run(bench, "cache", 1, [0.5, 0.95], [1.0, 1.0])]
    result = bench.report(runs, 0.9)
    out = capsys.readouterr().out
    assert result == check_tta(out, 0.9) == {"seconds_off": None, "seconds_cache": 2.0, "ratio": None}
    assert "never reached val_acc >= 0.9 in 2 epochs" in out


# ------------------------------------------------------------------ wall_time


WALL_ROW = re.compile(r"^(bare|gpu_train)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)$")


def check_wall(out: str) -> dict:
    result = last_json(out, {"bare_s", "gpu_train_s", "ratio"})
    walls: dict[str, list[float]] = {"bare": [], "gpu_train": []}
    for line in out.splitlines():
        m = WALL_ROW.match(line)
        if m:
            walls[m[1]].append(float(m[3]))
    assert walls["bare"] and len(walls["bare"]) == len(walls["gpu_train"])
    bare, gpu = statistics.median(walls["bare"]), statistics.median(walls["gpu_train"])
    assert close(result["bare_s"], bare, rel=0, abs_=1e-3)
    assert close(result["gpu_train_s"], gpu, rel=0, abs_=1e-3)
    assert close(result["ratio"], gpu / bare, rel=1e-3, abs_=1e-4)
    assert "target <= 1.1" in out
    return result


def test_wall_time_runs_both_processes_and_reports_gpu_train_over_bare(benches, capsys, one_thread):
    argv = ["--classes", "2", "--per-class", "3", "--val-per-class", "2", "--epochs", "1",
            "--batch-size", "8", "--rounds", "1", "--workers", "0"]
    assert benches["wall_time"].main(argv) == 0
    out = capsys.readouterr().out
    result = check_wall(out)
    assert result["bare_s"] > 0 and result["gpu_train_s"] > 0
    wrote = re.search(r"^gpu_train wrote: (.*)$", out, flags=re.MULTILINE)
    assert wrote and {"checkpoint.pth", "best_model.pth", "metrics.csv", "training.log"} <= set(
        wrote[1].split(", "))


def test_wall_time_report_is_the_ratio_of_median_walls(benches, capsys):
    bench = benches["wall_time"]
    runs = [bench.Run("bare", 1, 10.0, 8.0, []), bench.Run("gpu_train", 1, 30.0, 8.0, ["checkpoint.pth"]),
            bench.Run("gpu_train", 2, 12.0, 8.0, ["checkpoint.pth"]), bench.Run("bare", 2, 11.0, 8.0, []),
            bench.Run("bare", 3, 40.0, 8.0, []), bench.Run("gpu_train", 3, 13.0, 8.0, ["checkpoint.pth"])]
    result = bench.report(runs)
    out = capsys.readouterr().out
    assert result == check_wall(out) == {"bare_s": 11.0, "gpu_train_s": 13.0, "ratio": round(13 / 11, 4)}
    assert "NOT met" in out
