"""DDP on gloo with 2 CPU processes: equivalence with one process, the launcher, exact
validation, failure handling, restarts and resume across world sizes."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder

import gpu_train
import multi_gpu_train
import validate
from common.checkpoint import load_checkpoint
from common.distributed import ShardSampler

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
# the runs below are 2 CPU processes on gloo, also on a machine with a GPU (1 GPU cannot hold 2 ranks)
DDP_FAST = [*FAST, "--no-gpu"]


def torchrun(script: Path, *args: str, nproc: int = 2, restarts: int = 0, timeout: float = 240
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("n, world", [(13, 2), (10, 3), (7, 4), (1, 2)])
def test_shards_cover_every_sample_once_in_evaluation(n, world):
    shards = [list(ShardSampler(range(n), rank=r, world_size=world, shuffle=False, pad=False))
              for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(s) for s in shards] == [len(ShardSampler(range(n), rank=r, world_size=world,
                                                         shuffle=False, pad=False)) for r in range(world)]


def test_training_shards_are_equal_and_match_one_process_order():
    n, world = 13, 2
    samplers = [ShardSampler(range(n), rank=r, world_size=world, seed=3) for r in range(world)]
    single = ShardSampler(range(n), seed=3)
    for s in [*samplers, single]:
        s.set_epoch(4)
    shards = [list(s) for s in samplers]
    assert len(shards[0]) == len(shards[1]) == 7 == len(samplers[0])
    order = list(single)
    # interleaving the ranks' shards gives back the single process's order (plus padding)
    interleaved = [shards[r][k] for k in range(7) for r in range(world)]
    assert interleaved[:n] == order and set(interleaved[n:]) <= set(order)


MODES = ("plain", "syncbn", "accum", "cached")
EVEN, UNEVEN, ODD_SHARES = 64, 61, 62  # data set sizes equivalence.py trains on


def _reference(mode: str, n: int = EVEN, as_dealt: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The 1-process run at the global batch (2 x batch x accumulation, no accumulation): its weights
    and the samples its training totals counted per epoch. as_dealt: it reads the data in the order
    the 2 ranks are dealt it together, the repeated tail included."""
    sys.path.insert(0, str(SCRIPTS))
    import equivalence

    batch, accumulate = equivalence.MODES[mode]
    model, counts = equivalence.train(mode, batch * 2 * accumulate, 1, rank=0, world=1, n=n,
                                      as_dealt_to=2 if as_dealt else None)
    return model.state_dict(), counts


TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One torchrun of equivalence.py (2 processes, gloo), every mode on 64 samples (8 steps of
    2 x 4 per epoch), on 61 (the order is padded with one repeated sample to 2 x 31, and each
    rank's last batch holds 3 of 4; with accumulation, each rank's last group is a batch of 2 and
    one of 1) and on 62 (no padding; the same short last batches)."""
    out = tmp_path_factory.mktemp("ddp")
    args = [str(out), str(EVEN), str(UNEVEN), str(ODD_SHARES)]
    result = torchrun(SCRIPTS / "equivalence.py", *args)
    if result.returncode != 0 and TEARDOWN_ABORT in result.stderr:
        # A gloo process sometimes aborts in C++ teardown after every result is written (about 1
        # run in 10-20 on this 2-core machine; root cause not found, see the session note of
        # issue 10). Run once more; a failure that repeats still fails the test.
        result = torchrun(SCRIPTS / "equivalence.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def ranks_of(out: Path, mode: str, n: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """(weights, {"allreduces", "counts"}) of rank 0 and rank 1."""
    return [(torch.load(out / f"{mode}_{n}.rank{r}.pt", weights_only=True),
             json.loads((out / f"{mode}_{n}.rank{r}.json").read_text())) for r in range(2)]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=f"{what}: {key} differs")
        else:
            assert torch.equal(got[key], value), f"{what}: {key}"


def test_two_process_ddp_equals_one_process_with_double_batch(ddp_runs):
    for mode in MODES:
        single, counts = _reference(mode)
        assert counts == [EVEN, EVEN]
        for rank, (weights, info) in enumerate(ranks_of(ddp_runs, mode, EVEN)):
            # 2 epochs x 8 optimizer steps, one gradient bucket: one all-reduce per optimizer step,
            # so with accumulation (2 micro-steps per optimizer step) the first micro-step skipped it
            assert info["allreduces"] == 16, (mode, rank)
            assert info["counts"] == [EVEN, EVEN], (mode, rank)  # every sample once per epoch
            assert_same_weights(weights, single, f"{mode}, rank {rank}")


@pytest.mark.parametrize("n", [UNEVEN, ODD_SHARES])
@pytest.mark.parametrize("mode", MODES)
def test_uneven_data_keeps_every_rank_identical(ddp_runs, mode, n):
    """Padding and short last batches: every rank takes the same 8 steps per epoch and ends with
    bit-identical weights (no rank waits for another, none drifts)."""
    (w0, info0), (w1, info1) = ranks_of(ddp_runs, mode, n)
    assert info0["allreduces"] == info1["allreduces"] == 16
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{mode}: {key} differs between the ranks"


@pytest.mark.parametrize("n", [UNEVEN, ODD_SHARES])
@pytest.mark.parametrize("mode", MODES)
def test_uneven_data_every_rank_equals_one_process_reading_the_order_as_dealt(ddp_runs, mode, n):
    """61 samples on 2 ranks: the shuffled order is padded with its first sample (the README: "the
    last few images repeated so that every process gets the same number of batches"), so the
    reference is one process at the global batch that reads that padded order: 7 batches of 8 and
    one of 6 per epoch. With 62 samples there is no padding and that is the plain 1-process run
    (7 x 8 + 6). Every rank's weights must equal it."""
    single, counts = _reference(mode, n, as_dealt=True)
    assert counts == [2 * 31, 2 * 31]  # the order as dealt: 31 per rank
    if n == ODD_SHARES:
        plain, _ = _reference(mode, n)
        assert_same_weights(single, plain, "62 samples need no padding")
    for rank, (weights, _) in enumerate(ranks_of(ddp_runs, mode, n)):
        assert_same_weights(weights, single, f"{mode} on {n} samples, rank {rank}")


def test_uneven_data_counts_every_training_sample_once(ddp_runs):
    """DESIGN: metrics are reduced across ranks so that every sample counts exactly once. The
    training loss and accuracy of an epoch on 61 samples must count 61, as one process does."""
    assert _reference("plain", UNEVEN)[1] == [UNEVEN, UNEVEN]
    for mode in MODES:
        for rank, (_, info) in enumerate(ranks_of(ddp_runs, mode, UNEVEN)):
            assert info["counts"] == [UNEVEN, UNEVEN], (mode, rank)


@pytest.fixture
def odd_dataset(tmp_path: Path) -> Path:
    """13 validation images: not divisible by 2 processes."""
    root = tmp_path / "dataset"
    make_folder(root / "train", per_class=16, seed=1)
    make_folder(root / "val", classes=("bottom",), per_class=7, seed=2)
    make_folder(root / "val", classes=("top",), per_class=6, seed=3)
    return root


def test_self_launched_two_processes_end_to_end(odd_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = multi_gpu_train.main(["--distributed", "--nproc-per-node", "2", "--data-dir", str(odd_dataset),
                                 "--output", str(out), *DDP_FAST, "--epochs", "3"])
    assert code == 0
    assert "launching 2 processes" in capsys.readouterr().out
    for name in ("checkpoint.pth", "best_model.pth", "metrics.csv", "training.log", "curves.png"):
        assert (out / name).is_file(), name
    log = (out / "training.log").read_text()
    assert log.count("epoch 1/3 |") == 1  # only rank 0 logs
    assert "distributed: 2 processes on gloo" in log and "global batch 16" in log
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = load_checkpoint(out / "best_model.pth")
    assert best["metrics"]["val_acc"] > 0.6  # above chance
    assert not any(k.startswith("module.") for k in best["state_dict"])

    # validation under DDP counted each of the 13 images once: a single process agrees exactly
    results = tmp_path / "r.json"
    assert validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(odd_dataset / "val"),
                          "--results-file", str(results), "--num-workers", "0"]) == 0
    single = json.loads(results.read_text())
    assert single["images"] == 13
    assert single["metrics"]["acc"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)
    assert single["metrics"]["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)


def test_a_failing_rank_ends_the_job_with_its_error(dataset, tmp_path):
    """Rank 1 raises at its 3rd step; torchrun's agent must name rank 1 and its error, and stop rank 0
    (blocked in the next all-reduce) instead of letting it wait: the subprocess timeout is the only
    clock, no wall time is asserted."""
    out = tmp_path / "o"
    result = torchrun(SCRIPTS / "fail_rank1.py", "--data-dir", str(dataset), "--output", str(out),
                      *DDP_FAST, "--epochs", "5", timeout=180)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    # torchrun's summary names the first failing rank and shows its error
    root = re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*1 \(pid: (\d+)\)"
                     r".*?RuntimeError: injected failure on rank 1 at step 3", output, re.S)
    assert root, output[-3000:]
    assert f"failed (exitcode: 1) local_rank: 1 (pid: {root[1]})" in output  # the agent saw rank 1 fail
    # rank 0 did not end on its own: it is in the failure table, stopped by the agent's SIGTERM (or,
    # if gloo noticed the lost peer first, ended by that error); it never went past epoch 1
    other = re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", output)
    assert other, output[-3000:]
    if other[1] == "-15":
        assert f"Sending process {other[2]} closing signal SIGTERM" in output
        assert f"Signal 15 (SIGTERM) received by PID {other[2]}" in output
    else:
        assert other[1] != "0", output[-3000:]
    log = (out / "training.log").read_text()
    assert "epoch 1/5 |" in log and "epoch 2/5 |" not in log


