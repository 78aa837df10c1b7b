"""UserError and the one place that turns it into `error: ...` and exit code 2."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input from the user: what is wrong, which file, what to do.

    Scripts print it as one line and exit with code 2; it never shows a traceback.
    """


EXIT_USER_ERROR = 2
_WORKER_PREFIX = f"{__name__}.UserError: "


def user_message(exc: UserError) -> str:
    """The message on one line. A UserError raised in a DataLoader worker comes back wrapped
    with the worker's traceback ("Caught UserError in DataLoader worker ..."); keep its last line."""
    text = str(exc)
    if text.startswith("Caught UserError") and _WORKER_PREFIX in text:
        text = text.rsplit(_WORKER_PREFIX, 1)[1]
    return " ".join(text.split())


EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, a scheduler's time limit) ends a run as Ctrl+C does: through
    the same cleanup (the checkpoint being written is finished) and the same closing line."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class _PipeSafe:
    """stdout that outlives the reader of its pipe (`python predict.py ... | head`): once the pipe
    is gone, later lines go to the null device and the work goes on (a results file still gets
    written) instead of ending in a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_SAVED: dict[str, object] = {}  # the last checkpoint this process wrote or resumed from


def note_checkpoint(path: str | os.PathLike, epoch: int) -> None:
    """Record a checkpoint that is on disk, for the message after Ctrl+C."""
    _SAVED.update(path=str(path), epoch=int(epoch))


def interrupted_message() -> str:
    if not _SAVED:
        return "interrupted before the first checkpoint was saved: nothing to resume, start again"
    return (f"interrupted: {_SAVED['path']} (epoch {_SAVED['epoch']}) is intact; continue with "
            f"--resume {_SAVED['path']}")


def error_marks_dir(run_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"toolkit-errors-{run_id}")


def _first_to_report(message: str) -> bool:
    """Under torchrun, whether this process is the first of the job's processes on this machine
    to report `message`: a marker file per distinct message, created exclusively."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT")
    if not run_id or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return True
    folder = error_marks_dir(run_id)
    mark = os.path.join(folder, hashlib.sha1(message.encode()).hexdigest()[:16])
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no temp folder: better twice than never
    return True


def report_error(message: str) -> None:
    """One `error:` line on stderr, in a single write so that the lines of several processes
    sharing the terminal never run together. Under torchrun, once per distinct message, and a
    rank other than 0 starts a new line first (rank 0 may be drawing a progress bar there)."""
    if not _first_to_report(message):
        return
    other_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
    sys.stderr.write(f"{chr(10) if other_rank else ''}error: {message}\n")
    sys.stderr.flush()


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run `main(argv)`; a UserError becomes one `error:` line on stderr and exit code 2.

    Under torchrun, a crash (a bug, not a UserError) is also recorded for torchrun's summary,
    which then names the failing rank and shows its traceback."""

    def guarded(args: Sequence[str] | None) -> int:
        try:
            return main(args)
        except UserError as exc:
            report_error(user_message(exc))
            return EXIT_USER_ERROR
        except KeyboardInterrupt as exc:
            print(interrupted_message(), file=sys.stderr)
            return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED

    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent sends SIGTERM and reports by itself
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(guarded)(argv)
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return guarded(argv)
    previous, stdout = signal.signal(signal.SIGTERM, _on_sigterm), sys.stdout
    try:
        stdout.fileno()
        sys.stdout = _PipeSafe(stdout)
    except (AttributeError, OSError, ValueError):  # captured (a test), not a file: leave it
        pass
    try:
        return guarded(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout = stdout
