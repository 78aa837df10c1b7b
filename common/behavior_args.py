"""The flags of behaviour classification (run_behavior_classification.py), kept free of torch so
that `--help` and a mistyped flag answer before the heavy libraries load."""
from __future__ import annotations

import argparse

from .cli import add_device_args, add_runtime_args, add_training_args, tristate

MODELS = ("cnn", "transformer", "fusion")


def add_behavior_args(parser: argparse.ArgumentParser) -> None:
    r = parser.add_argument_group("what to run")
    r.add_argument("--full-pipeline", action="store_true",
                   help="check the data, train and evaluate every --models, compare them (the default)")
    r.add_argument("--quick-start", action="store_true", help="the pipeline with few epochs, for a first try")
    r.add_argument("--test-gpu", action="store_true", help="report the GPU environment and exit")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", default="./hyx_data", help="folder (or one CSV / .npz file) of recordings")
    d.add_argument("--data-glob", help='merge several folders, e.g. "./*_data"')
    d.add_argument("--label-column", default="label", help="label column of long recordings (label)")
    d.add_argument("--group-column", help="recording / subject / session id column of long recordings")
    d.add_argument("--time-column", help="time index column (t, time and timestamp are found by name)")
    d.add_argument("--channels", help="channel columns, comma-separated (default: every numeric column)")
    d.add_argument("--window-size", type=int, help="steps per window (default: median recording length)")
    d.add_argument("--stride", type=int,
                   help="steps between windows of long recordings (default: half a window)")
    d.add_argument("--pure-windows", action="store_true", help="drop windows that mix labels")
    d.add_argument("--fill-missing", choices=["ffill", "zero"], help="fill empty cells instead of stopping")
    d.add_argument("--val-fraction", type=float, default=0.15, help="recordings for validation (0.15)")
    d.add_argument("--test-fraction", type=float, default=0.15, help="recordings for the test (0.15)")
    m = parser.add_argument_group("models")
    m.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="models to train and compare (default: cnn transformer fusion)")
    m.add_argument("--width", type=int, default=64, help="channels / embedding size (default: 64)")
    m.add_argument("--depth", type=int, default=2, help="residual blocks / encoder layers (default: 2)")
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="./behavior_results", help="results folder (./behavior_results)")
    add_training_args(parser, batch_size=32, epochs=100, lr=1e-3, patience=10)
    # a pipeline of several models has no single checkpoint to continue: --resume is refused with
    # a line that says so (behavior.py), and not offered in --help
    next(a for a in parser._actions if a.dest == "resume").help = argparse.SUPPRESS
    add_device_args(parser, amp_aliases=("--mixed-precision",))
    g = parser.add_argument_group("data loading and processes")
    g.add_argument("--persistent-workers", type=tristate, nargs="?", const=True, default=True,
                   help="keep DataLoader workers between epochs (default: true)")
    g.add_argument("--prefetch-factor", type=int, default=4, help="batches each worker loads ahead (4)")
    g.add_argument("--drop-last", action="store_true", help="drop the last, smaller training batch")
    g.add_argument("--multi-gpu", action="store_true",
                   help="train with DDP on every visible GPU (launches torchrun itself)")
    add_runtime_args(parser)
