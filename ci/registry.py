"""The runners the dispatcher knows, as a plain class: their records, who
has a free slot, and the liveness facts that need no build (heard from,
missed a ping, restored after a restart, forgotten). Part of the scheduler's
rules (``Scheduler.registry``), split from it so each reads in one place:
no sockets, threads or disk, and ``now`` is the monotonic time passed in;
``wall`` only stamps what people read.
"""

from __future__ import annotations

from typing import Callable

from .models import RunnerRecord


class Registry:
    def __init__(self, wall: Callable[[], float]):
        self.wall = wall
        self.runners: dict[str, RunnerRecord] = {}
        # live runners with a free slot, the one free the longest first: a hand-out
        # looks here rather than at every runner. Kept by slots_changed.
        self.free: dict[str, RunnerRecord] = {}

    def restore(self, runners: list[RunnerRecord], now: float, window: float) -> None:
        """After a restart: the runners alive before it get ``window`` seconds to
        answer (no new work meanwhile); the dead keep the time they died, read
        from when they were last seen. No leases yet: the builds bring them."""
        wall = self.wall()
        for runner in runners:
            runner.running = set()
            runner.misses = 0
            if runner.alive:
                runner.grace_until = now + window
            else:       # dead since about when it was last seen: the one wall-clock reading kept
                runner.died_at = now - max(0.0, wall - runner.last_seen)
            self.runners[runner.name] = runner

    def register(self, name: str, host: str, port: int, labels: tuple, slots: int) -> RunnerRecord:
        """The record of a runner (re)registering, made or updated, and heard from."""
        runner = self.runners.get(name)
        if runner is None:
            runner = RunnerRecord(name, host, port, tuple(labels), slots)
            self.runners[name] = runner
        runner.host, runner.port, runner.labels, runner.slots = host, port, tuple(labels), slots
        runner.last_seen = runner.registered_at = self.wall()
        self.heard(runner)
        self.slots_changed(runner)      # its slots may be new, whatever its liveness
        return runner

    def live(self, name: str) -> RunnerRecord | None:
        """The runner called ``name`` when it is alive, else None."""
        runner = self.runners.get(name)
        return runner if runner is not None and runner.alive else None

    def heard(self, runner: RunnerRecord) -> None:
        """The runner answered (a pong, a registration): alive, no misses, no grace left."""
        if runner.alive and not runner.grace_until:
            runner.misses = 0       # the common pong: its liveness, so its free slots, unchanged
            return
        runner.alive, runner.misses, runner.grace_until, runner.died_at = True, 0, 0.0, None
        self.slots_changed(runner)

    def missed(self, runner: RunnerRecord) -> int:
        """One more ping unanswered; how many in a row now."""
        runner.misses += 1
        return runner.misses

    def died(self, runner: RunnerRecord, now: float) -> None:
        runner.alive = False
        runner.grace_until, runner.died_at = 0.0, now
        self.slots_changed(runner)

    def slots_changed(self, runner: RunnerRecord) -> None:
        """Call after a runner's leases, slots or liveness change. A runner that
        gains a free slot goes to the back of the line of free runners."""
        if runner.free > 0:
            self.free.setdefault(runner.name, runner)
        else:
            self.free.pop(runner.name, None)

    def in_grace(self, name: str, now: float) -> bool:
        """True while a runner known from before a restart has not answered and
        its window to come back is open."""
        runner = self.runners.get(name)
        return runner is not None and runner.alive and now < runner.grace_until

    def forget(self, name: str) -> RunnerRecord:
        """Remove a dead runner. KeyError: no such runner; ValueError: it is
        alive (only the dead are forgotten)."""
        runner = self.runners[name]
        if runner.alive:
            raise ValueError(name)
        del self.runners[name]
        self.free.pop(name, None)
        return runner

    def forgettable(self, after: float, now: float) -> list[str]:
        """Dead runners declared dead ``after`` seconds ago or longer (none when after <= 0)."""
        if after <= 0:
            return []
        return [r.name for r in self.runners.values()
                if not r.alive and r.died_at is not None and now - r.died_at >= after]
