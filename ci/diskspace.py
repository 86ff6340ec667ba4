"""The dispatcher's free-space reserve (``dispatcher.min_free_bytes``): build
logs and artifacts may fill its disk only down to the reserve, which is kept
for what must not fail, the database (a commit accepted, a result recorded)
and the dispatcher's own lines in logs.

Checked cheaply: ``statvfs`` at most once a second, and in between the bytes
written since are taken off the last figure; a write the estimate says would
not fit looks again first (at most every POLL seconds), so space freed by
hand is found at once. Once a write is refused, the disk counts as full
(condition ``disk_full``) until the free space is ``margin`` above the
reserve again, so that writes do not flap around the line; ``watch`` looks
once a second meanwhile, so the condition clears (and says so) by itself.

``refusal`` turns an error that means the disk is full (SQLite's "database
or disk is full", ENOSPC, EDQUOT) into the ``disk_full`` reply its sender
retries. ``LogCuts`` are the attempts whose log was cut for a full disk: their
result is taken without the rest of the log, with a note where it stops.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
from typing import Callable

from . import protocol
from .conditions import Conditions
from .store import is_disk_full
from .text import utf8_boundary

DISK_FULL = "disk_full"
EVERY = 1.0             # seconds a statvfs figure is trusted
POLL = 0.1              # seconds between looks while writes are refused
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})     # the disk, or the user's quota on it, is full


class DiskSpace:
    def __init__(self, path: os.PathLike | str, reserve: int, conditions: Conditions, *,
                 clock: Callable[[], float] = time.monotonic,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs):
        self.path = str(path)
        self.reserve = reserve
        self.margin = max(64 * 1024, min(reserve // 4, 4 << 20))
        self.conditions = conditions
        self.clock, self.statvfs = clock, statvfs
        self.free: int | None = None            # as of the last look, less what was written since
        self.looked = float("-inf")

    @property
    def full(self) -> bool:
        return DISK_FULL in self.conditions

    def look(self) -> int:
        """Free bytes now (statvfs); clears ``disk_full`` when there is room again."""
        try:
            stat = self.statvfs(self.path)
            self.free = stat.f_bavail * stat.f_frsize
        except OSError:
            self.free = self.free or 0          # the directory went away: the writes will say why
        self.looked = self.clock()
        if self.full and self.free >= self.reserve + self.margin:
            self.conditions.clear(DISK_FULL, f"the dispatcher's disk has room again ({megabytes(self.free)} "
                                             f"free in {self.path})")
        return self.free

    def room(self, size: int) -> bool:
        """Whether ``size`` more bytes of logs or artifacts fit above the
        reserve; counts them as written when they do, reports ``disk_full``
        when they do not."""
        now = self.clock()
        if self.free is None or now - self.looked >= EVERY or \
                (self._short(size) and now - self.looked >= POLL):
            self.look()
        if self._short(size):
            self.exhausted()
            return False
        self.free -= size
        return True

    def fitting(self, data: bytes) -> bytes:
        """The part of a piece of a log that fits above the reserve (all of it,
        or what fits, ending at a character, with ``disk_full`` reported, as
        ``room`` refuses), counted as written: a log is stored up to the
        reserve however big its frames are, and its rest refused after."""
        floor = self.reserve + (self.margin if self.full else 0)    # before room() may report the condition
        if self.room(len(data)):
            return data
        part = data[:utf8_boundary(data[:max(0, (self.free or 0) - floor)])]
        self.free = (self.free or 0) - len(part)
        return part

    def _short(self, size: int) -> bool:
        floor = self.reserve + (self.margin if self.full else 0)
        return self.free - size < floor

    def exhausted(self, why: str = "") -> None:
        """Report ``disk_full``: a write was refused at the reserve, or the disk
        itself said it is full (``why``: the error, e.g. SQLite's)."""
        free = self.look() if why or self.free is None else self.free
        if why:
            # whatever statvfs said, writes fail: no room is offered until the next look
            self.free, self.looked = min(free, self.reserve), self.clock()
        self.conditions.report(
            DISK_FULL, f"disk full ({megabytes(free)} free)",
            f"{why or 'the reserve is reached'} in {self.path} (dispatcher.min_free_bytes "
            f"{megabytes(self.reserve)}): build logs and artifacts are refused until there is room")

    def refusal(self, exc: BaseException) -> dict | None:
        """The ``disk_full`` reply for an error that means the disk is full, once
        it is reported (one line, never a traceback); None for any other error."""
        if isinstance(exc, sqlite3.OperationalError) and is_disk_full(exc):
            why = f"the database could not be written ({exc})"
        elif isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            why = f"{exc.strerror} ({exc.filename or 'a file'})"
        else:
            return None
        self.exhausted(why)
        return protocol.error(DISK_FULL, f"the dispatcher's disk is full ({why}); try again later")

    def lost_line(self, build_id: int, exc: OSError) -> None:
        """A line of the dispatcher's own could not go into a build's log."""
        if exc.errno in FULL_ERRNOS:
            self.exhausted(f"a line of build {build_id}'s log could not be written ({exc.strerror})")
        else:
            self.conditions.report("log_write", f"cannot write build logs ({exc.strerror})",
                                   f"build {build_id}: {exc}")

    async def watch(self, stop: asyncio.Event) -> None:
        """While the disk is full, look once a second, so that the condition
        clears once there is room, whether or not anything is written."""
        while not stop.is_set():
            if self.full:
                self.look()
            try:
                await asyncio.wait_for(stop.wait(), EVERY)
            except asyncio.TimeoutError:
                pass

    def message(self) -> str:
        """The refusal sent to a runner."""
        return (f"the dispatcher's disk is full ({megabytes(self.free or 0)} free, dispatcher.min_free_bytes "
                f"{megabytes(self.reserve)})")


def megabytes(size: int) -> str:
    mb = size / 1e6
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


class LogCuts:
    """The attempts whose log the dispatcher stopped taking for a full disk:
    their runner sends the result without the rest of the log, which is
    taken, with a note where the log stops."""

    def __init__(self):
        self._cut: dict[int, int] = {}      # build -> its attempt whose log was cut

    def cut(self, build_id: int, attempt: int) -> bool:
        """Mark the attempt's log cut; True the first time."""
        first = self._cut.get(build_id) != attempt
        self._cut[build_id] = attempt
        return first

    def is_cut(self, build_id: int, attempt: int) -> bool:
        return self._cut.get(build_id) == attempt

    def note(self, build_id: int, attempt: int, missing: int) -> str | None:
        """The line that ends a cut log, once its result comes (``missing``:
        the bytes the runner had that were not stored); None for a log not cut."""
        if self._cut.get(build_id) != attempt:
            return None
        del self._cut[build_id]
        if missing <= 0:
            return None
        return f"[log cut: the dispatcher's disk is full] ({missing} bytes of output were not stored)"
