"""Named conditions a daemon is in: an expected trouble that lasts (its disk
is full, a peer is gone, a file is missing), as opposed to a bug.

A condition is logged as one line that names it when it begins, then at
most once a minute while it lasts (saying how often it recurred), and once
when it clears: never a traceback, and never a line per request while a
disk stays full. ``active()`` lists those in force for a status reply
(``{name, message, since}``; ``message`` is short, for a status line such
as ``dispatcher: disk full (12 MB free)``), and ``on_change`` is called when
the list changes (a condition begins or clears, or its message changes), so
watchers can be told.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

REPEAT = 60.0           # seconds between lines about a condition that lasts


@dataclass
class Condition:
    name: str
    message: str        # short: what a status line shows
    since: float        # wall clock, for people
    began: float        # monotonic, for durations and pacing
    logged: float       # monotonic: when its last line was written
    recurred: int = 0   # reports since that line


class Conditions:
    def __init__(self, logger: logging.Logger, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, every: float = REPEAT,
                 on_change: Callable[[], None] | None = None):
        self.log = logger
        self.clock, self.wall, self.every = clock, wall, every
        self.on_change = on_change
        self._active: dict[str, Condition] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._active

    def report(self, name: str, message: str, detail: str = "", level: int = logging.WARNING) -> None:
        """The condition ``name`` holds (again): ``message`` says it in a few
        words, ``detail`` adds what it means and what to do, for the log."""
        now = self.clock()
        line = f"{message}: {detail}" if detail else message
        held = self._active.get(name)
        if held is None:
            self._active[name] = Condition(name, message, self.wall(), now, now)
            self.log.log(level, "%s [%s]", line, name)
            self._changed()
            return
        held.recurred += 1
        if held.message != message:
            held.message = message
            self._changed()
        if now - held.logged >= self.every:
            self.log.log(level, "still %s [%s, %d time(s) in the last %s, for %s]", line, name, held.recurred,
                         _span(now - held.logged), _span(now - held.began))
            held.logged, held.recurred = now, 0

    def clear(self, name: str, message: str = "") -> None:
        """The condition no longer holds: one line saying so (nothing when it did not hold)."""
        held = self._active.pop(name, None)
        if held is None:
            return
        self.log.info("%s [%s cleared after %s]", message or f"no longer: {held.message}", name,
                      _span(self.clock() - held.began))
        self._changed()

    def active(self) -> list[dict]:
        """Those in force, oldest first."""
        return [{"name": c.name, "message": c.message, "since": c.since}
                for c in sorted(self._active.values(), key=lambda c: c.began)]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
