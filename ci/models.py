"""Records shared by the dispatcher's scheduler and store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"           # never ran: [skip ci], its `when`, or a build it needs did not pass

    @property
    def final(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)

    def __str__(self) -> str:
        return self.value


@dataclass
class Build:
    id: int
    repo: str
    branch: str
    sha: str
    subject: str = ""
    author: str = ""
    commit_time: float = 0.0
    reason: str = "commit"
    status: Status = Status.QUEUED
    attempt: int = 0              # lease number: raised on every hand-out, never reused
    runner: str | None = None
    labels: tuple = ()
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    log_base: int = 0             # size of the build's log when the current attempt began
    job: str = ""                 # the .ci.yaml job this build runs; "" for a commit's one default job
    needs: tuple = ()             # jobs of the same commit that must pass before it starts (stored)
    held: str = ""                # while it waits for them (not stored): the ones still to finish
    secrets: tuple = ()           # names (never values) of the build secrets its job asked for

    def summary(self) -> dict:
        return {
            "id": self.id, "repo": self.repo, "branch": self.branch, "sha": self.sha,
            "subject": self.subject, "author": self.author, "reason": self.reason,
            "status": self.status.value, "attempt": self.attempt, "runner": self.runner,
            "labels": list(self.labels), "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "exit_code": self.exit_code, "job": self.job, "needs": list(self.needs),
            **({"held": self.held} if self.held else {}),
            "duration": (self.finished_at - self.started_at)
            if self.finished_at is not None and self.started_at is not None else None,
        }


def pipeline_status(statuses: list[str]) -> str:
    """A commit's status from its jobs' (DESIGN.md): any error -> error; else any
    failed -> failed; all passed -> passed; otherwise running. Where that rule
    says "running" but nothing is running any more, say what it is: queued
    (none started), cancelled, or skipped."""
    if "error" in statuses:
        return "error"
    if "failed" in statuses:
        return "failed"
    if statuses and all(s == "passed" for s in statuses):
        return "passed"
    if statuses and all(s == "skipped" for s in statuses):
        return "skipped"
    if statuses and all(s == "queued" for s in statuses):
        return "queued"
    if statuses and not any(s in ("queued", "running") for s in statuses):
        return "cancelled"          # passed and cancelled jobs, nothing left to run
    return "running"


class RunnerState(str, enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"         # `tinyci drain`: finishes what it runs, takes nothing new
    DRAINED = "drained"           # draining, and nothing left to finish
    DEAD = "dead"


# states in which a runner takes no new build, though alive
NOT_TAKING = (RunnerState.DRAINING.value, RunnerState.DRAINED.value)


@dataclass
class RunnerRecord:
    """The dispatcher's record of a runner (the daemon itself is ci.runner.Runner).

    ``last_seen`` and ``registered_at`` are wall-clock times, for people to
    read; liveness is judged by the scheduler on the monotonic clock
    (``misses``, ``grace_until``, ``died_at``), which is never stored."""

    name: str
    host: str
    port: int
    labels: tuple = ()
    slots: int = 1
    alive: bool = True
    last_seen: float = 0.0
    registered_at: float = 0.0
    running: set = field(default_factory=set)      # {(build, attempt)} holding a slot
    draining: bool = False        # an operator drained it: no new builds until resumed (stored)
    misses: int = 0               # pings in a row sent and unanswered
    # monotonic: known from before a dispatcher restart and not heard from since;
    # until then it is not declared lost for a refused ping, and gets no new work
    grace_until: float = 0.0
    died_at: float | None = None  # monotonic: when it was declared dead (for forget_dead_after)

    @property
    def state(self) -> RunnerState:
        if not self.alive:
            return RunnerState.DEAD
        if self.draining:
            return RunnerState.DRAINING if self.running else RunnerState.DRAINED
        return RunnerState.BUSY if self.running else RunnerState.IDLE

    @property
    def free(self) -> int:
        if not self.alive or self.draining or self.grace_until:
            return 0
        return self.slots - len(self.running)

    def summary(self) -> dict:
        return {"name": self.name, "host": self.host, "port": self.port, "labels": list(self.labels),
                "slots": self.slots, "state": self.state.value,
                "running": sorted(b for b, _ in self.running), "last_seen": self.last_seen}


def can_take(runner_labels, build_labels) -> bool:
    """True when a runner offering ``runner_labels`` may run a build that needs ``build_labels``."""
    return set(build_labels) <= set(runner_labels)


def why_waiting(build_labels, runners, held: str = "") -> str:
    """Why a queued build needing ``build_labels`` has not started, from the
    runners as their summaries show them (name, state, labels, running,
    slots); ``held``: the builds it needs that have not finished (its
    summary's ``held``). The one explanation used by ``tinyci status``, the
    console and any other view, so they never explain the same wait differently."""
    if held:
        return f"waiting for {held} (needs)"
    alive = [r for r in runners if r.get("state") != "dead"]
    if not alive:
        return "no runner alive"
    able = [r for r in alive if can_take(r.get("labels") or (), build_labels)]
    if not able:
        missing = set(build_labels) - {label for r in alive for label in r.get("labels") or ()}
        if len(missing) == 1:
            return f"no runner with label {missing.pop()}"
        return f"no runner with labels {', '.join(sorted(missing or build_labels))}"
    taking = [r for r in able if r.get("state") not in NOT_TAKING]
    if not taking:
        if len(able) == 1:
            return f"runner {able[0]['name']} {able[0]['state']}"
        return f"all {len(able)} runners that could take it are drained or draining"
    able = taking
    if all(len(r.get("running") or ()) >= r.get("slots", 1) for r in able):
        if len(able) == 1:
            return f"runner {able[0]['name']} busy"
        return f"all {len(able)} runners busy"
    return "starting"