def test_max_restarts_resumes_from_the_last_checkpoint(dataset, tmp_path):
    out = tmp_path / "o"
    result = torchrun(SCRIPTS / "crash_once.py", "--data-dir", str(dataset), "--output", str(out),
                      *DDP_FAST, "--epochs", "3", restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    log = (out / "training.log").read_text()
    assert "resumed from" in log and "at epoch 2" in log
    assert not list(out.glob("previous_run_*"))  # the restart continued, it did not start over


def test_resume_under_ddp_from_a_one_process_checkpoint(dataset, tmp_path):
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *DDP_FAST, "--epochs", "1"]) == 0
    one = load_checkpoint(out / "checkpoint.pth")
    # gpu_train.py itself under torchrun: one engine, one code path
    result = torchrun(ROOT / "gpu_train.py", "--resume", str(out / "checkpoint.pth"), "--epochs", "2",
                      "--num-workers", "0", "--no-gpu")
    assert result.returncode == 0, result.stderr[-3000:]
    two = load_checkpoint(out / "checkpoint.pth")
    assert two["train_state"]["epoch"] == 2
    # 32 images: 4 steps of 8 in one process, then 2 steps of 2 x 8 under DDP
    assert two["train_state"]["step"] == one["train_state"]["step"] + 2
    assert two["train_state"]["schedule"]["steps_per_epoch"] == 2
    assert "2 processes" in (out / "training.log").read_text()
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv")] == [1, 2]


def test_lr_scale_linear(dataset, tmp_path, capsys):
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1",
                           "--lr-scale", "linear", "--base-batch-size", "4", "--scheduler", "none"]) == 0
    assert "lr scaled linearly: 0.005 x 8/4 = 0.01" in capsys.readouterr().out
    assert float(read_rows(out / "metrics.csv")[0]["lr"]) == pytest.approx(0.01)


def test_without_gpus_and_without_nproc_it_runs_one_process(dataset, tmp_path, capsys):
    out = tmp_path / "o"
    assert multi_gpu_train.main(["--distributed", "--data-dir", str(dataset), "--output", str(out),
                                 *DDP_FAST, "--epochs", "1"]) == 0
    assert "single process" in capsys.readouterr().out
    assert (out / "best_model.pth").is_file()


def test_a_user_error_in_every_rank_is_one_line_and_exit_code_2(tmp_path):
    """Self-launched: both ranks find the data folder missing; the user sees the one error line,
    not one per rank, nor torch's failure table and traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "multi_gpu_train.py"), "--distributed",
                             "--nproc-per-node", "2", "--data-dir", str(tmp_path / "missing"),
                             "--output", str(tmp_path / "o"), "--no-gpu"], capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not exist" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "FAILED" not in result.stderr


def test_a_crash_under_the_self_launch_shows_which_rank_failed(dataset, tmp_path):
    from common.launch import launch_command

    args = ["--data-dir", str(dataset), "--output", str(tmp_path / "o"), *DDP_FAST, "--epochs", "5"]
    cmd = launch_command(str(SCRIPTS / "fail_rank1.py"), 2, 0, args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert re.search(r"Root Cause.*?rank\s*:\s*1 ", result.stderr, re.S), result.stderr[-3000:]
    assert "RuntimeError: injected failure on rank 1 at step 3" in result.stdout + result.stderr


def test_error_lines_of_several_ranks_are_printed_once_each(monkeypatch, capsys, tmp_path):
    from common import errors

    monkeypatch.setattr(errors.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    errors.report_error("data folder x does not exist")
    monkeypatch.setenv("RANK", "0")
    errors.report_error("data folder x does not exist")  # the other rank, same message: not again
    errors.report_error("another problem")
    assert capsys.readouterr().err == "\nerror: data folder x does not exist\nerror: another problem\n"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: always printed
    errors.report_error("data folder x does not exist")
    assert capsys.readouterr().err == "error: data folder x does not exist\n"
