"""multi_gpu_train.py whose rank 1 alone sees a NaN loss at its 3rd training step (the first of
epoch 2 with 2 steps per epoch), with a finite gradient: only the flag all-reduced at the guard's
read tells rank 0 (run under torchrun)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.tasks import ClassificationTask  # noqa: E402

_original = ClassificationTask.loss
_calls = {"n": 0}


def nan_on_rank1(self, outputs, targets, train=True):
    value = _original(self, outputs, targets, train)
    if train and os.environ.get("RANK") == "1":
        _calls["n"] += 1
        if _calls["n"] == 3:
            return value + float("nan") * value.detach()  # NaN value, finite gradient
    return value


ClassificationTask.loss = nan_on_rank1

import multi_gpu_train  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(multi_gpu_train.main())
