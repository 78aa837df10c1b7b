"""Faults and pauses at the OS calls the toolkit's writers really make, for the chaos suite.

While an Interposer is installed, every way this process opens a file for writing goes through it:
open()/io.open() (and so os.fdopen, pathlib, csv, json, PIL, matplotlib, onnx, TensorBoard's event
files, logging's FileHandler), os.open/os.write (tempfile.mkstemp, the lock file); so do the
renames that publish a finished file (os.replace, os.rename). A Plan decides at each call on a path
whether to let it through, fail it the way a full disk (ENOSPC at the first write: the open itself
succeeds) or a folder without permission (EACCES at the open) does, or stop the calling thread there
so that a test can kill the process at that instant.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

_REAL = {"open": builtins.open, "os.open": os.open, "os.write": os.write, "os.close": os.close,
         "os.replace": os.replace, "os.rename": os.rename}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def real_open(*args: Any, **kwargs: Any):
    """open() as it was before any Interposer (for the test's own files)."""
    return _REAL["open"](*args, **kwargs)


def real_replace(src: str, dst: str) -> None:
    _REAL["os.replace"](src, dst)


def _path(file: Any) -> str:
    return os.path.abspath(os.fsdecode(file))


@dataclass
class Opened:
    """One file opened for writing that a plan watches: its path, which watched open it was (1-based)
    and how many writes it has had."""
    path: str
    index: int
    writes: int = 0


class Plan:
    """What happens at each call; the default lets everything through. Hooks run in the calling
    thread (the training thread or the checkpoint writer) and may raise or block."""

    def opening(self, path: str) -> Opened | None:
        """Before a file is opened for writing; returns the Opened to watch its writes, or None."""
        return None

    def writing(self, opened: Opened) -> None:
        """Before each write to a watched file (opened.writes already counts this one)."""

    def replacing(self, src: str, dst: str) -> None:
        """Before the rename of src onto dst."""

    def replaced(self, src: str, dst: str) -> None:
        """After it."""


class _Watched:
    """A file object whose writes go through plan.writing first; everything else is the file's."""

    def __init__(self, fh: Any, opened: Opened, plan: Plan):
        self._fh, self._opened, self._plan = fh, opened, plan

    def write(self, data: Any) -> int:
        self._opened.writes += 1
        self._plan.writing(self._opened)
        return self._fh.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _Watched:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


class Interposer:
    """Installs a Plan on this process's write calls (a context manager; not re-entrant)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._fds: dict[int, Opened] = {}  # fds from os.open that the plan watches
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Interposer:
        opener = self._open
        patches = ((builtins, "open", opener), (io, "open", opener),  # logging's FileHandler's too
                   (os, "open", self._os_open), (os, "write", self._os_write), (os, "close", self._os_close),
                   (os, "replace", self._renamer("os.replace")), (os, "rename", self._renamer("os.rename")))
        for owner, name, value in patches:
            self._saved.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any):
        if isinstance(file, int):  # os.fdopen(fd) and open(fd): a file os.open made
            opened = self._fds.pop(file, None)
        else:
            opened = self.plan.opening(_path(file)) if set(mode) & set("wax+") else None
        fh = _REAL["open"](file, mode, *args, **kwargs)
        return fh if opened is None else _Watched(fh, opened, self.plan)

    def _os_open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        opened = self.plan.opening(_path(path)) if flags & _WRITE_FLAGS else None
        fd = _REAL["os.open"](path, flags, mode, **kwargs)
        if opened is None:
            self._fds.pop(fd, None)
        else:
            self._fds[fd] = opened
        return fd

    def _os_write(self, fd: int, data: Any) -> int:
        opened = self._fds.get(fd)
        if opened is not None:
            opened.writes += 1
            self.plan.writing(opened)
        return _REAL["os.write"](fd, data)

    def _os_close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        _REAL["os.close"](fd)

    def _renamer(self, name: str):
        real = _REAL[name]

        def rename(src: Any, dst: Any, **kwargs: Any) -> None:
            self.plan.replacing(_path(src), _path(dst))
            real(src, dst, **kwargs)
            self.plan.replaced(_path(src), _path(dst))
        return rename


@dataclass
class DiskFault(Plan):
    """Writes to files whose path matches `pattern` fail from the (skip+1)-th such open on, as on a
    full disk (code ENOSPC: the open succeeds, the at_write-th write fails, and every one after it)
    or in a folder the process may not write (EACCES: the open fails). `fired` lists the paths it
    failed."""
    pattern: str
    code: int
    skip: int = 0
    at_write: int = 1
    fired: list[str] = field(default_factory=list)
    _seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def opening(self, path: str) -> Opened | None:
        if not re.search(self.pattern, path):
            return None
        with self._lock:
            self._seen += 1
            index = self._seen
        if index <= self.skip:
            return None
        if self.code != errno.ENOSPC:
            self.fired.append(path)
            raise OSError(self.code, os.strerror(self.code), path)
        return Opened(path, index)

    def writing(self, opened: Opened) -> None:
        if opened.writes < self.at_write:
            return
        self.fired.append(opened.path)
        raise OSError(self.code, os.strerror(self.code))  # a write names no file
