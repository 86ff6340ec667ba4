"""The dispatcher's fan-out to watchers and log followers."""

from __future__ import annotations

import asyncio

from ci import watchers
from ci.watchers import Watchers


def test_every_watcher_gets_every_event_and_a_slow_one_is_dropped(monkeypatch):
    monkeypatch.setattr(watchers, "BACKLOG", 3)

    async def scenario():
        w = Watchers()
        with w.watching() as fast, w.watching() as slow:
            assert w.active
            for n in range(3):
                w.event("build", build={"id": n})
                assert (await fast.get())["build"] == {"id": n}
            w.event("build", build={"id": 3})       # slow holds 3 already: it is dropped, not waited for
            assert slow.get_nowait() is None and slow.empty()
            assert w.queues == {fast}
            assert (await fast.get()) == {"type": "event", "event": "build", "build": {"id": 3}}
        assert not w.active

    asyncio.run(scenario())


def test_touch_wakes_every_follower_once():
    async def scenario():
        w = Watchers()
        before = w.changed
        waiting = [asyncio.ensure_future(before.wait()) for _ in range(3)]
        w.touch()
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert w.changed is not before and not w.changed.is_set()

    asyncio.run(scenario())
