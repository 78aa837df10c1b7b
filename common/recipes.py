"""Named groups of defaults (--recipe NAME): a published training recipe in one flag.

A recipe sits just above the parser's defaults: a --config file, the presets of --demo and
--dataset, and every flag typed on the command line override it. The values it resolved to
go to config.json and to the first lines of the log.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import UserError

# The CIFAR-10 notes (guide 001): >= 93% test accuracy with a wider residual network.
CIFAR10 = {
    "model": "cifar_resnet",          # residual stages of 128-256-512-768 channels
    "img_size": 32,                   # CIFAR's own size (also for a folder of 32 px images)
    "batch_size": 128,
    "optimizer": "adamw",
    "amsgrad": True,
    "lr": 0.002,                      # 0.001 x 128/64: the notes' linear scaling
    "scheduler": "warmrestart",       # CosineAnnealingWarmRestarts(T_0=40)
    "t0": 40,
    "t_mult": 1,
    "epochs": 150,
    "clip_grad": 1.0,
    "mixup": 1.0,
    "mix_prob": 0.5,                  # MixUp on half the batches
    "early_stopping_patience": 50,
    "min_delta": 2e-4,
    "augment": "cifar",               # random crop with 4 px padding + horizontal flip
    "amp": True,                      # CUDA only; on a CPU it is off with a notice
    "channels_last": "auto",          # on for CUDA
    "test": True,                     # evaluate the best model on the test set at the end
}

RECIPES: dict[str, dict[str, Any]] = {"cifar10": CIFAR10}
DESCRIPTIONS = {"cifar10": "the CIFAR-10 notes' recipe for >= 93% test accuracy (use with "
                           "--dataset cifar10 --data-dir ./data --download)"}


def add_recipe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME", default=None,
                        help=f"a named group of defaults that any flag overrides: "
                             f"{', '.join(RECIPES)}; 'list' shows them")


def recipe_layer(name: str | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The defaults of recipe `name` ({} for none); an unknown name lists the known ones."""
    if not name or name == "list":
        return {}
    if name not in RECIPES:
        raise UserError(f"unknown --recipe {name!r}; known recipes: {', '.join(RECIPES)} "
                        "(--recipe list shows their values)")
    known = {a.dest for a in parser._actions}
    return {k: v for k, v in RECIPES[name].items() if k in known}


def describe_recipes() -> str:
    lines = []
    for name, values in RECIPES.items():
        lines.append(f"{name}: {DESCRIPTIONS.get(name, '')}")
        for key, value in values.items():
            flag = f"--{key.replace('_', '-')}"
            lines.append(f"  {flag}" if value is True else f"  {flag} {value}")
    return "\n".join(lines)


def describe_resolved(name: str, args: argparse.Namespace, typed: Iterable[str],
                      values: Mapping[str, Any] | None = None) -> str:
    """One log line: what the recipe set and which of its values the command line overrode."""
    values = values if values is not None else RECIPES[name]
    overridden = [k for k in values if k in set(typed)]
    shown = " ".join(f"{k}={getattr(args, k)}" for k in values if hasattr(args, k))
    note = f"; overridden on the command line: {', '.join(overridden)}" if overridden else ""
    return f"recipe {name}: {shown}{note}"
