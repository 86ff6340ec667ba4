"""The dispatcher's fan-out to the tools that follow it.

A ``watch`` stream gets every event (``{"type": "event", "event": "build" |
"runner", ...}``) through a queue of its own; a watcher that falls
``BACKLOG`` events behind is dropped (its queue ends with None, and the
stream with ``end`` "watcher too slow"), never waited for. ``read_log
--follow`` readers wait on ``changed``, an event set and replaced on every
change, so one wake-up reaches every reader at once.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator

BACKLOG = 10_000


class Watchers:
    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()
        self.changed = asyncio.Event()

    @property
    def active(self) -> bool:
        """True while some stream watches: only then are events worth making."""
        return bool(self.queues)

    def touch(self) -> None:
        """Something changed (a log grew, a state moved): wake every reader waiting on ``changed``."""
        self.changed.set()
        self.changed = asyncio.Event()

    def event(self, kind: str, **data) -> None:
        for queue in list(self.queues):
            if queue.full():               # a watcher that cannot keep up is dropped, not waited for
                self.queues.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
            else:
                queue.put_nowait({"type": "event", "event": kind, **data})

    @contextmanager
    def watching(self) -> Iterator[asyncio.Queue]:
        """A queue of every event from now until the block ends; None in it means dropped."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=BACKLOG)
        self.queues.add(queue)
        try:
            yield queue
        finally:
            self.queues.discard(queue)
