"""The dispatcher's answers to the tools' read requests; nothing here changes state.

Receives (role reader or operator): ``status`` -> ok {runners, builds,
pipelines, queue}; ``build`` -> ok {build}; ``read_log`` -> chunk... end
{status, offset}; ``watch`` -> ok {the status snapshot}, then event...
(end "watcher too slow" when it falls behind); ``artifacts`` -> ok
{artifacts}; ``fetch_artifact`` -> ok {data, offset, size, eof}.

Active builds are read from the scheduler (authoritative in memory),
finished ones from the store. A queued build in ``status`` says why it
waits: ``waiting`` (models.why_waiting, the one explanation every view
gives) and ``waiting_for`` (the labels no live runner offers; None when some
live runner could take it).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Iterable

from . import aio, net, protocol
from .artifacts import ArtifactError, Artifacts
from .buildlogs import BuildLogs
from .intake import pipelines
from .models import Build, RunnerRecord, Status, can_take, why_waiting
from .scheduler import Scheduler
from .store import Store
from .watchers import Watchers

LOG_CHUNK = 256 * 1024
ARTIFACT_CHUNK = 256 * 1024


def waiting_for(labels: tuple, runners: Iterable[RunnerRecord]) -> list[str] | None:
    """None when some live runner has every label a build needs; else the
    labels no live runner offers (all of them when each is offered somewhere,
    but never together; [] for a build that needs none, when no runner is alive)."""
    live = [r for r in runners if r.alive]
    if any(can_take(r.labels, labels) for r in live):
        return None
    offered = set().union(*(set(r.labels) for r in live))
    return sorted(set(labels) - offered) or sorted(set(labels))


class Queries:
    def __init__(self, store: Store, sched: Scheduler, logs: BuildLogs, artifacts: Artifacts,
                 watchers: Watchers):
        self.store, self.sched, self.logs = store, sched, logs
        self.artifacts, self.watchers = artifacts, watchers

    def _build(self, build_id: int) -> Build | None:
        return self.sched.builds.get(build_id) or self.store.get(build_id)

    async def status(self, conn: net.Connection, msg: dict) -> dict:
        # active builds are authoritative in memory (the store has them too, but
        # reading both keeps one source for each)
        builds = [self.sched.builds.get(b.id, b) for b in self.store.recent(msg.get("limit", 50))]
        runners = [r.summary() for r in sorted(self.sched.runners.values(), key=lambda r: r.name)]
        waits: dict[tuple, tuple] = {}         # by label set: queued builds mostly share a few
        summaries = []
        for build in builds:
            summary = build.summary()
            if build.status is Status.QUEUED:
                if build.labels not in waits:
                    waits[build.labels] = (why_waiting(build.labels, runners),
                                           waiting_for(build.labels, self.sched.runners.values()))
                summary["waiting"], summary["waiting_for"] = waits[build.labels]
            summaries.append(summary)
        return protocol.ok(runners=runners, builds=summaries, pipelines=pipelines(summaries),
                           queue=[b.id for b in self.sched.queued()])

    async def build(self, conn: net.Connection, msg: dict) -> dict:
        build = self._build(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        return protocol.ok(build=build.summary())

    async def read_log(self, conn: net.Connection, msg: dict) -> None:
        build_id = msg["build"]
        if self.store.get(build_id) is None:
            await conn.send(protocol.error("not_found", f"no build {build_id}"))
            return
        # an offset past the end is the end (seeking far past it would be an OSError)
        offset = min(msg.get("offset", 0), self.logs.size(build_id))
        while True:
            changed = self.watchers.changed
            data = self.logs.read(build_id, offset, LOG_CHUNK)     # never half a character: its rest may come
            build = None if data else self._build(build_id)
            final = build is not None and build.status.final and build_id not in self.sched.builds
            if final:       # a finished log may end inside a character: send that too
                data = self.logs.read(build_id, offset, LOG_CHUNK, whole=False)
            if data:
                await conn.send({"type": "chunk", "offset": offset, "data": data.decode(errors="replace")})
                offset += len(data)
                continue
            if final or not msg.get("follow"):
                await conn.send({"type": "end", "status": build.status.value, "offset": offset})
                return
            try:
                await aio.within(changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def watch(self, conn: net.Connection, msg: dict) -> None:
        with self.watchers.watching() as queue:
            snapshot = await self.status(conn, {"type": "status", "limit": msg.get("limit", 50)})
            # every active build too, however old, so a watcher can show the whole queue
            shown = {b["id"] for b in snapshot["builds"]}
            snapshot["builds"] += [b.summary() for b in sorted(self.sched.builds.values(), key=lambda b: -b.id)
                                   if b.id not in shown]
            await conn.send(snapshot)
            while True:
                event = await queue.get()
                if event is None:
                    await conn.send({"type": "end", "reason": "watcher too slow"})
                    return
                await conn.send(event)

    async def list_artifacts(self, conn: net.Connection, msg: dict) -> dict:
        if self.store.get(msg["build"]) is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        return protocol.ok(artifacts=self.artifacts.list(msg["build"]))

    async def fetch_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build = self.store.get(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        offset = msg.get("offset", 0)
        try:
            data, size = self.artifacts.read(build.id, build.sha, msg["path"], offset, ARTIFACT_CHUNK)
        except ArtifactError as exc:
            return protocol.error(exc.code, exc.message)
        return protocol.ok(data=base64.b64encode(data).decode(), offset=offset, size=size,
                           eof=offset + len(data) >= size)
