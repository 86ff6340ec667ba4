"""A runner's working clones over months (ci/clones.py): a clone no build used
for runner.clone_days is deleted, a recent or busy one is kept; and a real
runner does it when it starts."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from ci import clones

from runner_support import FakeDispatcher, wait_until

DAY = 86400.0


def clone(checkouts: Path, slot: int, days_ago: float | None) -> Path:
    path = checkouts / str(slot)
    (path / ".git").mkdir(parents=True)
    if days_ago is not None:
        clones.used(path)
        stamp = time.time() - days_ago * DAY
        os.utime(clones.marker(path), (stamp, stamp))
    return path


def test_only_clones_unused_for_longer_than_clone_days_are_stale(tmp_path):
    checkouts = tmp_path / "checkouts"
    old, recent, unmarked = clone(checkouts, 0, 40), clone(checkouts, 1, 2), clone(checkouts, 2, None)
    stamp = time.time() - 50 * DAY
    os.utime(unmarked, (stamp, stamp))      # no marker: its own last change counts
    found = dict(clones.stale(checkouts, 30, time.time()))
    assert set(found) == {old, unmarked} and 39 < found[old] < 41
    assert clones.stale(checkouts, 0, time.time()) == []          # 0 keeps them forever
    assert recent.exists()


def test_a_clone_set_aside_leaves_its_slot_free_and_is_deleted(tmp_path):
    checkouts = tmp_path / "checkouts"
    old = clone(checkouts, 0, 40)
    trash = clones.set_aside(old)
    assert trash is not None and trash.exists()
    assert not old.exists() and not clones.marker(old).exists()    # the next build clones afresh
    clones.delete_aside(checkouts)
    assert list(checkouts.iterdir()) == []


@pytest.mark.slow
def test_a_runner_deletes_an_unused_clone_when_it_starts(tmp_path):
    from test_runner import Runners      # the runner processes of test_runner, killed by PID at the end

    workdir = tmp_path / "work-old"
    old, fresh = clone(workdir / "checkouts", 0, 40), clone(workdir / "checkouts", 1, 1)
    runners = Runners(tmp_path)

    async def scenario():
        fake = await FakeDispatcher().start()
        try:
            await runners.start(fake.port, "--slots", "2", workdir=workdir, tag="old")
            await wait_until(lambda: not old.exists(), "the unused clone to be deleted")
            await wait_until(lambda: not list((workdir / "checkouts").glob(clones.TRASH + "*")),
                             "the clone set aside to be deleted")
            assert fresh.exists() and clones.marker(fresh).exists()
        finally:
            fake.close()

    try:
        asyncio.run(scenario())
    finally:
        runners.close()
