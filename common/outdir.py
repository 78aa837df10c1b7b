"""One output folder, one run: the folder's lock, the check that it can be written before any
work is done, the sweep of temporary files left by killed saves, and the one-line message for
a save that fails mid-run."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".toolkit.lock"
_HELD: set[Path] = set()  # output folders whose lock this process holds: training runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """OUTPUT/.toolkit.lock holding pid, host and start time, created exclusively. A lock of a
    process that no longer runs on this host is taken over with a notice; a live one (or one from
    another host, whose process cannot be checked) refuses the second run."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self, log) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale(log)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
            self.held = True
            _HELD.add(self.path.parent.resolve())
            return
        raise UserError(f"could not lock the output folder {self.path.parent}; pass another --output")

    def _take_over_if_stale(self, log) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, -1, socket.gethostname()  # unreadable: a write cut short
        if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
            log(f"notice: {self.path.parent} was locked by a run that has ended (pid {pid}); taking it over")
            self.path.unlink(missing_ok=True)
            return
        where = f"pid {pid} on {host}" + (f", started {holder['started']}" if "started" in holder else "")
        raise UserError(f"output folder {self.path.parent} is in use by another run ({where}); pass "
                        f"another --output, or wait for that run to end (if it is not running, delete "
                        f"{self.path})")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            _HELD.discard(self.path.parent.resolve())


def check_writable(folder: Path) -> None:
    """Create the folder and write and remove a probe file: a folder that cannot hold the run's
    files is one line now, not a traceback after the first epoch."""
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--output {folder} is a file, not a folder; pass a folder path")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {folder} ({exc.strerror or exc}); pass a "
                        "writable --output") from None


TEMPORARY_FILES = (".*.pth.*.tmp", ".*.tmp.png", ".metrics.csv.tmp")  # checkpoints, plots, metrics.csv


def sweep_temporary_files(folder: Path, log) -> None:
    """Temporary files of saves cut short by a killed process (not of a live run: the folder's
    lock is held by now), with the space they took."""
    freed, count = 0, 0
    for stale in [p for pattern in TEMPORARY_FILES for p in folder.glob(pattern)]:
        try:
            freed += stale.stat().st_size
            stale.unlink()
            count += 1
        except OSError:
            continue
    if count:
        log(f"removed {count} temporary file(s) of an interrupted save ({freed / 1e6:.1f} MB freed)")


_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}


def save_failure(exc: OSError, folder: Path, needed_bytes: int | None) -> UserError:
    """A checkpoint write (or another write of the run's saver) that failed mid-run, as the one line
    a user can act on: which file, why, for a full disk how much room a checkpoint needs, and what
    is left to continue from."""
    notes = [n.removeprefix("while writing ").removesuffix(" in the background")
             for n in getattr(exc, "__notes__", []) if n.startswith("while writing ")]
    # the saver's label is the file the user knows; the error's may be the temporary one
    name = notes[0] if notes and notes[0].startswith(str(folder)) else _filename(exc) or str(folder)
    checkpoint = name.endswith(".pth")
    need = f" (about {needed_bytes / 1e6:.0f} MB needed)" if needed_bytes and checkpoint \
        and exc.errno in _SPACE else ""
    return UserError(f"could not write {name}: {_why(exc)}{need}; {_what_is_left(folder, checkpoint)}")


def write_failure(exc: OSError, path: str | os.PathLike, name: str | None = None) -> UserError:
    """Any other file that could not be written (a log, metrics.csv, a plot, TensorBoard's events):
    which file (`name`, or the path) and why; in a training run also the checkpoint to continue from."""
    target = Path(path).resolve()
    run = next((folder for folder in _HELD if folder == target or folder in target.parents), None)
    left = _what_is_left(run, False) if run is not None else \
        "make room on the disk or fix the folder's permissions, then run the same command again"
    return UserError(f"could not write {name or path}: {_why(exc)}; {left}")


