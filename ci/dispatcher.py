"""The dispatcher daemon: owns the queue, the build records and the runner
registry, and hands commits to runners.

Receives: ``commit`` (observer); ``register``, ``log``, ``artifact``,
``result`` (runners); ``trigger``, ``rebuild``, ``cancel``, ``drain``,
``resume``, ``forget``, ``gc`` (operator); ``status``, ``build``,
``read_log``, ``watch``, ``artifacts``, ``fetch_artifact`` (tools, answered
by ``queries``). Sends to runners (``runnerlinks``): ``run``, ``ping``,
``cancel``.

This module is the adapter: it decodes a request, asks the plain logic
(``intake`` for what a commit becomes, ``Scheduler`` for who runs what,
``BuildLogs`` for the log bytes), persists, and sends. Every state change is
committed to SQLite before anyone is told about it. Work is assigned when
something happens (a commit, a registration, a result, a dead runner); the
only timers are the heartbeat and the schedule (``schedule``: builds at set
times, reason ``schedule``). When a build ends, the ``notify.on_finish``
commands run in the background (``on_finish``).

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

from . import aio, buildfile, daemon, gitops, intake, net, on_finish, protocol, schedule
from .artifacts import ArtifactError, Artifacts
from .buildlogs import BuildLogs, LogGap
from .config import ConfigError
from .conditions import Conditions
from .diskspace import DISK_FULL, FULL_ERRNOS, DiskSpace, LogCuts
from .models import Build, RunnerRecord, Status
from .queries import Queries
from .retention import Retention
from .runnerlinks import RunnerLinks
from .scheduler import Plan, Scheduler
from .settings import Settings
from .store import Store, StoreError, is_locked
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
        self.conditions = Conditions(log, on_change=self._conditions_changed)
        self.disk = DiskSpace(store.dir, cfg.min_free_bytes, self.conditions)
        self.cuts = LogCuts()
        self.artifacts = Artifacts(store)
        self.logs = BuildLogs(store.dir / "logs", cfg.max_log_bytes, on_error=self.disk.lost_line)
        self.retention = Retention(store, config.retention, clock=clock, active=lambda: list(self.sched.builds))
        self.links = RunnerLinks(settings, self.sched, store, self.logs, self.artifacts, self.watchers,
                                 apply=self.apply, spawn=self._spawn, monotonic=monotonic, dial=dial)
        queries = Queries(store, self.sched, self.logs, self.artifacts, self.watchers, self.conditions)
        self.timed: schedule.Schedules | None = None     # set by main from the configuration
        self.handlers = {
            "commit": self.on_commit, "register": self.on_register, "log": self.on_log,
            "artifact": self.on_artifact, "result": self.on_result, "cancel": self.on_cancel,
            "trigger": self.on_trigger, "rebuild": self.on_rebuild,
            "drain": self.on_drain, "resume": self.on_drain, "forget": self.on_forget, "gc": self.on_gc,
            "status": queries.status, "build": queries.build, "read_log": queries.read_log,
            "watch": queries.watch, "artifacts": queries.list_artifacts,
            "fetch_artifact": queries.fetch_artifact, "history": queries.history,
            "branch_status": queries.branch_status, "log_window": queries.log_window,
            "counts": queries.counts,
        }

    # ------------------------------------------------------------ lifecycle

    def recover(self) -> None:
        """Load what a previous run left: queued builds queue again, running
        ones stay with their runner until its next pong confirms them."""
        active = self.store.active()
        runners = self.store.runners()
        plan = self.sched.load(active, runners, self.monotonic())
        running = sum(1 for b in active if b.status is Status.RUNNING)
        if active:
            log.info("recovered %d queued and %d running builds, %d known runners",
                     len(active) - running, running, sum(r.alive for r in runners))
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
        timed = asyncio.create_task(self.schedule_loop(stop))
        self._spawn(self.retention.run(stop))
        self._spawn(self.disk.watch(stop))
        try:
            await stop.wait()
        finally:
            server.close()
            beat.cancel()
            timed.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(beat, timed, *self.tasks, return_exceptions=True)
            await self.links.close()

    # ------------------------------------------------------------ scheduled builds

    def schedules(self) -> schedule.Schedules:
        """The configured schedule with its saved fire times (ConfigError for a bad entry)."""
        cfg = self.config.schedule
        return schedule.Schedules(schedule.parse(cfg.builds), schedule.zone(cfg.timezone),
                                  self.store.schedule_times(), self.store.save_schedule_time)

    async def schedule_tick(self, timed: schedule.Schedules) -> float:
        """Queue a build (reason schedule) for each entry due now; returns the seconds to the next look."""
        now = self.clock()
        for entry in timed.due(now):
            for job in entry.jobs or (None,):
                try:
                    builds = await self.trigger(None, entry.branch, entry.repo, job, reason="schedule")
                except intake.RevisionError as exc:
                    log.warning("scheduled build %s not queued: %s", entry.describe(), exc.message)
                    continue
                log.info("scheduled %s: build(s) %s", entry.describe(), ", ".join(str(b.id) for b in builds))
        return timed.wait(self.clock())

    async def schedule_loop(self, stop: asyncio.Event) -> None:
        timed = self.timed
        if timed is None or not timed.entries:
            return
        while not stop.is_set():
            try:
                pause = await self.schedule_tick(timed)
            except Exception:       # a store or git failure: log it, the next look may work
                log.exception("scheduled builds: the check failed")
                pause = schedule.CHECK_EVERY
            try:
                await aio.within(stop.wait(), pause)
            except asyncio.TimeoutError:
                pass

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
        # every attempt that ends passes here (a result, a lost runner, a cancel, a requeue)
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
        if builds or plan.dead:
            with self.store.transaction():
                self.store.save(builds.values())
                self.store.save_runners(plan.dead)
        for runner in plan.dead:
            log.warning("runner %s (%s:%d) is dead", runner.name, runner.host, runner.port)
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
            for build in builds.values():
                self.watchers.event("build", build=build.summary())
            for runner in plan.dead:
                self.watchers.event("runner", runner=runner.summary())
        self.watchers.touch()

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
        with self.store.transaction():
            stored = [self.store.add_build(**row, now=stamp) for row in request.rows()]
        builds = [build for build, _ in stored]
        created = [build for build, duplicate in stored if not duplicate]
        then = intake.admit(request, created, self.sched.builds.values(), self.config.dispatcher.supersede)
        for build_id, text in then.lines:
            self._note(build_id, text)
        for build in then.failed:
            self._finished(build)
        if self.watchers.active:
            for build in created:
                self.watchers.event("build", build=build.summary())
        plan = Plan()
        for old, text in then.supersede:
            cancelled = self.sched.cancel(old.id, self.monotonic())
            if cancelled:
                self._note(old.id, text)
                log.info("build %d superseded by build %d on %s", old.id, then.queue[0].id, old.branch)
                plan += cancelled
        for build in then.queue:
            plan += self.sched.add(build, self.monotonic())
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
        request = intake.Request(
            repo=msg["repo"], branch=msg["branch"], sha=msg["sha"], subject=msg["subject"],
            author=msg["author"], commit_time=msg["time"], jobs=msg.get("jobs") or intake.DEFAULT_JOBS,
            config_error=msg.get("config_error", ""),
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

    async def on_log(self, conn: net.Connection, msg: dict) -> dict:
        build_id = msg["build"]
        refused = _not_held(self.sched, conn, msg)
        if refused:
            return refused
        build = self.sched.builds[build_id]
        self._check_log(build)
        data = msg["data"] if isinstance(msg["data"], bytes) else msg["data"].encode()
        fitted = self.disk.fitting(data)        # up to the reserve; the rest is refused with the next frame
        if data and not fitted:
            return self._cut_log(build)
        data = fitted
        try:
            have, grew = self.logs.append(build, msg["offset"], data)
        except LogGap as gap:
            return protocol.error("offset", f"log of build {build_id} has {gap.expected} bytes, "
                                            f"not {msg['offset']}", expected=gap.expected)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            self.disk.exhausted(f"the log of build {build_id} could not be written ({exc.strerror})")
            return self._cut_log(build)
        if grew:
            self.watchers.touch()
        return protocol.ok(offset=have)

    def _check_log(self, build: Build) -> None:
        """A log file removed or cut short under us: noted in the log, and the attempt goes on."""
        note = self.logs.check(build)
        if note:
            log.warning("build %d: its log file was removed or cut short under the dispatcher; the "
                        "attempt goes on, the log says so", build.id)
            with self.store.transaction():
                self.store.save([build])        # its new base: the runner's offsets still match after a restart

    def _cut_log(self, build: Build) -> dict:
        """Refuse the rest of an attempt's log: the disk is down to its reserve.
        Its runner sends the result next, recorded with a note where the log stops."""
        if self.cuts.cut(build.id, build.attempt):
            log.info("build %d attempt %d: the log stops at %d bytes: the dispatcher's disk is full",
                     build.id, build.attempt, self.logs.attempt_size(build))
        return protocol.error(DISK_FULL, f"{self.disk.message()}: the rest of the log of build {build.id} is "
                                         f"not stored; send the result")

    async def on_result(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        refused = _not_held(self.sched, conn, msg)
        if refused:
            return refused
        build = self.sched.builds[build_id]
        self._check_log(build)
        have = self.logs.attempt_size(build)
        if have < msg.get("log_size", 0) and not self.cuts.is_cut(build_id, attempt):
            return protocol.error("offset", f"log of build {build_id} is incomplete ({have} bytes)", expected=have)
        status = Status(msg["status"])
        was_cancelled = build.status is Status.CANCELLED
        # the first write: should the disk be too full for the database, nothing has changed yet
        self.store.save_steps(build_id, msg.get("step_results"))
        cut = self.cuts.note(build_id, attempt, msg.get("log_size", 0) - have)
        if cut:
            self._note(build_id, cut)
        plan = self.sched.finish(build_id, attempt, status, msg["exit_code"], self.monotonic())
        if was_cancelled:
            self._note(build_id, f"=== cancelled (the runner reported {status.value} as it stopped) ===")
        else:
            self._note(build_id, f"=== {status.value} (exit {msg['exit_code']}) in "
                                 f"{msg['duration']:.2f}s on {build.runner} ===")
            log.info("build %d %s on %s", build_id, status.value, build.runner)
        self.apply(plan)
        return protocol.ok()

    async def on_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        refused = _not_held(self.sched, conn, msg)
        if refused:
            return refused
        data = msg["data"]          # bytes: the table takes them only from a bulk frame
        build = self.sched.builds[build_id]
        try:
            if not self.disk.room(len(data)):
                return self._leave_out(build, msg["path"])
            size = self.artifacts.write(build_id, build.sha, msg["path"], msg["offset"], data, msg["eof"],
                                        self.config.dispatcher.max_artifact_bytes, attempt)
        except ArtifactError as exc:
            log.warning("build %d: artifact %r refused: %s", build_id, msg["path"][:100], exc.message)
            return protocol.error(exc.code, exc.message)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                return protocol.error("internal", f"cannot store artifact {msg['path'][:100]!r}: {exc.strerror}")
            self.disk.exhausted(f"artifact {msg['path'][:100]!r} of build {build_id} could not be written "
                                f"({exc.strerror})")
            return self._leave_out(build, msg["path"])
        return protocol.ok(offset=size)

    def _leave_out(self, build: Build, path: str) -> dict:
        """An artifact that does not fit on the disk: left out, and the build's log says so
        (once: the runner's upload stops at the refusal)."""
        self._note(build.id, f"[artifact {path[:200]} left out: the dispatcher's disk is full]")
        return protocol.error(DISK_FULL, f"{self.disk.message()}: artifact {path[:100]!r} left out")

    async def on_cancel(self, conn: net.Connection, msg: dict) -> dict:
        build_id = msg["build"]
        plan = self.sched.cancel(build_id, self.monotonic())
        if plan is None:
            build = self.store.get(build_id)
            if build is None:
                return protocol.error("not_found", f"no build {build_id}")
            return protocol.error("finished", f"build {build_id} is already {build.status.value}")
        who = f"{msg['by']} ({conn.role} at {conn.peer})" if msg.get("by") else f"{conn.role} at {conn.peer}"
        self._note(build_id, f"=== cancelled by {who}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===")
        self.apply(plan)
        return protocol.ok(builds=[build_id])

    async def on_trigger(self, conn: net.Connection, msg: dict) -> dict:
        if not (msg.get("rev") or msg.get("branch")):
            return protocol.error("bad_request", "trigger needs a branch or a revision")
        try:
            builds = await self.trigger(msg.get("rev"), msg.get("branch"), msg.get("repo"), msg.get("job"))
        except intake.RevisionError as exc:
            return protocol.error(exc.code, exc.message)
        return protocol.ok(builds=[b.id for b in builds])

    async def trigger(self, rev: str | None, branch: str | None, repo: str | None = None, job: str | None = None,
                      reason: str = "manual") -> list[Build]:
        """Queue builds of the commit ``rev`` names, or of ``branch``'s head (all its
        jobs, or only ``job``), even if built before. The build records the branch
        (the one named, else one the commit is on); ``reason`` says why (manual,
        schedule). Raises intake.RevisionError (not_found, ambiguous)."""
        # the repositories it may build: those configured, else every one it has built
        known = list(self.config.dispatcher.repos) or self.store.repos()
        repo, sha = await aio.in_thread(intake.choose_repo, branch or rev, repo, known, gitops.resolve,
                                        "branch" if branch else "commit")
        (author, subject), text = await aio.in_thread(_commit_at, repo, sha)
        if not branch:
            branch = intake.trigger_branch(rev, sha, *await aio.in_thread(_branches, repo, rev, sha))
        # a manual trigger ignores [skip ci]; its jobs come from .ci.yaml at the commit, as for a push.
        # Checked in a thread: a file at the size cap takes up to a second or so
        jobs, problem = await aio.in_thread(intake.jobs_from, text)
        if job is not None and not problem:
            names = [j["name"] for j in jobs]
            if job not in names:
                shown = ", ".join(n or "(the default job)" for n in names)
                raise intake.RevisionError("not_found", f"commit {sha[:12]} has no job {job!r} (its jobs: {shown})")
            jobs = [j for j in jobs if j["name"] == job]
        builds, _ = self._admit(intake.Request(
            repo=repo, branch=branch, sha=sha, subject=subject or f"triggered {rev or branch}",
            author=author, reason=reason, jobs=jobs, config_error=problem, note=reason))
        return builds

    async def on_rebuild(self, conn: net.Connection, msg: dict) -> dict:
        old = self.store.get(msg["build"])
        if old is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        reason = f"rebuild of {old.id}"
        jobs, problem = [{"name": old.job, "labels": list(old.labels)}], ""
        if not old.job:         # a skipped or broken commit may have jobs now: read them as a trigger does
            text = await aio.in_thread(gitops.file_at, old.repo, old.sha, buildfile.FILENAME)
            jobs, problem = await aio.in_thread(intake.jobs_from, text)
        builds, _ = self._admit(intake.Request(
            repo=old.repo, branch=old.branch, sha=old.sha, subject=old.subject, author=old.author,
            reason=reason, jobs=jobs, config_error=problem, note=reason))
        return protocol.ok(builds=[b.id for b in builds])

    async def on_gc(self, conn: net.Connection, msg: dict) -> dict:
        dry_run = bool(msg.get("dry_run"))
        swept = await self.retention.sweep(dry_run)
        policy = self.config.retention
        if not dry_run:
            log.info("gc by %s at %s deleted %s", conn.role, conn.peer, swept)
            if swept.builds:
                self.disk.look()
        return protocol.ok(builds=swept.builds, log_bytes=swept.log_bytes, artifact_bytes=swept.artifact_bytes,
                           db_bytes=swept.db_bytes, days=float(policy.days), per_branch=policy.per_branch,
                           dry_run=dry_run)


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


def _not_held(sched: Scheduler, conn: net.Connection, msg: dict) -> dict | None:
    """The error refusing a log, result or artifact, or None when the
    connection is the runner holding that build attempt: ``stale`` for an
    attempt that is not current (its sender stops it), ``not_yours`` for
    the current attempt sent by another runner than the one holding it."""
    build_id, attempt = msg["build"], msg["attempt"]
    if not sched.is_current(build_id, attempt):
        return protocol.error("stale", f"build {build_id} attempt {attempt} is not current")
    holder = sched.builds[build_id].runner
    if holder != conn.id:
        log.warning("refused %s for build %d from %s (runner %s): the build is runner %s's",
                    msg["type"], build_id, conn.peer, conn.id or "-", holder)
        return protocol.error("not_yours", f"build {build_id} is not held by runner {conn.id!r}")
    return None


def _branches(repo: str, rev: str, sha: str) -> tuple[bool, list[str], list[str]]:
    """(``rev`` names a local branch, branches at ``sha``, branches containing it); blocking git reads."""
    at, containing = gitops.branches_of(repo, sha)
    return gitops.resolve(repo, f"refs/heads/{rev}") is not None, at, containing


def _commit_at(repo: str, sha: str) -> tuple[tuple[str, str], bytes | None]:
    """(author, subject) of a commit and its .ci.yaml (None: none); blocking git reads."""
    return gitops.commit_info(repo, sha), gitops.file_at(repo, sha, buildfile.FILENAME)


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
                dispatcher.timed = dispatcher.schedules()
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
