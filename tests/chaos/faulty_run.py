"""Run one of the toolkit's scripts and stop it at a chosen instant, for the chaos tests.

    python tests/chaos/faulty_run.py --pause write:checkpoint.pth:2:10 --marker m.json -- gpu_train ARGS
    python tests/chaos/faulty_run.py --pause step:5 --quiet --marker m.json --go go -- gpu_train ARGS

At the instant, the thread that reaches it writes the marker file (JSON: the instant, the thread) and
waits: for the --go file to appear, or forever (the test kills the process with SIGKILL). If the
instant never comes, the script runs to its end and this exits with the script's code, no marker.

Instants (NAMES: file names separated by commas; a file matches the name when its own name contains
the name's stem and suffix, as the temporary files of a save do, e.g. .checkpoint.pth.k2x9.tmp):
    step:K              after the K-th optimizer step (the training thread)
    write:NAMES:N:C     before the C-th write into the N-th file opened for writing that matches
    replace:NAMES:N     before the N-th rename onto a file called one of NAMES
    replaced:NAMES:N    just after it
--quiet (step instants): first wait until no checkpoint write is in flight, so that nothing changes
in the output folder while the process waits.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from interpose import Interposer, Opened, Plan, real_open, real_replace  # noqa: E402

KINDS = ("step", "write", "replace", "replaced")


@dataclass(frozen=True)
class Instant:
    kind: str
    names: tuple[str, ...] = ()
    occurrence: int = 0  # step K, or the N-th matching file / rename
    write: int = 0  # write:...:C

    @classmethod
    def parse(cls, text: str) -> Instant:
        kind, *rest = text.split(":")
        shape = {"step": 1, "write": 3, "replace": 2, "replaced": 2}.get(kind)
        if shape is None or len(rest) != shape:
            raise SystemExit(f"faulty_run: bad instant {text!r} (see --help)")
        if kind == "step":
            return cls(kind, occurrence=int(rest[0]))
        names = tuple(rest[0].split(","))
        return cls(kind, names, int(rest[1]), int(rest[2]) if kind == "write" else 0)

    def matches_file(self, path: str) -> bool:
        base = os.path.basename(path)
        return any(Path(n).stem in base and Path(n).suffix in base for n in self.names)


class Pause(Plan):
    """Stops the thread that reaches `instant`: writes the marker, then waits for `go` (or forever)."""

    def __init__(self, instant: Instant, marker: Path, go: Path | None, quiet: bool):
        self.instant, self.marker, self.go, self.quiet = instant, marker, go, quiet
        self.files = self.renames = self.steps = 0
        self.lock = threading.Lock()

    def opening(self, path: str) -> Opened | None:
        if self.instant.kind != "write" or not self.instant.matches_file(path):
            return None
        with self.lock:
            self.files += 1
            return Opened(path, self.files) if self.files == self.instant.occurrence else None

    def writing(self, opened: Opened) -> None:
        if opened.writes == self.instant.write:
            self.stop(opened.path)

    def replacing(self, src: str, dst: str) -> None:
        self._rename(dst, "replace")

    def replaced(self, src: str, dst: str) -> None:
        self._rename(dst, "replaced")

    def _rename(self, dst: str, kind: str) -> None:
        if self.instant.kind != kind or os.path.basename(dst) not in self.instant.names:
            return
        with self.lock:
            self.renames += 1
            reached = self.renames == self.instant.occurrence
        if reached:
            self.stop(dst)

    def after_step(self, *_: object) -> None:
        self.steps += 1
        if self.instant.kind == "step" and self.steps == self.instant.occurrence:
            if self.quiet:
                from common import saver

                while any(s.busy for s in list(saver._OPEN)):
                    time.sleep(0.01)
            self.stop(f"optimizer step {self.steps}")

    def stop(self, where: str) -> None:
        tmp = self.marker.with_name(self.marker.name + ".part")
        with real_open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"where": where, "thread": threading.current_thread().name, "pid": os.getpid()}, fh)
        real_replace(str(tmp), str(self.marker))
        while self.go is None or not self.go.exists():
            time.sleep(0.02)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause", required=True, type=Instant.parse)
    parser.add_argument("--marker", required=True, type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--quiet", action="store_true")
    opts = parser.parse_args(argv[:split])
    script, *args = argv[split + 1:]
    plan = Pause(opts.pause, opts.marker, opts.go, opts.quiet)
    module = importlib.import_module(script)
    with Interposer(plan):
        if opts.pause.kind == "step":
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(plan.after_step)
        return module.main(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