def _what_is_left(folder: Path, previous: bool) -> str:
    last = folder / "checkpoint.pth"
    if not last.is_file():
        return "nothing was saved yet: make room or fix the folder, then run the same command again"
    which = f"the previous checkpoint.pth in {folder}" if previous else str(last)
    return f"{which} is intact: make room or fix the folder, then continue with --resume {last}"


def _why(exc: OSError) -> str:
    return _SPACE.get(exc.errno or 0, exc.strerror or str(exc))


def _filename(exc: OSError) -> str | None:
    return os.fsdecode(exc.filename) if exc.filename is not None else None


def prepare_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file a tool writes after its work (--results-file, predict's --output): its folder is
    created and checked first, so a typo in the folder costs no evaluation."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {file} is a folder; pass a file name, e.g. {file / 'results.json'}")
    blocking = next((p for p in file.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # mkdir's "File exists" would not say which
        raise UserError(f"cannot write {flag} {file}: {blocking} is a file, not a folder; pass a path "
                        "in a folder")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        probe = file.parent / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {flag} {file} ({exc.strerror or exc}); pass a path in a "
                        "writable folder") from None
    return file


def write_atomically(path: str | os.PathLike, write, *, binary: bool = False,
                     name: str | None = None) -> None:
    """A result file (predictions, a mask, results JSON) written as checkpoints are: `write(fh)` fills
    a temporary file beside it, which then replaces the file, so a full disk or a refused write
    leaves any earlier file of that name whole. A failure is one UserError naming the file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        text = {} if binary else {"encoding": "utf-8", "newline": ""}
        with open(tmp, "wb" if binary else "w", **text) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if exc.filename is not None and os.fsdecode(exc.filename) == str(tmp):
            exc.filename = str(target)  # the user knows the file, not its temporary name
        raise write_failure(exc, target, name) from None


PREVIOUS_RUN_PREFIX = "previous_run_"
PREVIOUS_RUNS_NOTICE = 3  # more earlier runs than this in one folder: a notice with their size


def human_size(size: float) -> str:
    """Bytes as people read them: 512 B, 4.1 kB, 12.3 MB, 2.9 GB (powers of 1000, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    if unit == "B":
        return f"{size:.0f} B"
    return f"{size:.1f} {unit}" if size < 100 else f"{size:.0f} {unit}"


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed); what cannot be read
    counts as nothing."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size if path.is_file() else 0
        total = 0
        for folder, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += (Path(folder) / name).lstat().st_size
        return total
    except OSError:
        return 0


def previous_runs(output: Path) -> list[Path]:
    """The earlier runs that new runs into `output` moved aside, oldest first."""
    try:
        return sorted(p for p in output.glob(f"{PREVIOUS_RUN_PREFIX}*") if p.is_dir())
    except OSError:
        return []


def removal_command(output: Path) -> str:
    """The command that deletes every previous_run_* folder of `output`, for this system's shell."""
    if os.name == "nt":
        return f'Remove-Item -Recurse -Force "{output / PREVIOUS_RUN_PREFIX}*"  (PowerShell)'
    import shlex

    return f"rm -r {shlex.quote(str(output))}/{PREVIOUS_RUN_PREFIX}*"


def note_previous_runs(output: Path, log) -> None:
    """Earlier runs are kept (a re-run never deletes anything), but not silently once they pile up:
    past PREVIOUS_RUNS_NOTICE of them, one notice with their count, size and the command to remove them."""
    runs = previous_runs(output)
    if len(runs) <= PREVIOUS_RUNS_NOTICE:
        return
    size = sum(disk_size(p) for p in runs)
    log(f"notice: {output} holds {len(runs)} earlier runs ({PREVIOUS_RUN_PREFIX}* folders, "
        f"{human_size(size)} in all), kept because nothing is deleted for you; remove the ones you no "
        f"longer need, e.g. all of them: {removal_command(output)}")
