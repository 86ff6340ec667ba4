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


def test_a_commit_that_fails_fails_the_whole_turn_and_runs_no_after(store):
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


def test_a_write_whose_request_went_away_never_happens_and_a_key_waits_once(store):
    group = GroupCommit(store)

    async def main():
        gone = group.submit(1, ended(store, 1), lambda: None)
        with pytest.raises(ValueError):
            group.submit(1, ended(store, 1), lambda: None)
        gone.cancel()           # its connection closed before the commit
        return await group.submit(2, ended(store, 2), lambda: "ok")

    assert asyncio.run(main()) == "ok"
    assert [store.get(i).status for i in (1, 2)] == [Status.QUEUED, Status.PASSED]
