"""A window of a build log read without loading the log whole: at most
``limit`` bytes from an offset, from the start of a numbered line, or the
tail; and the number of the window's first line.

Line numbers come from newline counts per ``CHUNK`` of the file, kept for
finished logs (which only ever grow by a dispatcher line, so the cached
counts are checked against the size) and counted afresh for running ones,
whose file the size cap may still cut. Counting is a pass over the bytes
before the window in ``CHUNK`` pieces: memory stays one chunk whatever the
log's size. Blocking file work: the dispatcher runs it in a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from .text import utf8_boundary

CHUNK = 1 << 20
KEEP = 64               # finished logs whose counts are kept


@dataclass(frozen=True)
class Window:
    data: bytes
    offset: int         # where ``data`` starts in the log
    line: int           # the number (1-based) of the line ``data`` starts in
    size: int           # the log's size when read


def _counts(f, size: int) -> list[int]:
    """Newlines before each CHUNK boundary: counts[k] is the number in [0, k*CHUNK)."""
    counts = [0]
    f.seek(0)
    for _ in range(size // CHUNK):
        counts.append(counts[-1] + f.read(CHUNK).count(b"\n"))
    return counts


class LogLines:
    """Windows of the logs under one directory, with the counts of finished logs kept."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[int, list[int]]] = {}     # build -> (size counted, counts)
        self._lock = threading.Lock()

    def _index(self, f, build_id: int, size: int, final: bool) -> list[int]:
        with self._lock:
            kept = self._kept.get(build_id)
        if kept is not None and kept[0] == size:
            return kept[1]
        counts = _counts(f, size)
        if final:
            with self._lock:
                self._kept.pop(build_id, None)
                self._kept[build_id] = (size, counts)
                while len(self._kept) > KEEP:
                    self._kept.pop(next(iter(self._kept)))
        return counts

    def read(self, path: Path, build_id: int, limit: int, final: bool, offset: int | None = None,
             line: int | None = None) -> Window:
        """The window (see the module docstring); an absent log is empty. With
        neither ``offset`` nor ``line`` (or a line past the end): the tail. A
        window from an offset (or the tail) starts at the first line that
        begins in it, unless no line does."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return Window(b"", 0, 1, 0)
        with f:
            size = f.seek(0, 2)
            counts = self._index(f, build_id, size, final)
            if line is not None:
                offset = _line_start(f, counts, line)
            # a window from a byte offset, or the tail, starts at the next whole line
            align = line is None or offset is None
            if offset is None:
                offset = max(0, size - limit)
            offset = min(offset, size)
            f.seek(max(0, offset - 1))
            before = f.read(1) if offset > 0 else b"\n"
            data = f.read(limit)
            if align and before != b"\n":
                newline = data.find(b"\n")
                if 0 <= newline < len(data) - 1:        # start at a line when the window holds one
                    offset, data = offset + newline + 1, data[newline + 1:]
            skip = 0
            while skip < min(len(data), 3) and data[skip] & 0xC0 == 0x80:     # never half a character
                skip += 1
            offset, data = offset + skip, data[skip:]
            if not (final and offset + len(data) == size):     # a running log's next bytes may finish it
                data = data[:utf8_boundary(data)]
            first = 1 + _newlines_before(f, counts, offset)
        return Window(data, offset, first, size)


def _newlines_before(f, counts: list[int], offset: int) -> int:
    k = min(offset // CHUNK, len(counts) - 1)
    f.seek(k * CHUNK)
    return counts[k] + f.read(offset - k * CHUNK).count(b"\n")


def _line_start(f, counts: list[int], line: int) -> int | None:
    """Where line ``line`` (1-based) starts; None past the last line."""
    if line <= 1:
        return 0
    want = line - 1                             # newlines before it
    k = 0
    while k + 1 < len(counts) and counts[k + 1] < want:
        k += 1
    seen = counts[k]
    at = k * CHUNK
    f.seek(at)
    while True:
        block = f.read(CHUNK)
        if not block:
            return None
        here = block.count(b"\n")
        if seen + here >= want:
            pos = -1
            for _ in range(want - seen):
                pos = block.index(b"\n", pos + 1)
            return at + pos + 1
        seen += here
        at += len(block)
