"""bench/grad_checkpointing.py runs and prints both peaks and their ratio (with / without).

The peaks are measurements (RSS on a shared CPU) and are never asserted; the ratio must be the one
the two printed peaks give (to their printed precision), and on peaks the test chooses it must be
the hand-computed with / without (an inverted ratio fails).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import grad_checkpointing  # noqa: E402

ARGV = ["--batch-size", "2", "--size", "128", "--width", "16", "--device", "cpu"]


def peaks_and_ratio(out: list[str]) -> tuple[float, float, str]:
    without = re.fullmatch(r"without checkpointing: +(\d+\.\d) MiB", out[-4])
    with_ = re.fullmatch(r"with checkpointing: +(\d+\.\d) MiB", out[-3])
    ratio = re.fullmatch(r"ratio: (\d+\.\d{3})", out[-1])
    assert without and with_ and ratio, out
    assert out[-2] == "expected: ratio <= 0.7"
    return float(without[1]), float(with_[1]), ratio[1]


def test_prints_both_peaks_and_the_ratio_they_give(capsys):
    assert grad_checkpointing.main(ARGV) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "fresh process each" in out[-5]
    without, with_, ratio = peaks_and_ratio(out)  # RSS growth on a shared CPU: at times 0.0
    # with / without, each peak known to +-0.05 MiB and the ratio to +-0.0005
    low, high = (with_ - 0.05) / (without + 0.05), (with_ + 0.05) / max(without - 0.05, 1e-9)
    assert low - 0.0005 <= float(ratio) <= high + 0.0005, (without, with_, ratio)


def test_ratio_is_with_over_without_on_known_peaks(capsys, monkeypatch):
    """Each variant's child process is replaced by one reporting a chosen peak (KiB): 100 MiB
    without checkpointing, 40 MiB with it."""
    asked = []

    def run(cmd, **kwargs):
        mode = cmd[cmd.index("--child") + 1]
        asked.append(mode)
        assert cmd[cmd.index("--batch-size") + 1] == "2" and cmd[cmd.index("--size") + 1] == "128"
        peak = {"off": 100 * 1024.0, "on": 40 * 1024.0}[mode]
        return SimpleNamespace(stdout=json.dumps({"peak": peak}) + "\n", returncode=0)

    monkeypatch.setattr(grad_checkpointing, "subprocess", SimpleNamespace(run=run))
    assert grad_checkpointing.main(ARGV) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert sorted(asked) == ["off", "on"]
    assert peaks_and_ratio(out) == (100.0, 40.0, "0.400")

