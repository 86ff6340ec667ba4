"""The dispatcher's rules, as a plain class: no sockets, threads or disk.

Each method takes the event (and ``now`` where time matters), changes the
in-memory picture of queued and running builds and live runners, and returns
a Plan: what the caller must persist and then send. Only active builds
(queued or running) live here; finished ones belong to the store.

Two clocks, never mixed: every rule (leases, liveness, the restart grace,
forgetting the dead) runs on ``now``, the *monotonic* time the caller passes
in, so a step of the wall clock (NTP after a suspend, a VM migration) changes
nothing. ``wall``, a clock handed in, only stamps the times people read
(started_at, finished_at, last_seen, registered_at).

Liveness is judged by what runners were asked, not by how long the
dispatcher slept: a runner is dead after ``heartbeat_misses`` pings in a
row went out and got no answer within their timeout (``missed``), or at
once when nothing listens at its address (``unreachable``). A pause of the
dispatcher's own loop sends no pings, so it costs nobody anything.

The runners' records, which of them have a free slot, and the liveness facts
that need no build (heard, missed, died, restored, forgotten) are the
``registry`` (``ci/registry.py``); ``runners`` is its dict of records.

Leases: a build is handed out as (build, attempt) and ``attempt`` grows on
every hand-out, so a late message from an earlier hand-out can always be told
apart and refused as stale.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

from .models import Build, RunnerRecord, Status, can_take
from .registry import Registry


@dataclass
class Plan:
    """What must happen after an event, in this order: persist, then send."""

    assign: list[tuple[Build, RunnerRecord]] = field(default_factory=list)     # send `run`
    requeued: list[tuple[Build, str]] = field(default_factory=list)            # (build, why): log line
    errored: list[tuple[Build, str]] = field(default_factory=list)             # gave up: final `error`
    cancel: list[tuple[RunnerRecord, int, int]] = field(default_factory=list)  # send `cancel` (runner, build, attempt)
    dead: list[RunnerRecord] = field(default_factory=list)                     # runners now dead
    finished: list[Build] = field(default_factory=list)                        # builds now final
    saved: list[int] = field(default_factory=list)      # builds the caller has persisted as they are now

    def __iadd__(self, other: "Plan") -> "Plan":
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))
        return self

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in _ACTS)


# what a plan asks to be done; ``saved`` only tells apply what it need not write
_ACTS = tuple(name for name in Plan.__dataclass_fields__ if name != "saved")


class Scheduler:
    def __init__(self, heartbeat_interval: float = 1.0, heartbeat_misses: int = 3,
                 max_attempts: int = 3, wall: Callable[[], float] = time.time):
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.max_attempts = max_attempts
        self.wall = wall
        self.builds: dict[int, Build] = {}          # active builds by id
        self.registry = Registry(wall)              # the runners, and which have a free slot
        self.runners = self.registry.runners
        self._queue: list[int] = []                 # heap of build ids; stale entries skipped
        # build id -> monotonic time from which a pong may judge its current lease:
        # the hand-out, then infinity while its `run` is on its way, then the
        # moment the runner acknowledged it (see heartbeat, sending, sent)
        self._leased_at: dict[int, float] = {}

    # ------------------------------------------------------------ state

    def load(self, builds: list[Build], runners: list[RunnerRecord], now: float) -> Plan:
        """Restore after a restart. Runners alive before it get a full heartbeat
        window (interval x misses) to come back: a refused ping does not count
        until then (a runner may still be starting, as under `tinyci up`), and
        they get no new work until they answer. Their running builds stay
        theirs until a `pong` or a registration says otherwise."""
        self.registry.restore(runners, now, self.deadline())
        plan = Plan()
        for build in builds:
            self.builds[build.id] = build
            owner = self.runners.get(build.runner or "")
            if build.status is Status.RUNNING and owner is not None and owner.alive:
                owner.running.add((build.id, build.attempt))
            elif build.status is Status.RUNNING:
                # the same rule as a runner lost while running: max_attempts holds across restarts
                plan += self._lost(build, "its runner is gone")
            else:
                heapq.heappush(self._queue, build.id)
        for runner in runners:
            self.registry.slots_changed(runner)
        plan += self.assign(now)
        return plan

    def queued(self) -> list[Build]:
        """Queued builds in the order they will be handed out."""
        return sorted((b for b in self.builds.values() if b.status is Status.QUEUED), key=lambda b: b.id)

    def deadline(self) -> float:
        """About how long a silent runner lasts before it is declared dead, and
        the window a runner known from before a restart gets to come back."""
        return self.heartbeat_interval * self.heartbeat_misses

    # ------------------------------------------------------------ events

    def add(self, build: Build, now: float) -> Plan:
        """A new build was stored as queued; hand it out if a runner is free."""
        self.builds[build.id] = build
        heapq.heappush(self._queue, build.id)
        return self.assign(now)

    def register(self, name: str, host: str, port: int, labels: tuple, slots: int,
                 running: set, now: float) -> Plan:
        """A runner (re)registered, telling what it still runs. Anything we
        thought it ran that it no longer does is taken back at once: it
        restarted and cannot be running it."""
        runner = self.registry.register(name, host, port, labels, slots)
        plan = self._reconcile(runner, set(running), since=now)
        self.registry.slots_changed(runner)
        plan += self.assign(now)
        return plan

    def heartbeat(self, name: str, running: set, sent_at: float, now: float) -> Plan:
        """A `pong` arrived for a ping sent at ``sent_at``. Builds whose `run`
        the runner had not acknowledged by that moment are not judged by it:
        the runner may not have had the `run` when it answered."""
        runner = self.registry.live(name)
        if runner is None:
            return Plan()
        runner.last_seen = self.wall()
        back = runner.grace_until != 0.0        # its first answer since a restart: it may take work now
        self.registry.heard(runner)
        if runner.running == running and not back:
            # the common pong: nothing to reconcile. Only a slot freed by a
            # refused `run` can be waiting for it (see refused)
            return self.assign(now) if self._queue and self.registry.free else Plan()
        plan = self._reconcile(runner, set(running), since=sent_at)
        plan += self.assign(now)
        return plan

    def missed(self, name: str, why: str, now: float) -> Plan:
        """A ping went out to the runner and got no answer within its interval
        (a timeout, a reset, no route to the host: anything but a refusal).
        ``heartbeat_misses`` of them in a row and the runner is lost."""
        runner = self.registry.live(name)
        if runner is None or self.registry.missed(runner) < self.heartbeat_misses:
            return Plan()
        return self.lost(name, f"{runner.misses} pings in a row unanswered (the last: {why})", now)

    def unreachable(self, name: str, why: str, now: float) -> Plan:
        """Nothing listens at the runner's address (or what does cannot prove it
        is that runner): lost at once, unless it is known from before a restart
        and its window to come back is still open."""
        runner = self.registry.live(name)
        if runner is None or now < runner.grace_until:
            return Plan()
        return self.lost(name, why, now)

    def lost(self, name: str, why: str, now: float) -> Plan:
        """The runner is gone: its builds go back to the queue, or end `error`
        when they ran out of attempts."""
        runner = self.registry.live(name)
        plan = Plan()
        if runner is None:
            return plan
        self.registry.died(runner, now)
        plan.dead.append(runner)
        for build_id, attempt in sorted(runner.running):
            plan += self._take_back(runner, build_id, attempt, f"runner {name} lost: {why}")
        plan += self.assign(now)
        return plan

    def drain(self, name: str, draining: bool, now: float) -> Plan:
        """`tinyci drain` (True) or `resume` (False): a draining runner finishes
        what it runs and is handed nothing new. KeyError: no such runner."""
        runner = self.runners[name]
        runner.draining = draining
        self.registry.slots_changed(runner)
        return self.assign(now) if not draining else Plan()

    def is_current(self, build_id: int, attempt: int) -> bool:
        """True when (build, attempt) is the lease in force, or a cancelled build
        whose runner has not yet confirmed it stopped."""
        build = self.builds.get(build_id)
        return build is not None and build.attempt == attempt and build.runner is not None and (
            build.status is Status.RUNNING or build.status is Status.CANCELLED)

    def is_leased(self, build_id: int, attempt: int) -> bool:
        """True while (build, attempt) is handed out and running, not cancelled."""
        build = self.builds.get(build_id)
        return build is not None and build.attempt == attempt and build.status is Status.RUNNING

    def sending(self, build_id: int, attempt: int, now: float) -> bool:
        """The `run` for (build, attempt) goes out now: no pong judges the build
        until ``sent``. False when the lease ended meanwhile (nothing to send)."""
        if not self.is_leased(build_id, attempt):
            return False
        self._leased_at[build_id] = float("inf")
        self.builds[build_id].started_at = self.wall()
        return True

    def sent(self, build_id: int, attempt: int, now: float) -> None:
        """The runner acknowledged the `run` for (build, attempt), or its send
        ended without saying: a pong to a ping sent from ``now`` on judges it."""
        build = self.builds.get(build_id)
        if build is not None and build.attempt == attempt and build_id in self._leased_at:
            self._leased_at[build_id] = now

    def finish(self, build_id: int, attempt: int, status: Status, exit_code: int, now: float,
               finished_at: float | None = None) -> Plan | None:
        """A runner reported a result. None when the lease is stale. A cancel
        that was acknowledged wins over a result that raced it. ``finished_at``:
        the wall time it ended (default: now)."""
        if not self.is_current(build_id, attempt):
            return None
        build = self.builds.pop(build_id)
        self._leased_at.pop(build_id, None)
        runner = self.runners.get(build.runner or "")
        if runner is not None:
            runner.running.discard((build_id, attempt))
            self.registry.slots_changed(runner)
        plan = Plan()
        if build.status is not Status.CANCELLED:
            build.status = status
            build.exit_code = exit_code
            build.finished_at = self.wall() if finished_at is None else finished_at
            plan.finished.append(build)
        plan += self.assign(now)
        return plan

    def cancel(self, build_id: int, now: float) -> Plan | None:
        """Cancel an active build; None when it is not active. A running one
        keeps its runner's slot until the runner confirms it stopped."""
        build = self.builds.get(build_id)
        if build is None or build.status is Status.CANCELLED:
            return None
        plan = Plan()
        was = build.status
        build.status = Status.CANCELLED
        build.finished_at = self.wall()
        plan.finished.append(build)
        if was is Status.QUEUED:
            self._drop(build_id)
        else:
            runner = self.runners.get(build.runner or "")
            if runner is not None and runner.alive:
                plan.cancel.append((runner, build_id, build.attempt))
            else:
                self._drop(build_id)
        return plan

    def assign(self, now: float) -> Plan:
        """Hand queued builds, oldest first, to live runners with a free slot and
        every label the build needs, the runner free the longest first. A build
        no runner can take yet is skipped, not allowed to block the ones behind it."""
        plan = Plan()
        free = self.registry.free
        waiting: list[int] = []
        blocked: set[tuple] = set()     # label sets no free runner offers, this time round
        while self._queue and free:
            build_id = heapq.heappop(self._queue)
            build = self.builds.get(build_id)
            if build is None or build.status is not Status.QUEUED:
                continue
            if not build.labels:
                runner = next(iter(free.values()))
            elif build.labels in blocked:
                runner = None
            else:
                runner = next((r for r in free.values() if can_take(r.labels, build.labels)), None)
            if runner is None:
                blocked.add(build.labels)
                waiting.append(build_id)
                continue
            build.status = Status.RUNNING
            build.attempt += 1
            build.runner = runner.name
            build.started_at = self.wall()
            build.finished_at = None
            self._leased_at[build_id] = now
            runner.running.add((build.id, build.attempt))
            self.registry.slots_changed(runner)
            plan.assign.append((build, runner))
        for build_id in waiting:
            heapq.heappush(self._queue, build_id)
        return plan

    def refused(self, build_id: int, attempt: int, why: str, now: float) -> Plan:
        """The runner answered `run` with an error (busy): put the build back
        without counting it as a lost attempt."""
        build = self.builds.get(build_id)
        if build is None or build.attempt != attempt or build.status is not Status.RUNNING:
            return Plan()
        runner = self.runners.get(build.runner or "")
        if runner is not None:
            runner.running.discard((build_id, attempt))
            self.registry.slots_changed(runner)
        self._requeue(build)
        plan = Plan(requeued=[(build, f"attempt {attempt} not started: {why}")])
        # not assigning here: the same runner would be picked again at once;
        # its next pong frees the slot honestly
        return plan

    # ------------------------------------------------------------ internals

    def _reconcile(self, runner: RunnerRecord, reported: set, since: float) -> Plan:
        plan = Plan()
        reported = {tuple(lease) for lease in reported}
        for build_id, attempt in sorted(runner.running - reported):
            build = self.builds.get(build_id)
            if build is not None and self._leased_at.get(build_id, -float("inf")) >= since \
                    and build.status is Status.RUNNING:
                continue
            plan += self._take_back(runner, build_id, attempt, f"runner {runner.name} is not running it")
        for build_id, attempt in sorted(reported - runner.running):
            plan.cancel.append((runner, build_id, attempt))
        return plan

    def _take_back(self, runner: RunnerRecord, build_id: int, attempt: int, why: str) -> Plan:
        runner.running.discard((build_id, attempt))
        self.registry.slots_changed(runner)
        build = self.builds.get(build_id)
        if build is None or build.attempt != attempt:
            return Plan()
        return self._lost(build, why)

    def _lost(self, build: Build, why: str) -> Plan:
        """The current lease of ``build`` is over without a result: queue it
        again, or give up when it has had max_attempts."""
        plan = Plan()
        build_id, attempt = build.id, build.attempt
        if build.status is Status.CANCELLED:
            self._drop(build_id)               # its runner is gone, so it has stopped
            return plan
        if build.attempt >= self.max_attempts:
            self._drop(build_id)
            build.status = Status.ERROR
            build.exit_code = -1
            plan.errored.append((build, f"{why}; gave up after {build.attempt} attempts (runner lost)"))
            plan.finished.append(build)
            return plan
        self._requeue(build)
        plan.requeued.append((build, f"attempt {attempt} taken back: {why}"))
        return plan

    def _drop(self, build_id: int) -> None:
        del self.builds[build_id]
        self._leased_at.pop(build_id, None)

    def _requeue(self, build: Build) -> None:
        build.status = Status.QUEUED
        build.runner = None
        build.started_at = None
        self._leased_at.pop(build.id, None)
        heapq.heappush(self._queue, build.id)
