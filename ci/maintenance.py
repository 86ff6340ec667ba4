"""The operator's upkeep requests: ``drain`` / ``resume`` (a runner finishes
what it runs and takes nothing new, or takes work again), ``forget`` (a dead
runner's record goes), ``gc`` (the retention sweep now, or what it would do).
"""

from __future__ import annotations

import logging
from typing import Callable

from . import net, protocol
from .config import RetentionConfig
from .diskspace import DiskSpace
from .retention import Retention
from .runnerlinks import RunnerLinks
from .scheduler import Plan, Scheduler
from .store import Store
from .watchers import Watchers

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, sched: Scheduler, store: Store, links: RunnerLinks, retention: Retention,
                 policy: RetentionConfig, disk: DiskSpace, watchers: Watchers,
                 apply: Callable[[Plan | None], None], monotonic: Callable[[], float]):
        self.sched, self.store, self.links, self.retention = sched, store, links, retention
        self.policy, self.disk, self.watchers = policy, disk, watchers
        self.apply, self.monotonic = apply, monotonic

    async def on_gc(self, conn: net.Connection, msg: dict) -> dict:
        dry_run = bool(msg.get("dry_run"))
        swept = await self.retention.sweep(dry_run)
        if not dry_run:
            log.info("gc by %s at %s deleted %s", conn.role, conn.peer, swept)
            if swept.builds:
                self.disk.look()
        return protocol.ok(builds=swept.builds, log_bytes=swept.log_bytes, artifact_bytes=swept.artifact_bytes,
                           db_bytes=swept.db_bytes, days=float(self.policy.days),
                           per_branch=self.policy.per_branch, dry_run=dry_run)

    async def on_drain(self, conn: net.Connection, msg: dict) -> dict:
        """drain: the runner finishes what it runs and takes nothing new; resume: it takes work again."""
        name, draining = msg["name"], msg["type"] == "drain"
        try:
            plan = self.sched.drain(name, draining, self.monotonic())
        except KeyError:
            return protocol.error("not_found", f"no runner named {name!r}")
        runner = self.sched.runners[name]
        with self.store.transaction():
            self.store.save_runners([runner])
        log.info("runner %s %s by %s at %s", name, "drained" if draining else "resumed", conn.role, conn.peer)
        self.watchers.event("runner", runner=runner.summary())
        self.apply(plan)
        return protocol.ok(runner=runner.summary())

    async def on_forget(self, conn: net.Connection, msg: dict) -> dict:
        name = msg["name"]
        runner = self.sched.runners.get(name)
        if runner is None:
            return protocol.error("not_found", f"no runner named {name!r}")
        if runner.alive:
            return protocol.error("runner_alive", f"runner {name} is alive ({runner.state.value}): only a dead "
                                                  f"runner can be forgotten; stop it first (drain it to let "
                                                  f"its builds finish)")
        await self.links.forget(name)
        log.info("runner %s forgotten by %s at %s", name, conn.role, conn.peer)
        return protocol.ok()
