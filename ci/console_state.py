"""The console's view model: its picture of the dispatcher, kept up to date
from the ``watch`` stream. (``console`` is the live loop that feeds it and
redraws; ``tui`` renders it.)

A plain class with no sockets, clock or rendering: ``snapshot()`` takes the
first frame of a watch (``ok {runners, builds, queue}``), ``event()`` each
``event`` frame after it (``{event: "build", build}``, ``{event: "runner",
runner}`` or ``{event: "runner_forgotten", runner: {name}}``), and ``log_*()`` the chunks of the followed build's log. The
answers a screen needs (what waits and why, counts, which log to tail) are
derived here, so tests can feed recorded frames and check them; why a
build waits is ``models.why_waiting``, the same words `tinyci status` uses.
"""

from __future__ import annotations

from collections import deque

from . import models
from .sanitize import log_text

ACTIVE = ("queued", "running")
HOUR = 3600.0


class ConsoleState:
    """What the console knows: runners and builds by id, the connection, and the followed log."""

    def __init__(self, address: str, follow: int | None = None, keep: int = 500, log_lines: int = 500):
        self.address = address
        self.follow = follow                # build chosen with --follow; None: the newest running one
        self.keep = keep                    # finished builds remembered
        self.connected = False
        self.problem = "connecting"         # why we are not connected
        self.stale_since: float | None = None   # when a link that worked was lost: clocks stop there
        self.runners: dict[str, dict] = {}
        self.builds: dict[int, dict] = {}
        self.conditions: list[dict] = []    # what the dispatcher is in (its disk full), for the header
        self.version = 0                    # grows on every change: redraw when it moved
        self.news = 0                       # grows when builds, runners or the connection change
        self.log_build: int | None = None
        self.log_lines: deque[str] = deque(maxlen=log_lines)
        self.log_partial = ""
        self.log_offset = 0
        self.log_status: str | None = None  # the build's final status once its log ended

    # ------------------------------------------------------------ the watch stream

    def snapshot(self, frame: dict) -> None:
        """The first frame of a watch: it replaces everything known so far."""
        self.runners = {r["name"]: {**r, "running": list(r.get("running") or [])} for r in frame.get("runners", [])}
        self.builds = {b["id"]: dict(b) for b in frame.get("builds", [])}
        self.conditions = list(frame.get("conditions") or [])
        self.connected, self.problem, self.stale_since = True, "", None
        self._trim()
        self._bump()

    def event(self, frame: dict) -> None:
        kind = frame.get("event")
        if kind == "build" and isinstance(frame.get("build"), dict):
            build = dict(frame["build"])
            self.builds[build["id"]] = build
            self._place(build)
            if len(self.builds) > self.keep + 100:
                self._trim()
        elif kind == "runner" and isinstance(frame.get("runner"), dict):
            runner = {**frame["runner"], "running": list(frame["runner"].get("running") or [])}
            old = self.runners.get(runner["name"])
            self.runners[runner["name"]] = runner
            if old is not None and {**old, "last_seen": 0} == {**runner, "last_seen": 0}:
                return                      # only a heartbeat: the once-a-second redraw shows it
        elif kind == "runner_forgotten" and isinstance(frame.get("runner"), dict):
            if self.runners.pop(frame["runner"].get("name"), None) is None:
                return
        elif kind == "conditions" and isinstance(frame.get("conditions"), list):
            self.conditions = [c for c in frame["conditions"] if isinstance(c, dict)]
        else:
            return                          # an event kind from a newer dispatcher: ignore it
        self._bump()

    def lost(self, why: str, now: float | None = None) -> None:
        """The watch broke (at ``now``); what we know stays on screen, marked as possibly stale."""
        if self.connected and now is not None:
            self.stale_since = now
        if self.connected or self.problem != why:
            self.connected, self.problem = False, why
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self.news += 1

    def _place(self, build: dict) -> None:
        # runner events come on registration, death and heartbeats, not when a
        # build starts or ends: keep each runner's list of builds in step here
        for runner in self.runners.values():
            running = runner.setdefault("running", [])
            if build["id"] in running and (build["status"] != "running" or build.get("runner") != runner["name"]):
                running.remove(build["id"])
            elif build["status"] == "running" and build.get("runner") == runner["name"] \
                    and build["id"] not in running:
                running.append(build["id"])
                running.sort()
            if runner.get("state") in ("idle", "busy"):
                runner["state"] = "busy" if running else "idle"
            elif runner.get("state") in models.NOT_TAKING:
                runner["state"] = "draining" if running else "drained"

    def _trim(self) -> None:
        finished = sorted((i for i, b in self.builds.items() if b["status"] not in ACTIVE), reverse=True)
        for build_id in finished[self.keep:]:
            if build_id != self.log_build:
                del self.builds[build_id]

    # ------------------------------------------------------------ what the screen shows

    def queue(self) -> list[dict]:
        """Queued builds in the order they will be handed out."""
        return sorted((b for b in self.builds.values() if b["status"] == "queued"), key=lambda b: b["id"])

    def recent(self, limit: int, queued: bool = True) -> list[dict]:
        """The newest builds first."""
        builds = sorted(self.builds.values(), key=lambda b: -b["id"])
        if not queued:
            builds = [b for b in builds if b["status"] != "queued"]
        return builds[:limit]

    def why_waiting(self, build: dict) -> str:
        """Why a queued build has not started, from what the runners look like."""
        return models.why_waiting(build.get("labels") or (), list(self.runners.values()), build.get("held") or "")

    def counts(self, now: float) -> dict[str, int]:
        """Builds queued and running now, and passed/failed/error/cancelled in the last hour."""
        counts = {"queued": 0, "running": 0, "passed": 0, "failed": 0, "error": 0, "cancelled": 0}
        for build in self.builds.values():
            status = build.get("status")
            if status in ACTIVE:
                counts[status] += 1
            elif status in counts and now - (build.get("finished_at") or build.get("created_at") or 0) <= HOUR:
                counts[status] += 1
        return counts

    def log_target(self) -> int | None:
        """Whose log to tail: the chosen build, else the newest running one, else
        the one already shown, else the newest that ran."""
        if self.follow is not None:
            return self.follow
        running = [i for i, b in self.builds.items() if b["status"] == "running"]
        if running:
            return max(running)
        if self.log_build is not None:
            return self.log_build
        ran = [i for i, b in self.builds.items() if b.get("attempt")]
        return max(ran) if ran else None

    def status_snapshot(self, limit: int = 20) -> dict:
        """What ``tui.render_status`` takes, as ``tinyci status`` would show it."""
        return {"runners": sorted(self.runners.values(), key=lambda r: r["name"]),
                "builds": self.recent(limit), "conditions": self.conditions}

    # ------------------------------------------------------------ the followed log

    def log_start(self, build: int) -> None:
        """Start tailing ``build``; a different build starts from an empty tail."""
        if build != self.log_build:
            self.log_build = build
            self.log_lines.clear()
            self.log_partial = ""
            self.log_offset = 0
            self.log_status = None
            self.version += 1

    def log_chunk(self, build: int, offset: int, data: str) -> None:
        """A ``chunk`` frame; resent bytes (after a reconnect) are skipped."""
        if build != self.log_build:
            return
        raw = data.encode()
        end = offset + len(raw)
        if end <= self.log_offset:
            return
        if offset < self.log_offset:
            data = raw[self.log_offset - offset:].decode(errors="replace")
        self.log_offset = end
        lines = (self.log_partial + data).split("\n")
        self.log_partial = lines.pop()
        self.log_lines.extend(clean(line) for line in lines)
        self.version += 1

    def log_end(self, build: int, status: str | None) -> None:
        if build == self.log_build:
            self.log_status = status
            self.version += 1

    def log_tail(self, count: int) -> list[str]:
        """The last ``count`` lines, with the unfinished last line."""
        lines = list(self.log_lines) + ([clean(self.log_partial)] if self.log_partial else [])
        return lines[-count:] if count > 0 else []


def clean(line: str) -> str:
    """One log line for the console's screen: what follows its last carriage
    return (a progress bar shows its last state; a build's line can only
    overwrite itself, since every line of the dispatcher's own starts a line),
    without escape sequences or control characters (``sanitize.log_text``,
    no colour); tabs become spaces."""
    line = line.rstrip("\r")
    if "\r" in line:
        line = line.rsplit("\r", 1)[1]
    return log_text(line).expandtabs(4)
