"""The web process's live picture of the dispatcher, fed by its ``watch``
stream (``link.Link.watch``): the active builds, the runners, whether the
stream is connected. A plain class: no sockets, no clock.

It serves two things: the browsers' live updates (``version`` grows on every
change a page would show, and ``changed`` wakes whoever waits for one: a
heartbeat that only moves a runner's "last seen" is not such a change) and
the metrics (a build counted once when it ends, its queue wait once when it
first starts).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from .metrics import Metrics

ACTIVE = ("queued", "running")
REMEMBER = 10_000           # ids of builds counted, so a repeated event is not counted twice


class Tracker:
    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self.builds: dict[int, dict] = {}       # active builds by id
        self.runners: dict[str, dict] = {}
        self.connected = False
        self.problem = "connecting to the dispatcher"
        self.conditions: list[dict] = []        # what the dispatcher is in (its disk full), for the banner
        self.version = 0
        self.changed = asyncio.Event()
        self._counted: OrderedDict[int, None] = OrderedDict()
        self._started: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------ the stream

    def snapshot(self, frame: dict) -> None:
        """A (re)connected watch's first frame: builds we knew running that it
        shows finished ended while we were away, and are counted now."""
        builds = {b["id"]: b for b in frame.get("builds", [])}
        for build_id, build in builds.items():
            if build_id in self.builds:
                self._build(build)
        self.builds = {i: b for i, b in builds.items() if b["status"] in ACTIVE}
        for build in self.builds.values():
            if build["status"] == "running":
                self._once(self._started, build["id"], lambda b=build: self.metrics.build_started(b))
        self.runners = {r["name"]: r for r in frame.get("runners", [])}
        self.conditions = [c for c in frame.get("conditions") or [] if isinstance(c, dict)]
        self.connected, self.problem = True, ""
        self._bump()

    def event(self, frame: dict) -> None:
        if frame.get("event") == "build" and isinstance(frame.get("build"), dict):
            self._build(frame["build"])
        elif frame.get("event") == "runner" and isinstance(frame.get("runner"), dict):
            runner = frame["runner"]
            old = self.runners.get(runner["name"])
            self.runners[runner["name"]] = runner
            if old is not None and {**old, "last_seen": 0} == {**runner, "last_seen": 0}:
                self._publish()         # the metrics, not the pages
                return
        elif frame.get("event") == "conditions" and isinstance(frame.get("conditions"), list):
            self.conditions = [c for c in frame["conditions"] if isinstance(c, dict)]
        else:
            return                      # an event of a newer dispatcher
        self._bump()

    def lost(self, why: str) -> None:
        if self.connected or self.problem != why:
            self.connected, self.problem = False, why
            self._bump()

    def _build(self, build: dict) -> None:
        if build["status"] in ACTIVE:
            self.builds[build["id"]] = build
            if build["status"] == "running":
                self._once(self._started, build["id"], lambda: self.metrics.build_started(build))
        else:
            self.builds.pop(build["id"], None)
            self._once(self._counted, build["id"], lambda: self.metrics.build_finished(build))

    @staticmethod
    def _once(seen: OrderedDict, build_id: int, action) -> None:
        if build_id in seen:
            return
        seen[build_id] = None
        if len(seen) > REMEMBER:
            seen.popitem(last=False)
        action()

    # ------------------------------------------------------------ what the pages and metrics read

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """(queued, running, runners by state)."""
        queued = sum(1 for b in self.builds.values() if b["status"] == "queued")
        states: dict[str, int] = {}
        for runner in self.runners.values():
            states[runner["state"]] = states.get(runner["state"], 0) + 1
        return queued, len(self.builds) - queued, states

    def _publish(self) -> None:
        queued, running, states = self.counts()
        self.metrics.picture(queued, running, states, self.connected)

    def _bump(self) -> None:
        self.version += 1
        self._publish()
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait(self, version: int, timeout: float) -> int:
        """The version once it differs from ``version`` (or after ``timeout``)."""
        if self.version == version:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.version
