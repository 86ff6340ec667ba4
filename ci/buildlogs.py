"""The per-build log size cap (``dispatcher.max_log_bytes``): past it, a build
log keeps its head and its tail and says how much was cut in between.

Files beside ``logs/<build>.log``: ``<build>.tail`` holds the newest output
while the log is over the cap (trimmed to half the cap whenever it reaches
the whole cap), ``<build>.cut`` the number of bytes dropped so far. When the
dispatcher next writes a line of its own (the attempt ended, was taken back
or cancelled), ``close`` joins the tail to the log after a line saying what
was cut. Everything is on disk, so a restarted dispatcher carries on, and the
byte count of the attempt (what the runner's offsets are checked against)
stays exact: head + tail + cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from .text import utf8_boundary


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class LogCap:
    def __init__(self, logs: Path, limit: int):
        self.logs = logs
        self.limit = limit
        self.keep = max(1, limit // 2)

    def _paths(self, build_id: int) -> tuple[Path, Path, Path]:
        stem = self.logs / str(int(build_id))
        return stem.with_suffix(".log"), stem.with_suffix(".tail"), stem.with_suffix(".cut")

    def _cut(self, path: Path) -> int:
        try:
            return int(path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def size(self, build_id: int, base: int) -> int:
        """Bytes the current attempt (which began at ``base`` in the log) has sent."""
        main, tail, cut = self._paths(build_id)
        return _size(main) - base + _size(tail) + self._cut(cut)

    def append(self, build_id: int, data: bytes, base: int) -> int:
        """Add the attempt's output; returns ``size`` afterwards."""
        main, tail, cut = self._paths(build_id)
        if not tail.exists():
            have = _size(main)
            if have + len(data) <= self.limit:
                with open(main, "ab") as f:
                    f.write(data)
                return have + len(data) - base
            # over the cap: keep the head (never what earlier attempts left), move the rest to the tail
            head = max(self.keep, base)
            moved = b""
            if have < head:
                fill = utf8_boundary(data[:head - have])
                with open(main, "ab") as f:
                    f.write(data[:fill])
                data = data[fill:]
            elif have > head:
                with open(main, "r+b") as f:
                    f.seek(max(0, head - 4))
                    edge = f.read(head - max(0, head - 4))
                    head = max(0, head - 4) + utf8_boundary(edge)
                    f.seek(head)
                    moved = f.read()
                    f.truncate(head)
            with open(tail, "wb") as f:
                f.write(moved)
        with open(tail, "ab") as f:
            f.write(data)
            held = f.tell()
        if held > self.limit:
            with open(tail, "rb") as f:
                f.seek(held - self.keep)
                newest = f.read()
            dropped = self._cut(cut) + held - len(newest)
            tmp = tail.with_suffix(".tail-new")
            tmp.write_bytes(newest)
            cut.write_text(str(dropped))
            os.replace(tmp, tail)
        return self.size(build_id, base)

    def close(self, build_id: int) -> None:
        """Join a held tail to the log, after a line saying how much was cut."""
        main, tail, cut = self._paths(build_id)
        if not tail.exists():
            return
        data = tail.read_bytes()
        dropped = self._cut(cut) + max(0, len(data) - self.keep)
        data = data[-self.keep:]
        # start the tail at a character, and if one is near, a line
        start = 0
        while start < len(data) and data[start] & 0xC0 == 0x80:
            start += 1
        newline = data.find(b"\n", start, start + 1024)
        if newline >= 0:
            start = newline + 1
        dropped += start
        marker = (f"\n[... {dropped} bytes cut here: the log went over its limit of {self.limit} bytes "
                  f"(dispatcher.max_log_bytes); its head and tail are kept ...]\n").encode()
        with open(main, "ab") as f:
            f.write(marker + data[start:])
        tail.unlink()
        cut.unlink(missing_ok=True)
