"""The behaviour-recording flags of predict.py and validate.py, kept free of torch so that
`--help` and a mistyped flag answer before the heavy libraries load."""
from __future__ import annotations

import argparse


def add_series_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("behaviour recordings (default: as the checkpoint's training read them)")
    g.add_argument("--fill-missing", choices=["ffill", "zero"], default=None,
                   help="fill empty cells instead of stopping")
    g.add_argument("--label-column", default=None, help="label column of long recordings")
