"""A torch zip archive that was cut short: found by walking its records (torch.load only says
"failed finding central directory", miniz's words), and how long it should have been.

The expected length is known when the archive's first record, data.pkl, is complete: it lists
every tensor storage with its size, so torch's own writer can lay the same archive out again
(without writing the tensor bytes) and count. The records that survived must sit where the
re-created layout puts them; otherwise (another torch version's layout) the length is unknown.
Nothing here unpickles a Python object: data.pkl is read with a stand-in for every global.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL, DESCRIPTOR, CENTRAL = b"PK\x03\x04", b"PK\x07\x08", b"PK\x01\x02"
ZIP64_END, ZIP64_LOCATOR, END = b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"


@dataclass
class Record:
    name: str | None    # None: the file ends inside the name
    offset: int         # of the local header
    start: int          # of the data
    size: int | None    # of the data; None: the file ends inside it


def truncation(path: str | os.PathLike) -> tuple[int, int | None] | None:
    """(bytes present, bytes the archive should have, or None if unknown) for a zip archive cut
    short; None for a complete archive, another kind of file, or damage of another kind."""
    with open(path, "rb") as fh:
        present = os.fstat(fh.fileno()).st_size
        if present < len(LOCAL) or fh.read(4) != LOCAL:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            records, cut = _walk(data)
            if not cut:
                return None
            return present, _expected_size(data, records)


def _walk(data: Any) -> tuple[list[Record], bool]:
    """The local records in order, and whether the file ends before the end-of-directory record."""
    pos, n, records = 0, len(data), []
    while data[pos:pos + 4] == LOCAL:
        if pos + 30 > n:
            return records, True
        flag, csize, name_len, extra_len = struct.unpack_from("<6xH10xI4xHH", data, pos)
        name_end = pos + 30 + name_len
        start = name_end + extra_len
        name = bytes(data[pos + 30:name_end]).decode("utf-8", "replace") if name_end <= n else None
        if start > n:
            records.append(Record(name, pos, start, None))
            return records, True
        if not flag & 8 and csize == 0xFFFFFFFF:  # zip64: the size is in the extra field
            csize = _zip64_size(bytes(data[name_end:min(start, n)]))
        end = _descriptor_end(data, start) if flag & 8 else (start + csize, start + csize)
        if end is None or end[1] > n:
            records.append(Record(name, pos, start, None))
            return records, True
        records.append(Record(name, pos, start, end[0] - start))
        pos = end[1]
    return records, _directory_is_cut(data, pos)


def _zip64_size(extra: bytes) -> int:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1 and size >= 16:
            return struct.unpack_from("<Q", extra, pos + 12)[0]  # after the uncompressed size
        pos += 4 + size
    return 0xFFFFFFFF


def _descriptor_end(data: Any, start: int) -> tuple[int, int] | None:
    """(end of the data, end of its data descriptor) of a record written with sizes after the data:
    the descriptor is the first PK\\7\\8 whose size fields equal its distance from `start`."""
    n, at = len(data), start
    while (at := data.find(DESCRIPTOR, at)) >= 0:
        length = at - start
        for width, fmt in ((16, "<II"), (24, "<QQ")):  # zip32, zip64
            if at + width <= n and struct.unpack_from(fmt, data, at + 8) == (length, length):
                after = at + width
                if after + 4 > n or data[after:after + 4] in (LOCAL, CENTRAL):
                    return at, after
        at += 1
    return None


def _directory_is_cut(data: Any, pos: int) -> bool:
    """Walk the central directory and end records from `pos`: does the file end inside them?"""
    n = len(data)
    while pos < n:
        sig = data[pos:pos + 4]
        if sig == CENTRAL:
            if pos + 46 > n:
                return True
            pos += 46 + sum(struct.unpack_from("<HHH", data, pos + 28))
        elif sig == ZIP64_END:
            if pos + 12 > n:
                return True
            pos += 12 + struct.unpack_from("<Q", data, pos + 4)[0]
        elif sig == ZIP64_LOCATOR:
            pos += 20
        elif sig == END:
            return pos + 22 > n or pos + 22 + struct.unpack_from("<H", data, pos + 20)[0] > n
        else:
            return len(sig) < 4 and b"PK".startswith(sig[:2])  # a partial signature is a cut; else damage
    return True  # no end record


# ---------------------------------------------------------------- the expected length

def _expected_size(data: Any, records: list[Record]) -> int | None:
    first = records[0] if records else None
    if first is None or first.size is None or not (first.name or "").endswith("data.pkl"):
        return None
    prefix = first.name[: -len("data.pkl")]
    pickled = bytes(data[first.start:first.start + first.size])
    storages = _storages(pickled)
    if storages is None:
        return None
    intact = {r.name[len(prefix):]: bytes(data[r.start:r.start + r.size])
              for r in records if r.name and r.size is not None}
    alignment = intact.get(".storage_alignment", b"64")
    small = [(".format_version", intact.get(".format_version", b"1")), (".storage_alignment", alignment),
             ("byteorder", intact.get("byteorder", sys.byteorder.encode()))]
    try:
        offsets, total = _layout(prefix.rstrip("/"), [("data.pkl", pickled), *small], storages,
                                 int(alignment))
    except (RuntimeError, ValueError, OSError):
        return None
    for record, (name, offset) in zip(records, offsets, strict=False):
        if record.offset != offset or (record.name is not None and record.name != prefix + name):
            return None  # laid out by another torch version: its length cannot be re-created here
    return total


def _layout(archive: str, small: list[tuple[str, bytes]], storages: dict[str, int],
            alignment: int) -> tuple[list[tuple[str, int]], int]:
    """(name, header offset) of every record and the archive's length, as torch's writer lays
    out these records: in a counter (archive name "archive", as for a saved file object) or in
    a sparse temporary file named so that the writer takes the same archive name."""
    import torch

    if archive == "archive":
        counter = _Counter()
        writer = torch._C.PyTorchFileWriter(counter, False, alignment)
        offsets = _write(writer, small, storages, counter)
        return offsets, counter.end
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{archive}.pt"
        writer = torch._C.PyTorchFileWriter(str(path), False, alignment)
        _write(writer, small, storages, None)
        del writer
        with zipfile.ZipFile(path) as done:
            offsets = [(info.filename.split("/", 1)[1], info.header_offset) for info in done.infolist()]
        return offsets, path.stat().st_size


def _write(writer: Any, small: list[tuple[str, bytes]], storages: dict[str, int],
           counter: _Counter | None) -> list[tuple[str, int]]:
    offsets = []
    for name, content in small:
        offsets.append((name, counter.pos if counter else -1))
        writer.write_record(name, content, len(content))
    for key, size in storages.items():
        offsets.append((f"data/{key}", counter.pos if counter else -1))
        writer.write_record_metadata(f"data/{key}", size)  # the header, then a seek past the data
    writer.write_end_of_file()
    return offsets


class _Counter:
    """A file object that keeps only its length."""

    def __init__(self) -> None:
        self.pos = self.end = 0

    def write(self, chunk: Any) -> int:
        size = memoryview(chunk).nbytes
        self.pos += size
        self.end = max(self.end, self.pos)
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.end + offset
        self.end = max(self.end, self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        return None


class _Stand:
    """What every global in data.pkl becomes: a class that takes any arguments and state."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __setstate__(self, state: Any) -> None:
        return None

    def __setitem__(self, key: Any, value: Any) -> None:
        return None

    def append(self, value: Any) -> None:
        return None

    def extend(self, values: Any) -> None:
        return None


class _Skeleton(pickle.Unpickler):
    """Unpickles the structure only, to list the storages: ('storage', type, key, location, numel)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Stand,), {})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            self.storages.setdefault(str(pid[2]), int(pid[4]) * _item_size(pid[1].__name__))
        return _Stand()


def _item_size(storage_type: str) -> int:
    import torch

    if storage_type == "UntypedStorage":
        return 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        return torch.storage._get_dtype_from_pickle_storage_type(storage_type).itemsize


def _storages(pickled: bytes) -> dict[str, int] | None:
    """Storage key -> bytes, in the order torch wrote them; None if data.pkl cannot be read."""
    reader = _Skeleton(pickled)
    try:
        reader.load()
    except Exception:  # damaged data.pkl (any unpickling error): the length stays unknown
        return None
    return reader.storages
