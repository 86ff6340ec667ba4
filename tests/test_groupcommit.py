"""GroupCommit over a real SQLite store: the writes of one turn of the loop
are one transaction; one that raises is undone alone; a refusal writes
nothing; a failed COMMIT fails every write of its turn."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from ci.groupcommit import GroupCommit
from ci.models import Status
from ci.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    with s.transaction():
        for i in range(3):
            s.add_build(repo="/r", branch="main", sha=f"{i}" * 40, now=1.0)
    yield s
    s.close()


def ended(store: Store, build_id: int):
    def write():
        build = store.get(build_id)
        build.status = Status.PASSED
        store.save([build])
    return write


def test_one_turn_is_one_transaction_and_a_write_that_raises_is_undone_alone(store):
    group = GroupCommit(store)
    after: list[int] = []

    def broken():
        ended(store, 2)()       # written, then undone with its savepoint
        raise ValueError("a bug in this one")

    async def main():
        futures = [group.submit(1, ended(store, 1), lambda: after.append(1) or "one"),
                   group.submit(2, broken, lambda: after.append(2)),
                   group.submit(3, ended(store, 3), lambda: after.append(3) or "three")]
        assert group.pending(2) is futures[1]
        return await asyncio.gather(*futures, return_exceptions=True)

    one, two, three = asyncio.run(main())
    assert (one, three, after) == ("one", "three", [1, 3])
    assert isinstance(two, ValueError)
    assert [store.get(i).status for i in (1, 2, 3)] == [Status.PASSED, Status.QUEUED, Status.PASSED]
    assert (group.commits, group.writes) == (1, 2)


def test_a_refusal_writes_nothing_and_skips_its_after(store):
    group = GroupCommit(store)

    async def main():
        return await asyncio.gather(group.submit(1, lambda: "refused", lambda: pytest.fail("after ran")),
                                    group.submit(2, ended(store, 2), lambda: "ok"))

    assert asyncio.run(main()) == ["refused", "ok"]
    assert [store.get(i).status for i in (1, 2)] == [Status.QUEUED, Status.PASSED]


def test_a_turn_the_database_is_locked_for_fails_whole_and_runs_no_after(store):
    group = GroupCommit(store)
    store.db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(store.path)
    other.execute("BEGIN IMMEDIATE")

    async def main():
        return await asyncio.gather(*(group.submit(i, ended(store, i), lambda: pytest.fail("after ran"))
                                      for i in (1, 2)), return_exceptions=True)

    try:
        failed = asyncio.run(main())
    finally:
        other.rollback()
        other.close()
    assert all(isinstance(f, sqlite3.OperationalError) and "locked" in str(f) for f in failed)
    assert [store.get(i).status for i in (1, 2)] == [Status.QUEUED, Status.QUEUED]
    assert not store.db.in_transaction


def test_a_write_whose_request_was_cancelled_never_happens_and_a_key_waits_once(store):
    group = GroupCommit(store)

    async def main():
        gone = group.submit(1, ended(store, 1), lambda: None)
        with pytest.raises(ValueError):
            group.submit(1, ended(store, 1), lambda: None)
        gone.cancel()           # its handler cancelled before the commit (the daemon stopping)
        return await group.submit(2, ended(store, 2), lambda: "ok")

    assert asyncio.run(main()) == "ok"
    assert [store.get(i).status for i in (1, 2)] == [Status.QUEUED, Status.PASSED]


def test_a_commit_that_fails_after_the_writes_fails_the_whole_turn_and_runs_no_after(store):
    """The writes all went in, then COMMIT itself refused (a deferred constraint
    here; a full disk alike): every write of the turn fails with that error, none
    is kept, and no ``after`` runs."""
    store.db.executescript("CREATE TABLE parent (id INTEGER PRIMARY KEY); "
                           "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);")
    store.db.execute("PRAGMA foreign_keys=ON")
    group = GroupCommit(store)

    def orphan():
        ended(store, 2)()
        store.db.execute("INSERT INTO child VALUES (7)")    # no parent 7: refused only at COMMIT

    async def main():
        return await asyncio.gather(group.submit(1, ended(store, 1), lambda: pytest.fail("after ran")),
                                    group.submit(2, orphan, lambda: pytest.fail("after ran")),
                                    return_exceptions=True)

    failed = asyncio.run(main())
    assert all(isinstance(f, sqlite3.IntegrityError) for f in failed), failed
    assert [store.get(i).status for i in (1, 2)] == [Status.QUEUED, Status.QUEUED]
    assert not store.db.in_transaction and group.commits == 0


def test_a_full_database_in_the_middle_of_a_turn_fails_it_with_the_full_disk_error(store):
    """SQLite rolls the whole transaction back itself when the database cannot
    grow: the turn fails with that error (which the dispatcher answers
    ``disk_full``), not with the savepoint the rollback took along."""
    group = GroupCommit(store)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")

    def big():
        store.db.executemany("INSERT INTO builds (repo, branch, sha, status, created_at, labels) "
                             "VALUES ('/r', 'main', ?, 'queued', 1.0, ?)",
                             [(f"{i:040x}", "x" * 2000) for i in range(100, 400)])

    async def main():
        return await asyncio.gather(group.submit(1, ended(store, 1), lambda: pytest.fail("after ran")),
                                    group.submit(2, big, lambda: pytest.fail("after ran")),
                                    group.submit(3, ended(store, 3), lambda: pytest.fail("after ran")),
                                    return_exceptions=True)

    failed = asyncio.run(main())
    assert all(isinstance(f, sqlite3.OperationalError) and "full" in str(f) for f in failed), failed
    store.db.execute("PRAGMA max_page_count=1073741823")
    assert [store.get(i).status for i in (1, 3)] == [Status.QUEUED, Status.QUEUED]
    assert not store.db.in_transaction
