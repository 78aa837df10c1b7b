"""make mutants: break the code on purpose, one line at a time, and check the suite notices.

Each mutant below is a one-line bug that once passed every test, or that guards a promise of the
README (bit-exact resume, DDP equal to one process, the checkpoint on disk, the benchmark's
ratio). For each, the tree is copied to a temporary folder (no .git, no .venv), the line is
replaced there, and the tests that guard it run; the mutant must make them fail (pytest exit 1).
A mutant that survives, or a line that is no longer found (the code moved: update the list), is a
failure of this script. Nothing in the working tree is touched.

    python tests/mutants.py              # every mutant (a few minutes)
    python tests/mutants.py dice fsync   # the mutants whose name contains one of these words
    python tests/mutants.py --list
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "demo_data", "demo_output",
        "output", "checkpoints", "data", "result", "logs_finetune", "behavior_results"}


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    line: str  # the line as it is (stripped of its indentation)
    becomes: str  # what it becomes (same indentation)
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("dice-denominator-is-recall", "common/tasks.py",
           "dice.append(torch.where(empty, 1.0, 2 * inter / (p_sum + t_sum).clamp(min=1)))",
           "dice.append(torch.where(empty, 1.0, 2 * inter / (2 * t_sum).clamp(min=1)))",
           ("tests/test_segmentation_metrics.py",)),
    Mutant("iou-union-counts-overlap-twice", "common/tasks.py",
           "union = p_sum + t_sum - inter", "union = p_sum + t_sum",
           ("tests/test_segmentation_metrics.py",)),
    Mutant("oom-replay-drops-earlier-micro-batches", "common/engine.py",
           "pending = list(group)", "pending = group[-1:]", ("tests/test_memory.py",)),
    Mutant("oom-replay-keeps-partial-gradients", "common/engine.py",
           "optimizer.zero_grad(set_to_none=True)\n            if cfg.guard is not None:\n"
           "                cfg.guard.restart_group()",
           "if cfg.guard is not None:\n                cfg.guard.restart_group()",
           ("tests/test_memory.py",)),
    Mutant("accumulation-tail-off-by-one", "common/engine.py",
           "group_size = min(accumulate, n_batches - group_start)",
           "group_size = min(accumulate, n_batches - group_start + 1)", ("tests/test_engine.py",)),
    Mutant("resume-drops-rng-restore", "common/session.py",
           'ckpt_lib.set_rng_state(ts["rng"])', "pass",
           ("tests/test_fast_path.py::test_resume_equals_an_uninterrupted_run_bit_for_bit",
            "tests/test_gpu_train.py::test_resume_after_interruption_equals_uninterrupted_run")),
    Mutant("ddp-skips-no-sync", "common/engine.py",
           "if sync or not isinstance(model, nn.parallel.DistributedDataParallel):", "if True:",
           ("tests/test_durability.py",)),
    Mutant("checkpoint-without-fsync", "common/checkpoint.py",
           "os.fsync(fh.fileno())", "pass", ("tests/test_durability.py",)),
    Mutant("checkpoint-folder-not-synced", "common/checkpoint.py",
           "_fsync_dir(target.parent)", "pass", ("tests/test_durability.py",)),
    Mutant("per-step-host-sync", "common/engine.py",
           "task.accumulate(totals, outputs.detach(), y, loss.detach())",
           "task.accumulate(totals, outputs.detach(), y, loss.detach()); float(loss)",
           ("tests/test_host_sync.py",)),
    Mutant("bench-ratio-inverted", "bench/overhead.py",
           "return self.engine / self.bare", "return self.bare / self.engine",
           ("tests/test_bench_overhead.py",)),
)


def copy_tree(target: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        return {n for n in names if n in SKIP and (here == ROOT or n in {"__pycache__", ".pytest_cache"})}
    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Replace the line in the copy; None when done, else why not."""
    path = tree / mutant.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.line)
    if count != 1:
        return f"the line is found {count} times in {mutant.file} (expected once): update tests/mutants.py"
    path.write_text(text.replace(mutant.line, mutant.becomes), encoding="utf-8")
    return None


def run(mutant: Mutant, python: str) -> tuple[str, float, str]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
        tree = Path(folder) / "tree"
        copy_tree(tree)
        problem = apply(mutant, tree)
        if problem:
            return "MISSING", 0.0, problem
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    if proc.returncode == 1:
        return "killed", elapsed, lines[0] if lines else "tests failed"
    if proc.returncode == 0:
        return "SURVIVED", elapsed, "every test passed with the bug in place"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return "ERROR", elapsed, f"pytest exit {proc.returncode}: " + " | ".join(tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply one-line mutations and check the tests fail.")
    parser.add_argument("words", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:42} {m.file:24} {' '.join(m.tests)}")
        return 0 if args.list else 2
    results = []
    for m in chosen:
        outcome, elapsed, detail = run(m, sys.executable)
        results.append(outcome)
        print(f"{outcome:8} {m.name:42} {elapsed:6.1f}s  {detail}", flush=True)
    bad = sum(r != "killed" for r in results)
    verdict = f"; {bad} not: fix the tests" if bad else ""
    print(f"{len(results) - bad} of {len(results)} mutants killed{verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
