"""Waiting for builds to end: what `tinyci run` and `tinyci wait` do after
the builds are queued, and the one line per finished build that they and
the `tinyci up` window print.

Sends to the dispatcher (role reader): ``watch`` (a snapshot, then events;
reopened when it goes quiet or drops), ``build`` for a build the snapshot
does not hold, ``history {sha}`` to find a commit's builds, and with
``--follow`` ``read_log {follow}`` for each build in turn.

Exit codes, for scripts and other CIs: 0 when every build passed, 1 when
any failed, 2 otherwise (a build ended in error, was cancelled or skipped,
or the dispatcher could not be asked).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable, Iterable

from . import aio, net, protocol
from .sanitize import plain

FINAL = frozenset({"passed", "failed", "error", "cancelled", "skipped"})
IDLE = 30.0                 # a watch that says nothing this long is reopened (it may be dead)
RECONNECT_FOR = 60.0        # how long a dispatcher that went away is waited for before giving up


class WaitError(Exception):
    """The builds cannot be waited for; the message is one line for the user."""


def exit_code(statuses: Iterable[str]) -> int:
    """0: all passed; 1: any failed; 2: none failed but not all passed (error, cancelled, skipped)."""
    statuses = list(statuses)
    if statuses and all(s == "passed" for s in statuses):
        return 0
    return 1 if "failed" in statuses else 2


def verdict_line(build: dict, with_time: bool = False, now: Callable[[], float] = time.time) -> str:
    """One line for a finished build: its number, status, commit, and where and how long it ran.
    Every part came from a peer, so the line is plain text."""
    job = f" [{build['job']}]" if build.get("job") else ""
    took = f"{build['duration']:.1f}s" if build.get("duration") is not None else ""
    ran = ", ".join(part for part in (took, f"on {build['runner']}" if build.get("runner") else "") if part)
    subject = (build.get("subject") or "").splitlines()[0][:60] if build.get("subject") else ""
    line = (f"build {build['id']}{job} {build['status']}: {build.get('branch', '')} "
            f"{str(build.get('sha') or '')[:7]} {subject}" + (f" ({ran})" if ran else ""))
    stamp = time.strftime("%H:%M:%S ", time.localtime(now())) if with_time else ""
    return stamp + plain(line)


async def build_events(connect: Callable[[], net.Client], idle: float = IDLE,
                       reconnect_for: float | None = RECONNECT_FOR) -> AsyncIterator[tuple[str, list[dict]]]:
    """("snapshot", builds) for each watch opened, then ("build", [summary]) per
    build event, until the caller stops. A quiet or dropped watch is reopened;
    a dispatcher away longer than ``reconnect_for`` seconds (None: forever)
    raises its PeerError, as does one that never answered. RemoteError (a
    refusal) is raised at once."""
    retry = aio.Backoff(0.2, 3.0)
    away_since: float | None = None
    reached = False             # a dispatcher that never answered is an error at once
    while True:
        client = connect()
        frames = client.stream({"type": "watch", "limit": 50}, idle=idle)
        try:
            async for frame in frames:
                if frame["type"] == "ok":
                    away_since, reached = None, True
                    retry.reset()
                    yield "snapshot", frame["builds"]
                elif frame["type"] == "event" and isinstance(frame.get("build"), dict):
                    yield "build", [frame["build"]]
        except net.PeerTimeout:
            if reached and away_since is None:
                continue                # quiet, not gone: look again at once
            if not reached:
                raise
        except net.PeerAuthFailed:
            raise
        except (net.PeerError, protocol.ProtocolError):
            if not reached:
                raise
            if away_since is None:
                away_since = time.monotonic()
            if reconnect_for is not None and time.monotonic() - away_since > reconnect_for:
                raise
        finally:
            await frames.aclose()
            await client.close()
        await asyncio.sleep(retry.next())


class Waiter:
    """Waits for builds ``ids`` to end; ``on_end(summary)`` is called once for
    each as it ends (in the order they end). ``run`` returns their summaries by id."""

    def __init__(self, connect: Callable[[], net.Client], ids: Iterable[int],
                 on_end: Callable[[dict], None] = lambda build: None):
        self.connect = connect
        self.ids = sorted(set(ids))
        self.on_end = on_end
        self.ended: dict[int, dict] = {}

    def _see(self, build: dict) -> None:
        if build["id"] in self.ids and build["id"] not in self.ended and build.get("status") in FINAL:
            self.ended[build["id"]] = build
            self.on_end(build)

    async def run(self) -> dict[int, dict]:
        events = build_events(self.connect)
        try:
            async for kind, builds in events:
                for build in builds:
                    self._see(build)
                if kind == "snapshot":
                    # a build the snapshot leaves out (older than its window) is asked for by number
                    shown = {b["id"] for b in builds}
                    for build_id in self.ids:
                        if build_id not in shown and build_id not in self.ended:
                            self._see(await self._build(build_id))
                if len(self.ended) == len(self.ids):
                    return self.ended
        finally:
            await events.aclose()
        return self.ended

    async def _build(self, build_id: int) -> dict:
        client = self.connect()
        try:
            return (await client.request({"type": "build", "build": build_id}))["build"]
        finally:
            await client.close()


async def commit_builds(connect: Callable[[], net.Client], sha: str) -> list[int]:
    """The newest build of each job of the commit ``sha`` (a prefix of at least
    4 hex digits), oldest job first. Raises WaitError when there is none, or
    the prefix names several commits."""
    client = connect()
    try:
        reply = await client.request({"type": "history", "sha": sha, "limit": 500})
    finally:
        await client.close()
    builds = reply["builds"]
    if not builds:
        raise WaitError(f"no build of a commit {sha}")
    commits = {b["sha"] for b in builds}
    if len(commits) > 1:
        raise WaitError(f"{sha} is the start of {len(commits)} commits' shas; give more of it")
    newest: dict[str, int] = {}
    for build in builds:
        newest[build.get("job") or ""] = max(newest.get(build.get("job") or "", 0), build["id"])
    return sorted(newest.values())
