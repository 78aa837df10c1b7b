"""Checkpoints written beside training.

At an epoch end the training thread takes a host snapshot of what it saves (BackgroundSaver.snapshot)
and hands the writes to one writer thread (BackgroundSaver.submit), then goes on training. The writes
themselves are unchanged (checkpoint.atomic_save: temporary file, fsync, rename), so a process killed
at any instant still leaves the previous checkpoint loadable.

    saver = BackgroundSaver(pin_memory=session.pin_memory)
    try:
        for epoch in ...:
            train_one_epoch()
            snap = saver.snapshot({"ckpt": ckpt_payload, "best": best_payload})  # one per save
            saver.submit([atomic_write(snap["best"], out / "best_model.pth"),    # in this order
                          atomic_write(snap["ckpt"], out / "checkpoint.pth")])
    finally:
        saver.close()  # the write in progress finishes, also after Ctrl-C

Rules:
- One batch of writes is in flight at a time: snapshot() and submit() first wait for the previous
  batch (the next save waits for the previous one; pooled snapshot buffers are reused).
- A failed write is raised in the training thread at the next snapshot/submit/wait/close, once, as
  the same exception (an OSError keeps errno and filename) with a note naming the write; the later
  writes of its batch are not run.
- The writer is a concurrent.futures worker thread, which the interpreter joins at exit, so a write
  submitted by a caller that forgot close() still completes; an error nobody collected is then
  logged at exit (atexit), since there is no caller left to raise it to.
- A BackgroundSaver belongs to one thread (the training thread); it is not for concurrent callers.
"""
from __future__ import annotations

import atexit
import copy
import enum
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_save

Write = tuple[str, Callable[[], None]]
# values a snapshot keeps as they are: nothing the training thread can change in place
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), range, enum.Enum,
              torch.dtype, torch.device, torch.memory_format, torch.layout)
_POLL_S = 0.25  # how often a wait() in the training thread looks for Ctrl-C
_OPEN: set[BackgroundSaver] = set()  # savers with a writer thread that were not closed (for atexit)


def atomic_write(obj: Any, path: str | os.PathLike) -> Write:
    """The write `checkpoint.atomic_save(obj, path)`, labelled with its path, for submit()."""
    return str(path), partial(atomic_save, obj, path)


# ---------------------------------------------------------------- epoch checkpoints

EPOCH_FILE = "checkpoint_epoch{}.pth"


