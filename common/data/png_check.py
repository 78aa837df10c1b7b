"""The PNG part of `--check-images fast`: inflate the compressed image data and check that it
holds every row the header promises, each row starting with a valid filter type.

Why. A PNG's chunk checksums (CRCs, what PIL's verify() walks) can be valid while the zlib
stream inside the IDAT chunks is corrupt or cut short: the file then passes a checksum walk and
fails when training decodes it. Inflating the stream proves what decoding needs from it (zlib
checks its own Adler-32 sum on the way) and costs a fraction of a full decode: no unfiltering,
no colour conversion, and the inflated data is looked at in 1 MB pieces, never held whole.
Data beyond the promised rows is inflated (for zlib's checksum at the end) but not looked at.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20  # at most this many inflated bytes at a time


def _chunks(fh: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of every chunk up to IEND; a cut-short chunk ends the walk."""
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        data = fh.read(length)
        fh.read(4)  # the CRC: PIL's verify() checks it
        if len(data) < length:
            return
        yield kind, data
        if kind == b"IEND":
            return


def row_starts(header: bytes) -> np.ndarray:
    """Offsets, in the inflated data, of every row's filter-type byte (all Adam7 passes when
    interlaced); the last entry is the total length the rows take."""
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    bits = depth * CHANNELS.get(colour, 1)
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    starts, offset = [], 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_width <= 0 or pass_height <= 0:
            continue  # an empty pass has no rows, not even filter bytes
        stride = 1 + -(-(pass_width * bits) // 8)
        starts.append(offset + stride * np.arange(pass_height, dtype=np.int64))
        offset += stride * pass_height
    starts.append(np.array([offset], dtype=np.int64))
    return np.concatenate(starts)


def _inflate(idat: Iterator[bytes]) -> Iterator[bytes]:
    """The inflated data in pieces of at most _PIECE bytes, to the end of the stream (where zlib
    checks its Adler-32 sum) or of the data. Raises zlib.error on a corrupt stream."""
    stream = zlib.decompressobj()
    for data in idat:
        while data:
            piece = stream.decompress(data, _PIECE)
            data = stream.unconsumed_tail
            yield piece
            if stream.eof:
                return


def png_data_problem(path: str) -> str | None:
    """None when the IDAT stream of the PNG at `path` inflates to all its rows with valid filter
    types; otherwise why not, in words. The signature and header are assumed read (PIL opened it)."""
    with open(path, "rb") as fh:
        if fh.read(8) != PNG_MAGIC:
            return "not a PNG file"
        chunks = _chunks(fh)
        kind, header = next(chunks, (b"", b""))
        if kind != b"IHDR" or len(header) < 13:
            return "the PNG header chunk is missing"
        starts = row_starts(header)
        needed, starts = int(starts[-1]), starts[:-1]
        idat = (data for kind, data in chunks if kind == b"IDAT")
        done, k = 0, 0
        try:
            for piece in _inflate(idat):
                end = np.searchsorted(starts, done + len(piece))
                filters = np.frombuffer(piece, dtype=np.uint8)[starts[k:end] - done]
                if filters.size and int(filters.max()) > 4:
                    row = k + int(np.argmax(filters > 4))
                    return f"row {row} of the image data has an invalid filter type (corrupt data)"
                done, k = done + len(piece), int(end)
        except zlib.error as exc:
            return f"the compressed image data is corrupt (zlib: {exc})"
    if done < needed:
        return f"the image data is truncated ({done} of {needed} bytes)"
    return None
