"""Group commit: writes that arrive in one turn of the event loop share one
SQLite transaction, at the start of the next turn.

A COMMIT is the dearest part of a runner's result (the write lock taken and
given back, the WAL frames written): at hundreds of results a second it cost
more than anything else the dispatcher does for one. A request that writes
through ``GroupCommit.submit`` gives two steps: ``write`` runs with the
others of its turn in one transaction, and ``after`` (the change in memory,
the log lines, what is sent) runs only once that transaction committed; then
its reply goes out. So the rule stays "written before anyone is told", and a
write that fails changes nothing: its request gets the error and its sender
retries.

``write`` runs at the commit, not when the request came: it checks again
whatever may have changed in between (a lease taken back, a cancel) and
returns a refusal instead of writing. Each runs in a savepoint of its own,
so one that raises (a bug, or SQLite refusing that row) is undone alone and
the others still commit; should SQLite have rolled the whole transaction
back itself (the disk full), the turn fails with that error. The COMMIT
itself failing (the disk full, the database locked by another process) fails
every request of the turn, none of which has changed anything in memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .store import Store


@dataclass
class _Entry:
    write: Callable[[], Any]
    after: Callable[[], Any]
    future: asyncio.Future


class GroupCommit:
    def __init__(self, store: Store):
        self.store = store
        self._turn: dict[Hashable, _Entry] = {}
        self.commits = 0            # transactions, and the writes they carried: what grouping saves
        self.writes = 0

    def pending(self, key: Hashable) -> asyncio.Future | None:
        """The reply to come for ``key``'s write, while it waits for its commit."""
        entry = self._turn.get(key)
        return None if entry is None or entry.future.done() else entry.future

    def submit(self, key: Hashable, write: Callable[[], Any], after: Callable[[], Any]) -> asyncio.Future:
        """Run ``write`` in the next turn's transaction; the future gets what
        ``write`` returned when not None (a refusal: nothing written, ``after``
        not run), else what ``after`` returns once committed; or the exception
        either raised. One write per ``key`` a turn (see ``pending``)."""
        if self.pending(key) is not None:
            raise ValueError(f"a write for {key!r} waits already")
        loop = asyncio.get_running_loop()
        if not self._turn:
            loop.call_soon(self._commit)
        future = loop.create_future()
        self._turn[key] = _Entry(write, after, future)
        return future

    def _commit(self) -> None:
        turn, self._turn = list(self._turn.values()), {}
        # a request cancelled meanwhile (the daemon stopping): its write never happens
        turn = [entry for entry in turn if not entry.future.done()]
        if not turn:
            return
        db = self.store.db
        written: list[tuple[_Entry, Any]] = []
        try:
            with self.store.transaction():
                for entry in turn:
                    db.execute("SAVEPOINT one")
                    try:
                        refusal = entry.write()
                    except Exception as exc:
                        if not db.in_transaction:
                            # SQLite rolled the whole transaction back itself (the disk full, I/O):
                            # the turn fails with this error, not with the savepoint it took along
                            raise
                        db.execute("ROLLBACK TO one")
                        db.execute("RELEASE one")
                        entry.future.set_exception(exc)
                        continue
                    if refusal is not None:
                        db.execute("ROLLBACK TO one")       # a refusal leaves nothing written
                    db.execute("RELEASE one")
                    written.append((entry, refusal))
        except Exception as exc:
            for entry in turn:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        self.commits += 1
        self.writes += sum(refusal is None for _, refusal in written)
        for entry, refusal in written:
            # every committed write's after runs, whatever an earlier one did to the futures
            try:
                reply = refusal if refusal is not None else entry.after()
            except Exception as exc:
                if not entry.future.done():
                    entry.future.set_exception(exc)
                continue
            if not entry.future.done():
                entry.future.set_result(reply)