def without_train_state(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's weights and metadata, without the train state (optimizer, schedule, RNG):
    what best_model.pth and checkpoint_epoch{N}.pth hold, about the size of the weights. The
    tensors are the payload's own (no copy)."""
    return {k: v for k, v in payload.items() if k != "train_state"}


def epoch_number(path: Path) -> int | None:
    """N of checkpoint_epoch{N}.pth, None for other names."""
    digits = path.name.removeprefix("checkpoint_epoch").removesuffix(".pth")
    if path.name.startswith("checkpoint_epoch") and path.name.endswith(".pth") and digits.isdigit():
        return int(digits)
    return None


def prune_epoch_checkpoints(folder: Path, keep_last: int, keep: Sequence[int] = ()) -> list[Path]:
    """Delete the checkpoint_epoch{N}.pth files of `folder` but the last keep_last (0: delete none)
    and those of the epochs in `keep` (the best epoch's). Returns the deleted paths."""
    if keep_last <= 0:
        return []
    numbered = sorted((n, p) for p in folder.glob("checkpoint_epoch*.pth")
                      if (n := epoch_number(p)) is not None)
    old = [p for n, p in numbered[:-keep_last] if n not in set(keep)]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def epoch_checkpoint_write(payload: dict[str, Any], folder: Path, epoch: int, keep_last: int,
                           best_epoch: int | None = None) -> Write:
    """For submit(): checkpoint_epoch{epoch}.pth with the payload's weights and metadata only (the
    resume state is checkpoint.pth alone), written atomically; then the epoch files beyond the last
    keep_last are deleted, never the best epoch's (keep_last 0 keeps every one)."""
    path = folder / EPOCH_FILE.format(epoch)
    light = without_train_state(payload)

    def write() -> None:
        atomic_save(light, path)
        prune_epoch_checkpoints(folder, keep_last, () if best_epoch is None else (best_epoch,))

    return str(path), write


class BackgroundSaver:
    """Host snapshots of training state and their writes on one background thread."""

    def __init__(self, *, pin_memory: bool = False, enabled: bool = True):
        """pin_memory: snapshot CUDA tensors into pinned host buffers that are reused across saves
        (asynchronous copies, one synchronisation per save); CPU tensors go to reused plain buffers.
        enabled=False: submit() runs the writes itself, in the calling thread (same code otherwise)."""
        self.pin_memory = pin_memory
        self.enabled = enabled
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[BaseException | None] | None = None
        self._pool: dict[tuple, torch.Tensor] = {}  # (path, shape, dtype, pinned) -> host buffer
        self._closed = False

    @property
    def busy(self) -> bool:
        """A submitted batch of writes has not finished yet."""
        return self._future is not None and not self._future.done()

    def snapshot(self, obj: Any) -> Any:
        """A copy of obj (nested dicts/lists/tuples of plain values and tensors) whose tensors are
        host copies that later in-place changes of the originals cannot touch.

        Waits for the previous batch of writes first (it may still read pooled buffers) and raises
        its error. With pin_memory the returned tensors are pooled buffers: the snapshot is valid
        until the next snapshot() call, so take one snapshot of everything a batch writes."""
        self.wait()
        old_pool, self._pool = self._pool, {}
        devices: set[torch.device] = set()
        copied = self._copy(obj, (), {}, old_pool, devices)
        for device in devices:  # the non_blocking device-to-host copies have landed
            torch.cuda.current_stream(device).synchronize()
        return copied

    def submit(self, writes: Sequence[Write]) -> None:
        """Run the writes, in order, on the writer thread; each is (label, callable), the label (e.g.
        the file path) names it in an error. Waits for the previous batch first and raises its error
        (then this batch is not started). With enabled=False the writes run here, and a failure is
        raised from this call."""
        if self._closed:
            raise RuntimeError("BackgroundSaver.submit() after close()")
        writes = list(writes)
        for label, write in writes:
            if not callable(write):
                raise TypeError(f"write {label!r} is not callable: {write!r}")
        self.wait()
        if not self.enabled:
            error = _run_writes(writes, background=False)
            if error is not None:
                raise error
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            _OPEN.add(self)
        self._future = self._executor.submit(_run_writes, writes, background=True)

    def wait(self) -> None:
        """Block until the writes submitted so far are done; re-raise a failure of theirs (once)."""
        if self._future is None:
            return
        # Waiting in slices lets Ctrl-C through at once (on Windows a lock wait without timeout ignores
        # it, and on POSIX a SIGINT just before the wait blocks would wait for the end of the write).
        # A KeyboardInterrupt here keeps the future, so that close() still waits for the write.
        while not wait_futures([self._future], timeout=_POLL_S).done:
            pass
        error = self._future.result()
        self._future = None
        if error is not None:
            raise error

    def close(self) -> None:
        """wait(), then stop the writer thread. Idempotent; after a failed write it raises that
        failure (once) and still stops the thread. Interrupted while waiting (Ctrl-C), the thread is
        kept so that a later close() (or the interpreter's exit) still finishes the write."""
        try:
            self.wait()
        finally:
            if self._future is None:
                self._closed = True
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None
                _OPEN.discard(self)

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- snapshot internals

    def _copy(self, obj: Any, path: tuple, memo: dict[int, torch.Tensor],
              old_pool: dict[tuple, torch.Tensor], devices: set[torch.device]) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:  # the same tensor twice in obj: one copy (obj keeps the ids alive)
                memo[id(obj)] = self._copy_tensor(obj, path, old_pool, devices)
            return memo[id(obj)]
        if isinstance(obj, _IMMUTABLE):
            return obj
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict)
            for key, value in obj.items():
                out[key] = self._copy(value, (*path, key), memo, old_pool, devices)
            return out
        if isinstance(obj, list | tuple):
            items = [self._copy(v, (*path, i), memo, old_pool, devices) for i, v in enumerate(obj)]
            if isinstance(obj, list):
                return items
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
        return copy.deepcopy(obj)  # numpy arrays, sets, ...: anything else mutable

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple, old_pool: dict[tuple, torch.Tensor],
                     devices: set[torch.device]) -> torch.Tensor:
        src = tensor.detach()
        if not self.pin_memory or src.layout is not torch.strided or src.is_quantized:
            return src.to("cpu", copy=True)
        pinned = src.is_cuda
        key = (path, tuple(src.shape), src.dtype, pinned)
        buffer = old_pool.pop(key, None)
        if buffer is None:
            buffer = torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned)
        buffer.copy_(src, non_blocking=pinned)
        if pinned:
            devices.add(src.device)
        self._pool[key] = buffer
        return buffer


def _run_writes(writes: list[Write], *, background: bool) -> BaseException | None:
    """Run the writes in order; stop at the first failure and return it, labelled."""
    for label, write in writes:
        try:
            write()
        except BaseException as exc:  # handed to the training thread, which raises it
            _add_note(exc, f"while writing {label}" + (" in the background" if background else ""))
            return exc
    return None


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: the attribute that 3.11's add_note() fills
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


@atexit.register
def _close_at_exit() -> None:
    """The interpreter has already joined the writer threads (their writes are done); report a
    failure that no caller collected because close() was never called."""
    for saver in list(_OPEN):
        try:
            saver.close()
        except BaseException as exc:
            detail = " ".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])
            logging.getLogger("toolkit").error(f"error: a checkpoint write failed: {detail}")
