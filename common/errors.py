"""UserError and the one place that turns it into `error: ...` and exit code 2."""
from __future__ import annotations

import os
import sys
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
_SAVED: dict[str, object] = {}  # the last checkpoint this process wrote or resumed from


def note_checkpoint(path: str | os.PathLike, epoch: int) -> None:
    """Record a checkpoint that is on disk, for the message after Ctrl+C."""
    _SAVED.update(path=str(path), epoch=int(epoch))


def interrupted_message() -> str:
    if not _SAVED:
        return "interrupted before the first checkpoint was saved: nothing to resume, start again"
    return (f"interrupted: {_SAVED['path']} (epoch {_SAVED['epoch']}) is intact; continue with "
            f"--resume {_SAVED['path']}")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run `main(argv)`; a UserError becomes one `error:` line on stderr and exit code 2.

    Under torchrun, a crash (a bug, not a UserError) is also recorded for torchrun's summary,
    which then names the failing rank and shows its traceback."""

    def guarded(args: Sequence[str] | None) -> int:
        try:
            return main(args)
        except UserError as exc:
            print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(interrupted_message(), file=sys.stderr)
            return EXIT_INTERRUPTED

    if "TORCHELASTIC_RUN_ID" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        guarded = record(guarded)
    return guarded(argv)
