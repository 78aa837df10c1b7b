"""multi_gpu_train.py whose rank 1 raises at its 3rd optimizer step (run under torchrun)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import engine  # noqa: E402

_original = engine._optimizer_step
_steps = {"n": 0}


def failing_step(*args, **kwargs):
    _steps["n"] += 1
    if os.environ.get("RANK") == "1" and _steps["n"] == 3:
        raise RuntimeError("injected failure on rank 1 at step 3")
    return _original(*args, **kwargs)


engine._optimizer_step = failing_step

import multi_gpu_train  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(multi_gpu_train.main())
