"""What the bench tests share: loading a bench/ script as a module, and checking a printed figure
against the printed figures it is computed from, to their printed precision."""
from __future__ import annotations

import importlib.util
import itertools
import statistics
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str, module_name: str | None = None) -> ModuleType:
    """bench/<name>.py as a module, registered in sys.modules (dataclasses look their module up
    there); unload_bench removes it again."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def unload_bench(module: ModuleType) -> None:
    sys.modules.pop(module.__name__, None)


def digits(text: str) -> float:
    """Half a unit of the last printed digit of `text`: how far the true value may lie from it."""
    return 0.5 * 10.0 ** -len(text.partition(".")[2])


def agrees(printed: str, formula, *values: str) -> bool:
    """`printed` is formula(*values) to the printed precision of all of them: the formula is
    monotone in each argument, so its extremes over the rounding intervals are at their corners."""
    corners = [formula(*combo) for combo in itertools.product(
        *[(float(v) - digits(v), float(v) + digits(v)) for v in values])]
    return min(corners) - digits(printed) <= float(printed) <= max(corners) + digits(printed)


def median(*values: float) -> float:
    return statistics.median(values)
