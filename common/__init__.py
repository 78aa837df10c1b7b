"""Shared library of the training toolkit: one engine, one checkpoint format, one CLI."""

import os as _os
import sys as _sys

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). On a busy 2-core
# machine the spinning second thread fought the first for the one free core: the training step ran
# 3-6x and the batch augmentation 9-39x slower than on one thread (bench/data_path.py); with
# PASSIVE the penalty mostly went away. Only before torch loads (the scripts import it after
# parsing): OpenMP reads the variable when it loads, and changing the environment once torch runs
# threads is a setenv/getenv race (it aborted 1 in ~10 gloo processes at exit in tests).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
