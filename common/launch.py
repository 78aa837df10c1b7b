"""Starting a script's own DDP job without torchrun: torch.distributed.run on this machine over
every visible GPU (or N CPU processes on gloo), re-running the script with its arguments."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from .errors import UserError


def launch_command(script: str, nproc: int, max_restarts: int, argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            os.path.abspath(script), *argv]


def processes_to_launch(nproc_per_node: int | None, no_gpu: bool) -> int:
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be 1 or more, got {nproc_per_node}")
        return nproc_per_node
    return torch.cuda.device_count() if torch.cuda.is_available() and not no_gpu else 1


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch(script: str, nproc: int, max_restarts: int, argv: Sequence[str], no_gpu: bool) -> int:
    """Run the job under torch.distributed.run and wait for it; returns its exit code."""
    kind = "GPUs" if torch.cuda.is_available() and not no_gpu else "CPU, gloo"
    print(f"launching {nproc} processes with torch.distributed.run ({kind})", flush=True)
    return subprocess.call(launch_command(script, nproc, max_restarts, argv))
