"""bench/grad_checkpointing.py runs and prints its ratio line (the value is a measurement)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import grad_checkpointing  # noqa: E402


def test_prints_both_peaks_and_a_ratio(capsys):
    assert grad_checkpointing.main(["--batch-size", "2", "--size", "128", "--width", "16",
                                    "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # the values are measurements (RSS on a shared CPU), only their presence is asserted
    assert re.fullmatch(r"without checkpointing: +\d+\.\d MiB", out[-4])
    assert re.fullmatch(r"with checkpointing: +\d+\.\d MiB", out[-3])
    assert re.fullmatch(r"ratio: \d+\.\d{3}", out[-1])
