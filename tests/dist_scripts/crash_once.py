"""multi_gpu_train.py whose rank 1 dies right after epoch 2 is saved, on the first attempt
only (TORCHELASTIC_RESTART_COUNT 0): with --max-restarts the job must resume and finish."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import session  # noqa: E402

_original = session.EpochWriter.__call__


def crash_after_epoch_two(self, state, record, improved):
    _original(self, state, record, improved)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and state.epoch == 2 and os.environ.get("RANK") == "1":
        os._exit(17)  # as abrupt as a killed process


session.EpochWriter.__call__ = crash_after_epoch_two

import multi_gpu_train  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(multi_gpu_train.main())
