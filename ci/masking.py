"""Build secrets kept out of logs: every occurrence of a secret's exact value
becomes ``***``.

``Masker`` works on a stream of bytes written in pieces (a step's output
read 64 KiB at a time, a log sent in frames): a value cut in two by a
piece boundary is still caught, because the end of what it has seen is held
back while it could be the start of a value, and let go as soon as it
cannot (or at ``flush``). What it holds back is always shorter than the
longest value, so a log is never held up by more than that.

``hide`` is the one-shot form for a piece on its own, keeping the length
(each byte of a value becomes ``*``): the dispatcher uses it on each log
frame as a second line of defence, where the runner's offsets count bytes
and must stay true.

Only the exact bytes of a value are caught: a value transformed (base64,
URL-quoted, reversed, one character per line) passes through. Plain code,
standard library only.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

MASK = b"***"


def _values(values: Iterable[str | bytes]) -> list[bytes]:
    found = {v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values}
    found.discard(b"")
    # longest first: where two values start at one place, the longer one is hidden whole
    return sorted(found, key=lambda v: (-len(v), v))


def _pattern(values: list[bytes]) -> re.Pattern[bytes] | None:
    return _compiled(tuple(values)) if values else None


@functools.lru_cache(maxsize=64)
def _compiled(values: tuple) -> re.Pattern[bytes]:
    return re.compile(b"|".join(re.escape(v) for v in values))


class Masker:
    """Replaces each secret value in a stream of bytes by ``mask``."""

    def __init__(self, values: Iterable[str | bytes], mask: bytes = MASK):
        self.values = _values(values)
        self.mask = mask
        self._pattern = _pattern(self.values)
        self._starts = frozenset(v[0] for v in self.values)
        self._longest = max((len(v) for v in self.values), default=0)
        self._held = b""

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def held(self) -> int:
        """Bytes seen but not yet let go (they may begin a value)."""
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        """What of ``self._held + data`` can be let go now, masked."""
        if self._pattern is None:
            return data
        data = self._held + data if self._held else data
        if not any(v in data for v in self.values):     # the common case: a plain search, no regex
            cut = self._open_end(data, 0)
            self._held = data[cut:]
            return data[:cut]
        out = []
        pos = 0
        while True:
            cut = self._open_end(data, pos)
            found = self._pattern.search(data, pos, len(data))
            if found is None or found.start() >= cut:
                out.append(data[pos:cut])
                self._held = data[cut:]
                return b"".join(out)
            out.append(data[pos:found.start()])
            out.append(self.mask)
            pos = found.end()

    def flush(self) -> bytes:
        """Let go of what is held (the stream ended, or paused for good)."""
        held, self._held = self._held, b""
        return held

    def _open_end(self, data: bytes, pos: int) -> int:
        """The first index i >= pos where data[i:] is the beginning of a value
        but not a whole one (more data could complete it); len(data) if none."""
        end = len(data)
        for i in range(max(pos, end - self._longest + 1), end):
            if data[i] in self._starts:
                rest = data[i:]
                if any(len(v) > len(rest) and v.startswith(rest) for v in self.values):
                    return i
        return end


def hide(data: bytes, values: Iterable[str | bytes]) -> bytes:
    """``data`` with every byte of every value in it replaced by ``*``: the same length."""
    if not values or not any((v.encode("utf-8") if isinstance(v, str) else v) in data for v in values if v):
        return data
    ordered = _values(values)
    return _pattern(ordered).sub(lambda m: b"*" * len(m.group()), data)
