"""Starting a script's own DDP job without torchrun: torch.distributed.run on this machine over
every visible GPU (or N CPU processes on gloo), re-running the script with its arguments.
torch is imported inside the functions: the scripts import this module before parsing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from .errors import UserError, error_marks_dir

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AGENT = (f"import sys; sys.path.insert(0, {_ROOT!r}); from common.launch import agent_main; "
          "raise SystemExit(agent_main())")


def launch_command(script: str, nproc: int, max_restarts: int, argv: Sequence[str]) -> list[str]:
    """torch.distributed.run's own arguments, run by agent_main (which reports the job's end)."""
    return [sys.executable, "-c", _AGENT, "--standalone",
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            os.path.abspath(script), *argv]


def job_exit_code(exc) -> int:
    """The exit code of a failed job (a ChildFailedError): 2 when the first process to fail stopped
    on a UserError (it printed its `error:` line; the agent then stopped the others), else 1."""
    _, first = exc.get_first_failure()
    return 2 if getattr(first, "exitcode", 1) == 2 else 1


def agent_main(argv: Sequence[str] | None = None) -> int:
    """torch.distributed.run, reporting a failed job the toolkit's way: a job stopped by the user's
    mistake ends with the processes' own `error:` lines and exit code 2, not torch's failure table
    and traceback; a crash shows the table (which rank failed, its exit code) and exits 1."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    nproc = int(args.nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        code = job_exit_code(exc)
        if code != 2:
            print(exc.format_msg(), file=sys.stderr, flush=True)
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(error_marks_dir(str(args.rdzv_id)), ignore_errors=True)
    return 0


def _gpus(no_gpu: bool) -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() and not no_gpu else 0


def processes_to_launch(nproc_per_node: int | None, no_gpu: bool) -> int:
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be 1 or more, got {nproc_per_node}")
        return nproc_per_node
    return max(_gpus(no_gpu), 1)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch(script: str, nproc: int, max_restarts: int, argv: Sequence[str], no_gpu: bool,
             env: Mapping[str, str] | None = None) -> int:
    """Run the job under torch.distributed.run and wait for it; returns its exit code."""
    kind = "GPUs" if _gpus(no_gpu) else "CPU, gloo"
    print(f"launching {nproc} processes with torch.distributed.run ({kind})", flush=True)
    return subprocess.call(launch_command(script, nproc, max_restarts, argv),
                           env={**os.environ, **env} if env else None)


def requested_devices(text: str) -> list[int] | None:
    """--devices as Lightning reads it: 'auto' (None: every visible GPU), 'N' (the first N) or a
    list '0,1' (those indices among the visible GPUs). Only the spelling is checked here."""
    value = str(text).strip().strip("[]()").replace(" ", "")
    if not value:
        raise UserError("--devices is empty: expected auto, a number of GPUs (2) or a list (0,1)")
    if value in {"auto", "-1"}:
        return None
    try:
        if "," not in value:
            count = int(value)
            if count < 1:
                raise ValueError
            return list(range(count))
        ids = [int(part) for part in value.split(",") if part]
    except ValueError:
        raise UserError(f"--devices {text!r}: expected auto, a number of GPUs (2) or a list of GPU "
                        "indices (0,1)") from None
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise UserError(f"--devices {text!r}: each GPU index once, 0 or more")
    return ids


def parse_devices(text: str, visible: int) -> list[int]:
    """The GPU indices --devices names, checked against the `visible` GPUs."""
    ids = requested_devices(text)
    if ids is None:
        return list(range(visible))
    wrong = [i for i in ids if i >= visible]
    if wrong:
        raise UserError(f"--devices {text!r} names GPU(s) {wrong} but {visible} GPU(s) are "
                        f"visible (indices 0-{visible - 1}); pick among them")
    return ids


def launch_devices(script: str, args, argv: Sequence[str], log=print) -> int | None:
    """--devices outside torchrun: the exit code of the DDP job it launched over several GPUs, or
    None to train in this process (on the one GPU named, which goes to args.gpu_id)."""
    devices = getattr(args, "devices", None)
    if devices is None or under_torchrun() or getattr(args, "list_models", False):
        return None
    visible = _gpus(args.no_gpu)
    requested_devices(devices)  # a typo is an error here too, not first on the GPU server
    if visible == 0:
        log(f"notice: --devices {devices}: no GPU visible, training on the CPU in one process")
        return None
    ids = parse_devices(devices, visible)
    if len(ids) == 1:
        args.gpu_id = ids[0]
        return None
    mapping = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = [p.strip() for p in mapping.split(",")] if mapping else [str(i) for i in range(visible)]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(physical[i] for i in ids)}
    return relaunch(script, len(ids), getattr(args, "max_restarts", 0), argv, args.no_gpu, env)
