"""The dispatcher daemon: owns the queue, the build records and the runner
registry, and hands commits to runners.

Receives: ``commit`` (observer); ``register``, ``log``, ``artifact``,
``result`` (runners); ``trigger``, ``rebuild``, ``cancel``, ``drain``,
``resume``, ``forget``, ``gc`` (operator); ``status``, ``build``,
``read_log``, ``watch``, ``artifacts``, ``fetch_artifact``, ``read_artifact`` (tools, answered
by ``queries``). Sends to runners (``runnerlinks``): ``run``, ``ping``,
``cancel``.

This module is the adapter: it decodes a request, asks the plain logic
(``intake`` for what a commit becomes, ``Scheduler`` for who runs what,
``BuildLogs`` for the log bytes), persists, and sends. The requests of one
kind each live in a class of their own: ``deliveries`` (what a runner
sends for a build it holds), ``triggers`` (trigger, rebuild, the schedule),
``maintenance`` (drain, resume, forget, gc), ``queries`` (reads). Every state change is
committed to SQLite before anyone is told about it. Work is assigned when
something happens (a commit, a registration, a result, a dead runner); the
only timers are the heartbeat and the schedule (``schedule``: builds at set
times, reason ``schedule``). When a build ends, the ``notify.on_finish``
commands run in the background (``on_finish``). A build with ``.ci.yaml``
``needs`` joins the scheduler only once they passed: ``needs.Held`` holds it
meanwhile, and decides, each time a build ends, which held builds go to the
queue and which end ``skipped``.

Two clocks: ``clock`` (wall time) stamps what people read (created_at and
the like); ``monotonic`` is the scheduler's ``now`` and every deadline's,
so a step of the wall clock changes nothing.

Its disk fills without a crash: build-log and artifact bytes are refused
with ``disk_full`` before the reserve (``dispatcher.min_free_bytes``,
``DiskSpace``) is touched; a runner so refused sends its result, recorded
with a note where its log stops, and its slot is free for the next build.
State changes go on inside the reserve; should SQLite itself find the disk
full, the request gets ``disk_full`` and its sender retries. Such troubles
are ``conditions``: one log line, not a traceback a second, and shown by
``status``. ``Retention`` deletes old builds in the background.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable

from . import daemon, intake, needs, net, on_finish, protocol
from .artifacts import Artifacts
from .buildlogs import BuildLogs
from .config import ConfigError
from .conditions import Conditions
from .deliveries import Deliveries
from .diskspace import DiskSpace
from .maintenance import Maintenance
from .models import Build, RunnerRecord, Status
from .queries import Queries
from .retention import Retention
from .runnerlinks import RunnerLinks
from .scheduler import Plan, Scheduler
from .settings import Settings
from .store import Store, StoreError, is_locked
from .triggers import Triggers
from .watchers import Watchers

log = logging.getLogger(__name__)

# nobody talks to the dispatcher as the dispatcher: it proves itself to runners with their keys
ACCEPTS = frozenset({protocol.RUNNER, protocol.OBSERVER, protocol.OPERATOR, protocol.READER})


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.time,
                 dial: Callable[[RunnerRecord], net.Client] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        """``dial`` makes the connection to a runner (default: a net.Client)."""
        self.settings = settings
        self.config = config = settings.config
        self.store = store
        self.clock, self.monotonic = clock, monotonic
        cfg = config.dispatcher
        self.sched = Scheduler(cfg.heartbeat_interval, cfg.heartbeat_misses, cfg.max_attempts, wall=clock)
        self.tasks: set[asyncio.Task] = set()
        self.watchers = Watchers()
        self.held = needs.Held()
        self.conditions = Conditions(log, on_change=self._conditions_changed)
        self.disk = DiskSpace(store.dir, cfg.min_free_bytes, self.conditions)
        self.artifacts = Artifacts(store)
        self.logs = BuildLogs(store.dir / "logs", cfg.max_log_bytes, on_error=self.disk.lost_line,
                              secrets=lambda build: settings.secrets_for(build.secrets, build.branch).values())
        self.retention = Retention(store, config.retention, clock=clock, active=lambda: list(self.sched.builds))
        self.links = RunnerLinks(settings, self.sched, store, self.logs, self.artifacts, self.watchers,
                                 apply=self.apply, spawn=self._spawn, monotonic=monotonic, dial=dial)
        queries = Queries(store, self.sched, self.logs, self.artifacts, self.watchers, self.conditions,
                          self.held.builds)
        self.triggers = Triggers(config, store, self._admit, clock, pipelines=settings.pipelines)
        self.deliveries = delivered = Deliveries(
            self.sched, store, self.logs, self.artifacts, self.disk, self.watchers, cfg.max_artifact_bytes,
            self._note, self.apply, monotonic)
        upkeep = Maintenance(self.sched, store, self.links, self.retention, config.retention, self.disk,
                             self.watchers, self.apply, monotonic)
        self.handlers = {
            "commit": self.on_commit, "register": self.on_register, "cancel": self.on_cancel,
            "log": delivered.on_log, "artifact": delivered.on_artifact, "result": delivered.on_result,
            "trigger": self.triggers.on_trigger, "rebuild": self.triggers.on_rebuild,
            "drain": upkeep.on_drain, "resume": upkeep.on_drain, "forget": upkeep.on_forget, "gc": upkeep.on_gc,
            "status": queries.status, "build": queries.build, "read_log": queries.read_log,
            "watch": queries.watch, "artifacts": queries.list_artifacts,
            "fetch_artifact": queries.fetch_artifact, "read_artifact": queries.read_artifact,
            "history": queries.history,
            "branch_status": queries.branch_status, "log_window": queries.log_window,
            "counts": queries.counts,
        }

    # ------------------------------------------------------------ lifecycle

    def recover(self) -> None:
        """Load what a previous run left: queued builds queue again, running
        ones stay with their runner until its next pong confirms them."""
        active = self.store.active()
        runners = self.store.runners()
        # builds that wait for their needs are held again (or go on, if what they waited for ended)
        load, decided = self.held.recover(active, self.store.commit_builds)
        plan = self.sched.load(load, runners, self.monotonic())
        plan += self._follow(needs.Decision(skip=decided.skip))
        running = sum(1 for b in active if b.status is Status.RUNNING)
        if active:
            log.info("recovered %d queued (%d waiting for their needs) and %d running builds, %d known runners",
                     len(active) - running, len(self.held.builds), running, sum(r.alive for r in runners))
        self.apply(plan)

    async def serve(self, stop: asyncio.Event, insecure: bool = False) -> None:
        cfg, settings = self.config.dispatcher, self.settings
        daemon.check_exposure("dispatcher", cfg.host, settings, ACCEPTS, insecure)
        server = await daemon.listen(
            lambda: net.serve(self.handle, cfg.host, cfg.port, keys=settings.key, roles=ACCEPTS,
                              identity=protocol.DISPATCHER_ID, limits=settings.limits, name="dispatcher",
                              ssl=settings.server_tls),
            "dispatcher", cfg.host, cfg.port)
        host, port = server.sockets[0].getsockname()[:2]
        daemon.announce("dispatcher", host, port, f" (data in {self.store.dir})")
        beat = asyncio.create_task(self.links.heartbeat_loop(stop))
        timed = asyncio.create_task(self.triggers.schedule_loop(stop))
        self._spawn(self.retention.run(stop))
        self._spawn(self.disk.watch(stop))
        self._spawn(self.logs.keep_times(self.store.add_log_times, stop))
        try:
            await stop.wait()
        finally:
            server.close()
            self.links.beat.stopped = True      # a ping failing from here on is not sent again
            beat.cancel()
            timed.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(beat, timed, *self.tasks, return_exceptions=True)
            await self.links.close()
            self.logs.save_times(self.store.add_log_times)     # last: every frame handled has its time

    def _conditions_changed(self) -> None:
        if self.watchers.active:
            self.watchers.event("conditions", conditions=self.conditions.active())
        self.watchers.touch()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------ applying plans

    def apply(self, plan: Plan | None) -> None:
        """Persist a plan in one transaction, then start the sends it asks for.
        Assignments are persisted and sent by the hand-out, a moment later."""
        # every attempt that ends passes here, its plan empty or not (a result, a lost runner, a cancel, a stop)
        self.artifacts.settle(self.sched.is_leased)
        if not plan:
            return
        for build, why in plan.requeued:
            self._note(build.id, f"--- {why}; queued again ---")
        for build, why in plan.errored:
            self._note(build.id, f"--- build error: {why} ---")
        builds = {b.id: b for b, _ in plan.requeued + plan.errored}
        builds.update((b.id, b) for b in plan.finished)
        for build, _ in plan.assign:
            builds.pop(build.id, None)          # saved as handed out, with its log_base
        unsaved = [b for i, b in builds.items() if i not in plan.saved]
        if unsaved or plan.dead:
            with self.store.transaction():
                self.store.save(unsaved)
                self.store.save_runners(plan.dead)
        for runner in plan.dead:
            log.warning("runner %s (%s:%d) is dead", runner.name, runner.host, runner.port)
            self.links.let_go(runner)
        for build, why in plan.requeued:
            log.info("build %d queued again: %s", build.id, why)
        for build, why in plan.errored:
            log.warning("build %d: %s", build.id, why)
        for build in plan.finished:
            self._finished(build)
        if plan.assign:
            self.links.assign(plan.assign)
        for runner, build_id, attempt in plan.cancel:
            self.links.cancel(runner, build_id, attempt)
        if self.watchers.active:
            # a finished build's test counts (its JUnit reports), so the console and web show them at once
            tests = self.store.test_counts([b.id for b in builds.values() if b.status.final])
            for build in builds.values():
                self.watchers.event("build", build={**build.summary(),
                                                    **({"tests": tests[build.id]} if build.id in tests else {})})
            for runner in plan.dead:
                self.watchers.event("runner", runner=runner.summary())
        self.watchers.touch()
        if plan.finished and self.held.builds:
            self.apply(self._settle(plan.finished))

    # ------------------------------------------------------------ needs

    def _settle(self, ended: list[Build]) -> Plan:
        """The held builds of the commits of ``ended`` (all persisted): those
        whose needs all passed join the queue, those with one that did not end skipped."""
        plan = Plan()
        for repo, sha in dict.fromkeys((b.repo, b.sha) for b in ended):
            decided = self.held.settle(repo, sha, self.store.commit_builds(repo, sha))
            plan += self._follow(decided, "=== the builds it needs passed: queued ===")
            if self.watchers.active:    # what the released and the still held wait for now
                for build in [*decided.run, *(b for b in self.held.builds.values() if (b.repo, b.sha) == (repo, sha))]:
                    self.watchers.event("build", build=build.summary())
        return plan

    def _follow(self, decided: needs.Decision, note: str = "") -> Plan:
        """Released builds to the scheduler; those whose needs did not pass end
        ``skipped`` (persisted by ``apply``, like every build a plan finishes)."""
        plan = Plan()
        for build in decided.run:
            if note:
                self._note(build.id, note)
            plan += self.sched.add(build, self.monotonic())
        for build, why in decided.skip:
            build.status, build.finished_at = Status.SKIPPED, self.clock()
            self._note(build.id, f"=== skipped: {why} ===")
            log.info("build %d (%s) skipped: %s", build.id, build.job, why)
            plan.finished.append(build)
        return plan

    def _note(self, build_id: int, text: str) -> int:
        """A line of the dispatcher's own in a build's log."""
        build = self.sched.builds.get(build_id)
        # an attempt whose `run` went out may still send log frames (a cancel): see BuildLogs.line
        sending = build is not None and self.sched.is_current(build_id, build.attempt) \
            and not self.links.is_unsent(build_id)
        return self.logs.line(build_id, text, build if sending else None)

    def _finished(self, build: Build) -> None:
        """Start the notify.on_finish commands for a build that ended; never waited for."""
        cfg = self.config.notify
        if not cfg.on_finish:
            return
        env = on_finish.environment(build.summary(), str(self.logs.path(build.id).absolute()))
        for command in cfg.on_finish:
            self._spawn(on_finish.run(command, env, cfg.timeout, f"build {build.id}"))

    def _admit(self, request: intake.Request) -> tuple[list[Build], list[Build]]:
        """Store the builds a request asks for, all or none, and do what
        intake.admit says follows. Returns (builds, those newly created)."""
        stamp = self.clock()
        request = request.checked(self.settings.secret_problem)
        with self.store.transaction():
            stored = [self.store.add_build(**row, now=stamp) for row in request.rows()]
        builds = [build for build, _ in stored]
        created = [build for build, duplicate in stored if not duplicate]
        then = intake.admit(request, created, self.sched.builds.values(), self.config.dispatcher.supersede)
        for build_id, text in then.lines:
            self._note(build_id, text)
        for build in then.failed:
            self._finished(build)
        plan = Plan()
        for old, text in then.supersede:
            cancelled = self.sched.cancel(old.id, self.monotonic())
            if cancelled:
                self._note(old.id, text)
                log.info("build %d superseded by build %d on %s", old.id, then.queue[0].id, old.branch)
                plan += cancelled
        if then.queue:          # to the scheduler, or held for their needs
            plan += self._follow(self.held.admit(then.queue, self.store.commit_builds))
        for build in then.queue:
            if build.held:
                self._note(build.id, f"=== waiting for {build.held} (needs) ===")
        if self.watchers.active:        # after the holding: a held build's summary says what it waits for
            for build in created:
                self.watchers.event("build", build=build.summary())
        self.apply(plan)
        self.watchers.touch()
        return builds, created

    # ------------------------------------------------------------ requests

    async def handle(self, conn: net.Connection, msg: dict) -> dict | None:
        handler = self.handlers.get(msg["type"])
        if handler is None:
            return protocol.error("unsupported", f"the dispatcher does not handle {msg['type']!r}")
        try:
            return await handler(conn, msg)
        except (sqlite3.OperationalError, OSError) as exc:
            # expected troubles, not bugs: a condition (one line), and an error its sender retries
            refusal = self.disk.refusal(exc)
            if refusal is None and isinstance(exc, sqlite3.OperationalError) and is_locked(exc):
                self.conditions.report("db_locked", "database locked by another process",
                                       f"{self.store.path}: {exc}; requests that write wait for it")
                refusal = protocol.error("busy", f"the dispatcher's database is locked by another process ({exc})")
            if refusal is None:
                raise
            return refusal

    async def on_commit(self, conn: net.Connection, msg: dict) -> dict:
        allowed = self.config.dispatcher.repos
        if allowed and msg["repo"] not in allowed:
            log.warning("refused a commit from %s for repository %r: not in dispatcher.repos",
                        conn.peer, msg["repo"][:200])
            return protocol.error("forbidden_repo", f"this dispatcher does not build {msg['repo'][:200]!r} "
                                                    f"(not in its dispatcher.repos)")
        jobs, problem = intake.commit_jobs(msg.get("jobs"), msg.get("config_error", ""),
                                           self.settings.pipeline(msg["repo"]))
        request = intake.Request(
            repo=msg["repo"], branch=msg["branch"], sha=msg["sha"], subject=msg["subject"],
            author=msg["author"], commit_time=msg["time"], jobs=jobs, config_error=problem,
            skip=intake.skip_marker(msg.get("message") or msg["subject"]))
        builds, created = self._admit(request)
        return protocol.ok(build=builds[0].id, builds=[b.id for b in builds], duplicate=not created)

    async def on_register(self, conn: net.Connection, msg: dict) -> dict:
        name = msg["name"]
        if name != conn.id:
            return protocol.error("not_yours", f"this connection authenticated as runner {conn.id!r}; "
                                               f"it cannot register as {name!r}")
        # a runner that registers from 0.0.0.0 is reached at the address it came from
        host = msg["host"] if msg["host"] not in ("", "0.0.0.0", "::") else conn.peer.rsplit(":", 1)[0]
        holder = await self.links.taken_by(name, host, msg["port"])
        if holder:
            log.warning("refused runner %s registering from %s:%d: a live runner at %s holds the name",
                        name, host, msg["port"], holder)
            return protocol.error("name_taken", f"runner name {name!r} is held by a live runner at "
                                                f"{holder}; give this runner another name")
        # no await since taken_by: nobody else registers the name in between
        known = name in self.sched.runners
        plan = self.sched.register(name, host, msg["port"], tuple(msg["labels"]), msg["slots"],
                                   {tuple(x) for x in msg.get("running", [])}, self.monotonic())
        runner = self.sched.runners[name]
        with self.store.transaction():
            self.store.save_runners([runner])
        log.info("runner %s %s at %s:%d (slots %d, labels %s)", name, "re-registered" if known else "registered",
                 host, msg["port"], msg["slots"], ",".join(msg["labels"]) or "-")
        self.watchers.event("runner", runner=runner.summary())
        self.apply(plan)
        return protocol.ok(heartbeat_interval=self.config.dispatcher.heartbeat_interval)

    async def on_cancel(self, conn: net.Connection, msg: dict) -> dict:
        build_id = msg["build"]
        plan = self.sched.cancel(build_id, self.monotonic())
        held = self.held.drop(build_id) if plan is None else None
        if held is not None:        # waiting for its needs: it ends here, and what needed it is skipped
            held.status, held.finished_at = Status.CANCELLED, self.clock()
            plan = Plan(finished=[held])
        if plan is None:
            build = self.store.get(build_id)
            if build is None:
                return protocol.error("not_found", f"no build {build_id}")
            return protocol.error("finished", f"build {build_id} is already {build.status.value}")
        who = f"{msg['by']} ({conn.role} at {conn.peer})" if msg.get("by") else f"{conn.role} at {conn.peer}"
        self._note(build_id, f"=== cancelled by {who}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===")
        self.apply(plan)
        return protocol.ok(builds=[build_id])

# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    daemon.add_common_arguments(parser, 8888)
    parser.add_argument("--data", metavar="DIR",
                        help="where the database and build logs live (default .tinyci/dispatcher)")


def main(args: argparse.Namespace) -> int:
    overrides = {"dispatcher": {"host": args.host, "port": args.port, "data_dir": args.data}}

    async def body(stop: asyncio.Event) -> None:
        settings = daemon.load_config(args, overrides, ACCEPTS)
        try:
            store = Store(Path(settings.config.dispatcher.data_dir))
        except StoreError as exc:
            raise daemon.StartupError(str(exc)) from None
        try:
            try:
                dispatcher = Dispatcher(settings, store)
            except OSError as exc:      # the logs directory beside the database
                raise daemon.StartupError(f"cannot use data dir {store.dir}: {exc}") from None
            try:
                dispatcher.triggers.timed = dispatcher.triggers.schedules()
            except ConfigError as exc:
                raise daemon.StartupError(f"configuration error: {exc}") from None
            dispatcher.recover()
            await dispatcher.serve(stop, args.insecure)
        finally:
            store.close()

    return daemon.run("dispatcher", body, args.verbose, args.log_file)


if __name__ == "__main__":
    import sys
    from .cli import main as cli
    sys.exit(cli(["dispatcher", *sys.argv[1:]]))
