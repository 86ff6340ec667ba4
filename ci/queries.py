"""The dispatcher's answers to the tools' read requests; nothing here changes state.

Receives (role reader or operator): ``status`` -> ok {runners, builds,
pipelines, queue, conditions}; ``build`` -> ok {build}; ``read_log`` -> chunk {offset,
data, [times]}... end {status, offset} (``times`` with ``timestamps``: when
each part reached the dispatcher; with ``binary``, ``data`` is bytes in bulk
frames of up to ``net.max_bulk``, else text in pieces of LOG_CHUNK);
``watch`` -> ok {the status snapshot}, then event...
(end "watcher too slow" when it falls behind); ``artifacts`` -> ok
{artifacts}; ``fetch_artifact`` -> ok {data (bytes, a bulk frame of up to
``net.max_bulk``), offset, size, eof}; ``read_artifact`` -> ok {size}, chunk
{offset, data (bytes, sent from the file by the kernel)}... end {offset};
``history`` -> ok {builds, older, newer}; ``branch_status`` -> ok {status,
[sha, builds]}; ``log_window`` -> ok {data, offset, line, size, status};
``counts`` -> ok {counts}. The last four are what the web page needs: a page
of any filter over any amount of history, a badge, and a window of a log of
any size.

Active builds are read from the scheduler (authoritative in memory),
finished ones from the store. A queued build in ``status`` says why it
waits in ``waiting``: models.why_waiting, the one explanation every view gives.
Builds held for their ``needs`` (``held``, the dispatcher's ``needs.Held``) are
active too, outside the scheduler. A runner may fetch only the artifacts of
builds of a commit it holds a build of (its run's ``inputs``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Mapping

from . import aio, net, protocol
from .artifacts import ArtifactError, Artifacts
from .buildlogs import BuildLogs
from .conditions import Conditions
from .intake import pipelines
from .logwindow import LogLines
from .models import Build, Status, pipeline_status, why_waiting
from .scheduler import Scheduler
from .store import HISTORY_FILTERS, Store
from .watchers import Watchers

LOG_CHUNK = 256 * 1024       # a text chunk: JSON may escape a byte six-fold within the frame
LOG_WINDOW = 64 * 1024
BADGE_SCAN = 500            # a branch's newest builds searched for a finished pipeline


class Queries:
    def __init__(self, store: Store, sched: Scheduler, logs: BuildLogs, artifacts: Artifacts,
                 watchers: Watchers, conditions: Conditions | None = None, held: Mapping[int, Build] | None = None):
        self.store, self.sched, self.logs = store, sched, logs
        self.held = held if held is not None else {}
        self.artifacts, self.watchers = artifacts, watchers
        self.conditions = conditions
        self.lines = LogLines()

    def _build(self, build_id: int) -> Build | None:
        return self.sched.builds.get(build_id) or self.held.get(build_id) or self.store.get(build_id)

    def _live(self, build: Build) -> Build:
        """A stored build as it is now: the scheduler's or the held copy while active."""
        return self.sched.builds.get(build.id) or self.held.get(build.id) or build

    async def status(self, conn: net.Connection, msg: dict) -> dict:
        # active builds are authoritative in memory (the store has them too, but
        # reading both keeps one source for each)
        builds = [self._live(b) for b in self.store.recent(msg.get("limit", 50))]
        runners = [r.summary() for r in sorted(self.sched.runners.values(), key=lambda r: r.name)]
        waits: dict[tuple, str] = {}           # by label set: queued builds mostly share a few
        summaries = []
        for build in builds:
            summary = build.summary()
            if build.status is Status.QUEUED and build.held:
                summary["waiting"] = why_waiting(build.labels, runners, build.held)
            elif build.status is Status.QUEUED:
                if build.labels not in waits:
                    waits[build.labels] = why_waiting(build.labels, runners)
                summary["waiting"] = waits[build.labels]
            summaries.append(summary)
        conditions = self.conditions.active() if self.conditions is not None else []
        self._with_tests(summaries)
        return protocol.ok(runners=runners, builds=summaries, pipelines=pipelines(summaries),
                           # then the builds held for their needs: queued too, waiting for other builds
                           queue=[b.id for b in self.sched.queued()] + sorted(self.held), conditions=conditions)

    async def build(self, conn: net.Connection, msg: dict) -> dict:
        build = self._build(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        steps = self.store.steps(build.id) if build.status.final else None
        tests = self.store.tests(build.id) if build.status.final else None
        return protocol.ok(build={**build.summary(), **({"steps": steps} if steps else {}),
                                  **({"tests": tests} if tests else {})})

    def _with_tests(self, summaries: list[dict]) -> list[dict]:
        """Each finished build's test counts ("tests": {passed, failed, errors, skipped}) where it has any."""
        counts = self.store.test_counts([s["id"] for s in summaries if s["status"] not in ("queued", "running")])
        for summary in summaries:
            if summary["id"] in counts:
                summary["tests"] = counts[summary["id"]]
        return summaries

    async def read_log(self, conn: net.Connection, msg: dict) -> None:
        build_id = msg["build"]
        if self.store.get(build_id) is None:
            await conn.send(protocol.error("not_found", f"no build {build_id}"))
            return
        # an offset past the end is the end (seeking far past it would be an OSError)
        offset = min(msg.get("offset", 0), self.logs.size(build_id))
        binary = msg.get("binary", False)
        limit = conn.limits.max_bulk if binary else LOG_CHUNK
        while True:
            changed = self.watchers.changed
            data = self.logs.read(build_id, offset, limit)     # never half a character: its rest may come
            build = None if data else self._build(build_id)
            if build is None and not data:          # deleted meanwhile (retention)
                await conn.send(protocol.error("not_found", f"no build {build_id}"))
                return
            final = build is not None and build.status.final and build_id not in self.sched.builds
            if final:       # a finished log may end inside a character: send that too
                data = self.logs.read(build_id, offset, limit, whole=False)
            if data:
                chunk = {"type": "chunk", "offset": offset, "data": data if binary else data.decode(errors="replace")}
                if msg.get("timestamps"):
                    # both read here, at once: the dispatcher moves held times into the database
                    stored, held = self.store.log_times(build_id), self.logs.held_times(build_id)
                    chunk["times"] = await aio.in_thread(self.logs.times, build_id, offset, offset + len(data),
                                                         stored, held)
                await conn.send(chunk)
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
            active = [*self.sched.builds.values(), *self.held.values()]
            snapshot["builds"] += [b.summary() for b in sorted(active, key=lambda b: -b.id) if b.id not in shown]
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

    def _artifact_build(self, conn: net.Connection, msg: dict) -> Build | dict:
        """The build whose artifact ``msg`` asks for, or the error refusing it."""
        build = self.store.get(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        if conn.role == protocol.RUNNER and not any(b.runner == conn.id and (b.repo, b.sha) == (build.repo, build.sha)
                                                    for b in self.sched.builds.values()):
            return protocol.error("forbidden", f"runner {conn.id} holds no build of the commit of build {build.id}")
        return build

    async def read_artifact(self, conn: net.Connection, msg: dict) -> dict | None:
        """The artifact from ``offset`` to its end: its size, then chunks sent
        from the open file by the kernel (no read into this process, no round
        trip per chunk: the client's reading paces it), then ``end``."""
        build = self._artifact_build(conn, msg)
        if isinstance(build, dict):
            return build
        try:
            file = self.artifacts.open(build.id, build.sha, msg["path"])
        except ArtifactError as exc:
            return protocol.error(exc.code, exc.message)
        with file:
            size = os.fstat(file.fileno()).st_size
            offset = min(msg.get("offset", 0), size)
            await conn.send(protocol.ok(size=size))
            while offset < size:
                count = min(conn.limits.max_bulk, size - offset)
                # the client writes one chunk while the next comes: one to a slow pipe may take a while
                await conn.send_file({"type": "chunk", "offset": offset}, file, offset, count,
                                     timeout=conn.limits.idle_timeout)
                offset += count
            await conn.send({"type": "end", "offset": offset})
        return None

    async def fetch_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build = self._artifact_build(conn, msg)
        if isinstance(build, dict):
            return build
        offset = msg.get("offset", 0)
        try:
            data, size = self.artifacts.read(build.id, build.sha, msg["path"], offset, conn.limits.max_bulk)
        except ArtifactError as exc:
            return protocol.error(exc.code, exc.message)
        return protocol.ok(data=data, offset=offset, size=size, eof=offset + len(data) >= size)

    async def history(self, conn: net.Connection, msg: dict) -> dict:
        filters = {name: msg[name] for name in HISTORY_FILTERS if name in msg}
        builds, older, newer = self.store.history(filters, msg.get("before"), msg.get("after"),
                                                  msg.get("limit", 50))
        return protocol.ok(builds=self._with_tests([self._live(b).summary() for b in builds]),
                           older=older, newer=newer)

    async def branch_status(self, conn: net.Connection, msg: dict) -> dict:
        """The newest finished pipeline of the branch among its last BADGE_SCAN
        builds; skipped and cancelled ones say nothing about the code, so the
        search goes on past them."""
        builds = [self._live(b)
                  for b in self.store.branch_builds(msg["branch"], msg.get("repo"), limit=BADGE_SCAN)]
        commits: dict[tuple, dict[str, Build]] = {}     # newest commit first, by its first build here
        for build in reversed(builds):
            jobs = commits.setdefault((build.repo, build.sha), {})
            jobs[build.job] = build                      # ascending ids: the newest of each job wins
        under_way = False
        for (repo, sha), jobs in reversed(commits.items()):
            status = pipeline_status([b.status.value for b in jobs.values()])
            if status in ("passed", "failed", "error"):
                return protocol.ok(status=status, sha=sha, builds=sorted(b.id for b in jobs.values()))
            under_way = under_way or status in ("running", "queued")
        return protocol.ok(status="running" if under_way else "unknown")

    async def log_window(self, conn: net.Connection, msg: dict) -> dict:
        build = self._build(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        final = build.status.final and build.id not in self.sched.builds
        window = await aio.in_thread(self.lines.read, self.logs.path(build.id), build.id,
                                     msg.get("limit", LOG_WINDOW), final, msg.get("offset"), msg.get("line"))
        return protocol.ok(data=window.data.decode(errors="replace"), offset=window.offset, line=window.line,
                           size=window.size, status=build.status.value)

    async def counts(self, conn: net.Connection, msg: dict) -> dict:
        return protocol.ok(counts=self.store.counts(msg["since"]))
