"""A detector of host syncs made on behalf of the project's code, for tests on the CPU.

A read of a device tensor by the host (`.item()`, `float(t)`, `if t:`, `f"{t:.4f}"`, `str(t)`,
`t.tolist()`, `t.numpy()`, `np.asarray(t)`, `t.cpu()`, `t.to("cpu")`) waits for the device: one
per training step is what makes a loop slower than a hand-written one. On a CPU every tensor is on
the host, so the detector counts the calls that *would* sync on a GPU:

- every such Tensor method is patched; a call counts when any frame of the Python stack (not only
  the caller) is in one of `roots` (common/ by default), so a read inside torch made for our code
  (a `clip_grad_norm_(error_if_nonfinite=True)`, a `torch.equal` in an `if`) counts too;
- except the optimizer reading its own step counters (CPU tensors on every device);
- a move (`.cpu()`, `.to(cpu)`) counts when our code itself makes it (the direct caller is in
  `roots`) on a tensor that did not come from the data loader: inside torch, `.to(device)` goes to
  the model's device, which is the CPU here and a GPU there, and a loader tensor going to the
  device is a host-to-device copy;
- an operator whose output size depends on the values (torch's tag `dynamic_output_shape`:
  `bincount`, `nonzero`, `unique`, `masked_select`, indexing with a boolean mask, ...) counts
  when any frame of the stack is in `roots`: on a GPU the host waits to learn the size before it
  can allocate the result. A dispatch mode sees them, also inside torch's own functions.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common

LIBRARY = str(Path(common.__file__).parent)
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__format__",
         "__repr__", "__array__")
MOVES = ("cpu", "to")


class HostSyncs:
    def __init__(self, roots: Iterable[str], optimizers: Iterable[torch.optim.Optimizer] = ()):
        self.roots = tuple(str(r) for r in roots)
        self.optimizers = list(optimizers)
        self.calls: list[str] = []
        self.host: set[int] = set()  # ids of tensors that came from the loader
        self._depth = 0

    @property
    def count(self) -> int:
        return len(self.calls)

    def from_loader(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches, marking their tensors as host tensors."""
        for batch in batches:
            for item in batch if isinstance(batch, (tuple, list)) else (batch,):
                if isinstance(item, torch.Tensor):
                    self.host.add(id(item))
            yield batch

    def _ours(self, direct: bool = False) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(self.roots) and name != __file__:
                return f"{Path(name).name}:{frame.f_lineno}"
            if direct:
                return None
            frame = frame.f_back
        return None

    def _optimizer_step_counter(self, tensor: torch.Tensor) -> bool:
        return any(tensor is state.get("step") for opt in self.optimizers for state in opt.state.values())

    def _to_host(self, tensor: torch.Tensor, name: str, args: tuple, kwargs: dict) -> bool:
        if id(tensor) in self.host:
            return False
        if name == "cpu":
            return True
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, torch.Tensor):
            target = target.device
        if isinstance(target, (str, torch.device)):
            try:
                return torch.device(target).type == "cpu"
            except (RuntimeError, TypeError):
                return False  # a dtype given as a string
        return False

    def wrap(self, name: str, original):
        detector = self

        def method(tensor, *args, **kwargs):
            if detector._depth == 0:
                where = detector._ours(direct=name in MOVES)
                counts = where is not None and (
                    detector._to_host(tensor, name, args, kwargs) if name in MOVES
                    else not detector._optimizer_step_counter(tensor))
                if counts:
                    detector.calls.append(f"{name} at {where}")
            detector._depth += 1  # a read made inside another (format -> item) is one sync
            try:
                return original(tensor, *args, **kwargs)
            finally:
                detector._depth -= 1
        method.__name__ = name
        return method


def _sized(func, args: tuple) -> bool:
    """one_hot with num_classes given (seen as one operator under inference mode; elsewhere its
    decomposition is seen): its size is known, and on CUDA it checks the values with a device
    assert instead of reading them (only the CPU reads min and max)."""
    return func is torch.ops.aten.one_hot.default and len(args) > 1 and args[1] >= 0


class _SizeFromValues(TorchDispatchMode):
    """Counts the operators whose output size the device must compute first (see above)."""

    def __init__(self, detector: HostSyncs):
        super().__init__()
        self.detector = detector

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        d = self.detector
        if d._depth == 0 and torch.Tag.dynamic_output_shape in func.tags and not _sized(func, args):
            where = d._ours()
            if where is not None:
                d.calls.append(f"{func.__name__} at {where}")
        return func(*args, **(kwargs or {}))


@contextmanager
def host_syncs(monkeypatch, roots: Iterable[str] = (LIBRARY,),
               optimizers: Iterable[torch.optim.Optimizer] = ()) -> Iterator[HostSyncs]:
    detector = HostSyncs(roots, optimizers)
    for name in READS + MOVES:
        monkeypatch.setattr(torch.Tensor, name, detector.wrap(name, getattr(torch.Tensor, name)))
    try:
        with _SizeFromValues(detector):
            yield detector
    finally:
        monkeypatch.undo()
