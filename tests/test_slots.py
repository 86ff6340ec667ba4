"""The runner's slots: one attempt per slot, the first free slot taken, a
build found by build (and attempt), a slot freed only by the execution that
holds it."""

from __future__ import annotations

import asyncio

from ci.attempt import RunRequest
from ci.buildlog import BuildLog
from ci.execution import Execution
from ci.slots import Slots


def test_slots(tmp_path):
    def execution(build: int, attempt: int = 1) -> Execution:
        buildlog = BuildLog(tmp_path / f"{build}-{attempt}.log")
        buildlog.close()
        return Execution(RunRequest(build, attempt, "repo", "a" * 40, "main"), tmp_path / "c", buildlog, 1.0)

    async def scenario():
        slots = Slots(2)
        idle = asyncio.ensure_future(asyncio.sleep(0))
        first, second, again = execution(10), execution(11), execution(10, 2)
        assert slots.free() == 0
        slots.take(0, first, idle)
        assert slots.free() == 1 and slots.runs_build(10) and not slots.runs_build(11)
        slots.take(1, second, idle)
        assert slots.free() is None
        assert slots.find(10) == [first] and slots.find(10, 1) == [first] and slots.find(10, 2) == []
        slots.release(0, again)             # not its slot: nothing changes
        assert slots.find(10) == [first]
        assert slots.stop_all("shutdown", 0.5) == [idle, idle]
        assert (first.stop_reason, first.kill_grace) == ("shutdown", 0.5)
        slots.release(0, first)
        assert slots.free() == 0 and not slots.runs_build(10)
        await idle

    asyncio.run(scenario())
