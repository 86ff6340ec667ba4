"""Build logs on the dispatcher's disk, ``<data_dir>/logs/<build>.log``, in
one place: the runner's ``log`` frames (the offset rule), each attempt's byte
count, the size cap, the dispatcher's own lines, and reads for ``read_log``.
File names are made only from build numbers, never from strings a peer sent.

The offset rule: a runner counts only its own bytes of the current attempt.
A frame starting past what the attempt has is refused with the size
expected (``LogGap``); bytes already held are skipped, so a resent frame
never doubles a line.

The cap (``dispatcher.max_log_bytes``, ``LogCap``): past it, a build log keeps
its head and its tail and says how much was cut in between. Files beside the
log: ``<build>.tail`` holds the newest output while the log is over the cap
(trimmed to half the cap whenever it reaches the whole cap), ``<build>.cut``
the number of bytes dropped so far. When the dispatcher next writes a line of
its own (the attempt ended, was taken back or cancelled), the tail is joined
to the log after a line saying what was cut. Everything is on disk, so a
restarted dispatcher carries on, and the byte count of the attempt (what the
runner's offsets are checked against) stays exact: head + tail + cut.

Arrival times: each append notes "offset time" in memory (``stamps``), so
``tinyci log --timestamps`` can say when each line reached the dispatcher
(``times``). The dispatcher moves them into the database a few seconds
later, many builds in one transaction, a row per build appended to the
``log_times`` table (``save_times``; ``Store.add_log_times``): a second file
per build cost as much as the log file itself, on every hand-out. A save
that fails is tried again at the next; a crash loses at most those few
seconds of times, never a log byte.
Data dirs from before keep their ``<build>.times`` files, still read.
Build secrets (``secrets``: a build's values, by build): the runner masks
them before it sends; as a second line of defence each frame is masked
again here before it is stored, keeping its length (``masking.hide``: each
byte of a value becomes ``*``) so the runner's offsets stay true. A value
split across two frames is the runner's to catch.
A log file removed or cut short under the dispatcher (by hand, to make room)
is noticed (``check``): a line says so where the log goes on, and the
attempt's base moves so that its count, and the runner's offsets, stay what
they were; nothing waits for bytes that are gone. A line of the dispatcher's
own that cannot be written (the disk is full) is reported to ``on_error``
and skipped: the state change it goes with must not fail for it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from . import aio, files
from .masking import hide
from .models import Build
from .text import utf8_boundary

log = logging.getLogger(__name__)

TIMES_EVERY = 2.0       # seconds between moves of the arrival times into the database


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class LogCap:
    """The cap's files for each build (see the module docstring)."""

    def __init__(self, logs: Path, limit: int):
        self.logs = logs
        self.limit = limit
        self.keep = max(1, limit // 2)
        self._prefix = os.path.join(logs, "")

    def has_tail(self, build_id: int) -> bool:
        """The log is over its cap, its newest bytes held beside it (asked at
        every line of the dispatcher's: of a string path, which costs less than a Path)."""
        return os.path.exists(f"{self._prefix}{int(build_id)}.tail")

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
        # never below 0: a log cut short under us is behind the attempt's base
        return max(0, _size(main) - base + _size(tail) + self._cut(cut))

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
        if not self.has_tail(build_id):
            return
        main, tail, cut = self._paths(build_id)
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


class LogGap(Exception):
    """A ``log`` frame starts past the bytes the attempt has: ``expected`` is where it must start."""

    def __init__(self, expected: int):
        super().__init__(f"expected offset {expected}")
        self.expected = expected


class BuildLogs:
    def __init__(self, directory: Path, limit: int, clock: Callable[[], float] = time.time,
                 on_error: Callable[[int, OSError], None] | None = None,
                 secrets: Callable[[Build], Iterable[str]] | None = None):
        """``on_error(build, exc)``: a line of the dispatcher's own could not be written.
        ``secrets(build)``: the values of the build secrets ``build`` was given."""
        self.clock = clock
        self.secrets = secrets
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cap = LogCap(self.dir, limit)
        self.on_error = on_error or _log_error
        self._prefix = os.path.join(self.dir, "")
        # bytes the current attempt of a running build has logged (LogCap.size), kept
        # so each `log` frame and `result` need not stat the files; dropped whenever
        # the dispatcher writes a line of its own, and rebuilt from disk when missing
        self.sizes: dict[int, int] = {}
        # arrival times not yet in the database, by build: (offset, time) per append;
        # a lock, because the hand-out writes its first lines in a thread
        self.stamps: dict[int, list[tuple[int, float]]] = {}
        self._stamps_lock = threading.Lock()

    def path(self, build_id: int) -> Path:
        return self.dir / f"{int(build_id)}.log"

    def size(self, build_id: int) -> int:
        """The log file's size."""
        return _size(self.path(build_id))

    def read(self, build_id: int, offset: int, limit: int, whole: bool = True) -> bytes:
        """Up to ``limit`` bytes from ``offset``; with ``whole``, never the first
        part of a character whose rest may still come."""
        try:
            with open(self.path(build_id), "rb") as f:
                if offset >= os.fstat(f.fileno()).st_size:
                    return b""          # and no seek: past 2**62 that is an OSError
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            return b""
        return data[:utf8_boundary(data)] if whole else data

    # ------------------------------------------------------------ the runner's bytes

    def attempt_size(self, build: Build) -> int:
        """Bytes the current attempt of ``build`` has sent."""
        have = self.sizes.get(build.id)
        if have is None:
            have = self.sizes[build.id] = self.cap.size(build.id, build.log_base)
        return have

    def append(self, build: Build, offset: int, data: bytes) -> tuple[int, bool]:
        """The runner's ``data`` at ``offset`` of the current attempt: (the
        attempt's size after, whether anything new was written). Raises
        LogGap when ``offset`` is past what the attempt has."""
        have = self.attempt_size(build)
        if offset > have:
            raise LogGap(have)
        skip = have - offset
        if skip >= len(data):
            return have, False
        self.sizes.pop(build.id, None)         # not kept if the append fails half way
        if build.secrets and self.secrets is not None:
            data = hide(data, self.secrets(build))
        self._stamp(build.id, self.size(build.id))
        try:
            have = self.cap.append(build.id, data[skip:], build.log_base)
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)     # the whole logs directory was removed
            have = self.cap.append(build.id, data[skip:], build.log_base)
        self.sizes[build.id] = have
        return have, True

    def check(self, build: Build) -> str | None:
        """Notice that the log file of ``build`` was removed or cut short since
        its current attempt last wrote to it. Then a line says so, the
        attempt's base moves past it so its count stays what it was, and the
        line is returned (the caller saves the build's new base); else None."""
        have = self.sizes.get(build.id)
        if have is None:                        # nothing to compare with
            return None
        expected = build.log_base + have
        try:
            # one stat on every frame (of a string path: a Path costs more than the stat)
            actual = os.stat(f"{self._prefix}{int(build.id)}.log").st_size
        except FileNotFoundError:
            actual = None
        if actual is not None and actual >= expected or self.cap.has_tail(build.id):
            return None                         # as it should be; or over the cap: it grows in the tail
        if actual is None:
            text = "[log file was removed; continuing]"
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            text = f"[log file was cut short by {expected - actual} bytes; continuing]"
        self.line(build.id, text, build)
        return text

    def begin(self, build: Build, size: int) -> None:
        """The build's new attempt starts where its log is ``size`` bytes long."""
        build.log_base = size
        self.sizes[build.id] = 0

    # ------------------------------------------------------------ the dispatcher's lines

    def line(self, build_id: int, text: str, sending: Build | None = None) -> int:
        """Append a line of the dispatcher's own, on a line of its own (after the
        tail of an attempt's log that went over the cap); returns the log's size.

        ``sending``: the build, when its current attempt may still send log
        frames (a cancel, whose runner has not stopped yet). The runner's
        offsets count only its own bytes, so the attempt's base moves past
        this line and its count stays what it was."""
        before = self.attempt_size(sending) if sending is not None else None
        self._close(build_id)
        self.sizes.pop(build_id, None)
        size = self._append_line(build_id, text)
        if sending is not None:
            sending.log_base = size - before
            self.sizes[build_id] = before
        return size

    def first_lines(self, lines: list[tuple[int, str]]) -> dict[int, int]:
        """Each build's line, as ``line`` writes it for a build that is not
        sending; the log's size after it, by build. Safe in a thread (a
        hand-out's dearest step is creating the log files): it touches files
        only, never the kept sizes."""
        sizes = {}
        for build_id, text in lines:
            self._close(build_id)
            sizes[build_id] = self._append_line(build_id, text)
        return sizes

    def _close(self, build_id: int) -> None:
        try:
            self.cap.close(build_id)
        except OSError as exc:          # the tail stays beside the log, joined at the next line
            self.on_error(build_id, exc)

    def _append_line(self, build_id: int, text: str) -> int:
        """``text`` as a line of its own (after a newline if the log does not
        end with one) with a single open; returns the log's new size (what it
        is, when the line could not be written)."""
        try:
            # plain descriptors: a file object's buffers cost more than the four calls
            fd = os.open(f"{self._prefix}{int(build_id)}.log", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    text = "\n" + text
                files.write_all(fd, (text + "\n").encode())
                end = os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not self.dir.exists():
                self.dir.mkdir(parents=True, exist_ok=True)     # the logs directory was removed
                return self._append_line(build_id, text)
            self.on_error(build_id, exc)
            return _size(self.path(build_id))
        self._stamp(build_id, size)
        return end

    # ------------------------------------------------------------ arrival times

    def _stamp(self, build_id: int, offset: int) -> None:
        """Note that the bytes appended at ``offset`` arrived now. While a log is
        over its cap, its tail's bytes carry the offset where the cut will be."""
        when = round(self.clock(), 3)      # as the database keeps it: the same answer before and after
        with self._stamps_lock:
            self.stamps.setdefault(build_id, []).append((offset, when))

    async def keep_times(self, save: Callable[[dict[int, str]], None], stop: asyncio.Event) -> None:
        """Every TIMES_EVERY seconds until ``stop``, the times taken (``take_stamps``) go to ``save``."""
        while not stop.is_set():
            try:
                await aio.within(stop.wait(), TIMES_EVERY)
            except asyncio.TimeoutError:
                self.save_times(save)

    def save_times(self, save: Callable[[dict[int, str]], None]) -> None:
        """Hand the times held to ``save`` (as ``take_stamps`` gives them); should it
        fail, they are held again, before any noted meanwhile, for the next try."""
        with self._stamps_lock:
            taken, self.stamps = self.stamps, {}
        if not taken:
            return
        try:
            save(_as_text(taken))
        except sqlite3.Error as exc:        # a convenience: a line, and tried again at the next save
            log.warning("the arrival times of %d build log(s) were not saved yet: %s", len(taken), exc)
            with self._stamps_lock:
                for build_id, pairs in taken.items():
                    self.stamps[build_id] = pairs + self.stamps.get(build_id, [])

    def take_stamps(self) -> dict[int, str]:
        """The arrival times noted since the last call, as the text the database
        keeps ("offset time" lines), by build; they are no longer held here."""
        with self._stamps_lock:
            taken, self.stamps = self.stamps, {}
        return _as_text(taken)

    def held_times(self, build_id: int) -> list[tuple[int, float]]:
        """The build's arrival times not yet in the database."""
        with self._stamps_lock:
            return list(self.stamps.get(build_id, ()))

    def times(self, build_id: int, start: int, end: int, stored: str = "",
              held: list[tuple[int, float]] | None = None) -> list[list]:
        """[offset, time] for the bytes ``start``..``end`` of the log: the append that
        ``start`` falls in (its offset moved to ``start``), then each one after it.
        ``stored``: the build's times from the database, ``held``: those not yet
        there (``held_times``, read here when None); an older data dir's
        ``<build>.times`` is read too."""
        try:
            legacy = (self.dir / f"{int(build_id)}.times").read_text()
        except (OSError, UnicodeDecodeError):
            legacy = ""
        if held is None:
            held = self.held_times(build_id)
        pairs: list[tuple[int, float]] = []
        for line in (legacy + stored).split("\n"):
            try:
                offset_text, when_text = line.split()
                pairs.append((int(offset_text), float(when_text)))
            except ValueError:
                continue
        found: list[list] = []
        for offset, when in pairs + held:
            if offset >= end:
                break
            if offset <= start:
                found = [[start, when]]
            elif not found or offset > found[-1][0]:
                found.append([offset, when])
        return found


def _as_text(stamps: dict[int, list[tuple[int, float]]]) -> dict[int, str]:
    return {build_id: "".join(f"{offset} {when:.3f}\n" for offset, when in pairs) for build_id, pairs in stamps.items()}


def _log_error(build_id: int, exc: OSError) -> None:
    log.warning("build %d: a line of the dispatcher's could not be written to its log: %s", build_id, exc)
