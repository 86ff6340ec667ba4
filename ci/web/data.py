"""What each page and its JSON twin show, asked of the dispatcher once and
shaped in one place, so ``/api/...`` says exactly what the page says.

Requests (role reader): ``status`` and ``counts`` for the overview,
``history`` for lists, ``build``, ``log_window``, ``artifacts`` and a
``history`` of the build's commit for a build page, ``branch_status`` for
the badge. Filters from a URL are checked against the wire table's own
field kinds before anything is sent (``BadRequest`` names the one at fault).
"""

from __future__ import annotations

import asyncio
import time
from typing import Mapping

from .. import protocol
from ..models import pipeline_status
from .link import Link

HOUR = 3600.0
PAGE = 50
OVERVIEW_BUILDS = 100
OVERVIEW_COMMITS = 15
WINDOW = 64 * 1024
WINDOW_LINES = 1000          # lines of a log a page shows at once

# the history's filters, each with its wire kind, as ?name=value
FILTERS = {"branch": protocol.BRANCH, "status": protocol.STATUS, "author": protocol.MESSAGES["history"].optional["author"],
           "job": protocol.JOB, "sha": protocol.SHA_PREFIX, "repo": protocol.REPO}
STATUSES = ("queued", "running", "passed", "failed", "error", "cancelled", "skipped")


class BadRequest(Exception):
    """A parameter in the URL that cannot be asked for; the message names it."""


def filters_from(params: Mapping[str, str]) -> dict[str, str]:
    """The history filters set in ``params`` (empty ones ignored)."""
    chosen = {}
    for name, kind in FILTERS.items():
        value = params.get(name, "").strip()
        if not value:
            continue
        if name == "sha":
            value = value.lower()
        if not kind.check(value):
            raise BadRequest(f"{name}: expected {kind.name}")
        chosen[name] = value
    return chosen


def number(params: Mapping[str, str], name: str, lo: int = 1, hi: int = 2 ** 62) -> int | None:
    text = params.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise BadRequest(f"{name}: expected a whole number from {lo} to {hi}")
    return int(text)


def trim(window: dict, keep_end: bool, most: int = WINDOW_LINES) -> dict:
    """At most ``most`` lines of a log window: its last ones for the tail,
    else its first (a window asked for from a line or offset starts there)."""
    data = window["data"]
    if data.count("\n") <= most:
        return window
    if not keep_end:
        cut = -1
        for _ in range(most):
            cut = data.index("\n", cut + 1)
        return {**window, "data": data[:cut + 1]}
    cut = len(data)
    for _ in range(most + (1 if data.endswith("\n") else 0)):
        cut = data.rindex("\n", 0, cut)
    dropped = data[:cut + 1]
    return {**window, "data": data[cut + 1:], "offset": window["offset"] + len(dropped.encode()),
            "line": window["line"] + dropped.count("\n")}


class Data:
    def __init__(self, link: Link):
        self.link = link

    async def overview(self) -> dict:
        status, counts = await asyncio.gather(
            self.link.request({"type": "status", "limit": OVERVIEW_BUILDS}),
            self.link.request({"type": "counts", "since": time.time() - HOUR}))
        builds = {b["id"]: b for b in status["builds"]}
        queue = [builds[i] for i in status["queue"] if i in builds]
        commits = []
        for pipeline in status["pipelines"][:OVERVIEW_COMMITS]:
            jobs = [builds[j["build"]] for j in pipeline["jobs"] if j["build"] in builds]
            first = min(jobs, key=lambda b: b["id"]) if jobs else {}
            commits.append({**pipeline, "repo": first.get("repo", ""), "author": first.get("author", ""),
                            "created_at": first.get("created_at"), "jobs": [
                                {**j, "duration": builds.get(j["build"], {}).get("duration")}
                                for j in pipeline["jobs"]]})
        finished = counts["counts"]
        return {
            "runners": status["runners"],
            "queue": queue, "queued": len(status["queue"]),
            "running": [b for b in builds.values() if b["status"] == "running"],
            "commits": commits,
            "hour": {"queued": len(status["queue"]),
                     "running": sum(1 for b in builds.values() if b["status"] == "running"),
                     **{s: finished.get(s, 0) for s in ("passed", "failed", "error", "cancelled")}},
        }

    async def runners(self) -> list[dict]:
        return (await self.link.request({"type": "status", "limit": 1}))["runners"]

    async def history(self, filters: dict, before: int | None = None, after: int | None = None,
                      limit: int = PAGE) -> dict:
        msg = {"type": "history", **filters, "limit": limit}
        if before is not None:
            msg["before"] = before
        elif after is not None:
            msg["after"] = after
        reply = await self.link.request(msg)
        return {"builds": reply["builds"], "older": reply["older"], "newer": reply["newer"]}

    async def commit(self, sha: str) -> dict:
        found = await self.history({"sha": sha}, limit=200)
        builds = found["builds"]
        newest: dict[tuple, dict] = {}
        for build in reversed(builds):
            newest[(build["repo"], build["sha"], build["job"])] = build
        status = pipeline_status([b["status"] for b in newest.values()]) if builds else "unknown"
        return {"sha": sha, "builds": builds, "status": status, "first": builds[-1] if builds else None}

    async def build(self, build_id: int, offset: int | None = None, line: int | None = None) -> dict:
        build = (await self.link.request({"type": "build", "build": build_id}))["build"]
        window_msg = {"type": "log_window", "build": build_id, "limit": WINDOW}
        if line is not None:
            window_msg["line"] = line
        elif offset is not None:
            window_msg["offset"] = offset
        window, artifacts, jobs = await asyncio.gather(
            self.link.request(window_msg),
            self.link.request({"type": "artifacts", "build": build_id}),
            self.history({"sha": build["sha"], "repo": build["repo"]}, limit=100))
        window = trim({k: window[k] for k in ("data", "offset", "line", "size", "status")},
                      keep_end=line is None and offset is None)
        others = [b for b in jobs["builds"] if b["id"] != build_id]
        return {"build": build, "log": window, "artifacts": artifacts["artifacts"], "jobs": others}

    async def branch_status(self, branch: str, repo: str | None = None) -> dict:
        msg = {"type": "branch_status", "branch": branch, **({"repo": repo} if repo else {})}
        reply = await self.link.request(msg)
        return {k: reply[k] for k in ("status", "sha", "builds") if k in reply}
