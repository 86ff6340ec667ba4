"""The dispatcher's free-space reserve (``dispatcher.min_free_bytes``): build
logs and artifacts may fill its disk only down to the reserve, which is kept
for what must not fail, the database (a commit accepted, a result recorded)
and the dispatcher's own lines in logs.

Checked cheaply: ``statvfs`` at most once a second, and in between the bytes
written since are taken off the last figure; a write the estimate says would
not fit looks again first (at most every POLL seconds), so space freed by
hand is found at once. Once a write is refused, the disk counts as full
(condition ``disk_full``) until the free space is ``margin`` above the
reserve again, so that writes do not flap around the line.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .conditions import Conditions

DISK_FULL = "disk_full"
EVERY = 1.0             # seconds a statvfs figure is trusted
POLL = 0.1              # seconds between looks while writes are refused


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

    def message(self) -> str:
        """The refusal sent to a runner."""
        return (f"the dispatcher's disk is full ({megabytes(self.free or 0)} free, dispatcher.min_free_bytes "
                f"{megabytes(self.reserve)})")


def megabytes(size: int) -> str:
    mb = size / 1e6
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"
