"""The dispatcher daemon: owns the queue, the build records and the runner
registry, and hands commits to runners.

Receives: ``commit`` (observer); ``register``, ``log``, ``artifact``,
``result`` (runners); ``status``, ``build``, ``read_log``, ``watch``,
``artifacts``, ``fetch_artifact``, ``trigger``, ``rebuild``, ``cancel``
(tools). Sends to runners: ``run``, ``ping``, ``cancel``.

A commit becomes one build per ``.ci.yaml`` job (the observer reads the file
and sends the jobs; without them, one default job); a commit whose message
says ``[skip ci]`` or ``[ci skip]`` is recorded as one ``skipped`` build.
When a build ends, the ``notify.on_finish`` commands run in the background.

This module only decodes, calls the Scheduler, persists, and sends. Every
state change is committed to SQLite before anyone is told about it. Work is
assigned when something happens (a commit, a registration, a result, a dead
runner); the only timer is the heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import fnmatch
import logging
import subprocess
import time
from pathlib import Path
from typing import Callable

from . import aio, buildfile, daemon, net, notify, protocol
from .artifacts import ArtifactError, Artifacts
from .settings import Settings
from .logcap import LogCap
from .models import Build, Runner, Status, pipeline_status
from .text import utf8_boundary
from .scheduler import Plan, Scheduler
from .store import Store, StoreError

log = logging.getLogger(__name__)

LOG_CHUNK = 256 * 1024
ARTIFACT_CHUNK = 256 * 1024
SKIP_MARKERS = ("[skip ci]", "[ci skip]")
DEFAULT_JOBS = [{"name": buildfile.DEFAULT_JOB, "labels": []}]
# nobody talks to the dispatcher as the dispatcher: that secret is for what it sends runners
ACCEPTS = frozenset({protocol.RUNNER, protocol.OBSERVER, protocol.OPERATOR, protocol.READER})


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.config = config = settings.config
        self.store = store
        self.clock = clock
        cfg = config.dispatcher
        self.sched = Scheduler(cfg.heartbeat_interval, cfg.heartbeat_misses, cfg.max_attempts)
        self.secret = settings.secret(protocol.DISPATCHER)      # what it proves itself with to runners
        self.secrets = settings.secrets
        self.client_tls = settings.client_tls
        self.limits = settings.limits
        self.links: dict[str, net.Client] = {}      # runner name -> connection for run/ping/cancel
        self.tasks: set[asyncio.Task] = set()
        self.pinging: set[str] = set()
        self.changed = asyncio.Event()              # set and replaced on every change (log or state)
        self.watchers: set[asyncio.Queue] = set()
        self.artifacts = Artifacts(store)
        self.logcap = LogCap(store.logs, cfg.max_log_bytes)
        # bytes the current attempt of a running build has logged (LogCap.size), kept
        # so each `log` frame and `result` need not stat the files; dropped whenever
        # the dispatcher writes a line of its own, and rebuilt from disk when missing
        self.attempt_bytes: dict[int, int] = {}
        self.outgoing: list[tuple[Build, Runner, int]] = []    # assigned, not yet persisted and sent
        self.unsent: dict[str, set] = {}            # runner name -> leases of its assignments not yet sent
        self.handing_out: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    def recover(self) -> None:
        """Load what a previous run left: queued builds queue again, running
        ones stay with their runner until its next pong confirms them."""
        active = self.store.active()
        runners = self.store.runners()
        plan = self.sched.load(active, runners, self.clock())
        running = sum(1 for b in active if b.status is Status.RUNNING)
        if active:
            log.info("recovered %d queued and %d running builds, %d known runners",
                     len(active) - running, running, sum(r.alive for r in runners))
        self.apply(plan)

    async def serve(self, stop: asyncio.Event, insecure: bool = False) -> None:
        cfg = self.config.dispatcher
        daemon.check_exposure("dispatcher", cfg.host, self.settings, ACCEPTS, insecure)
        server = await daemon.listen(
            lambda: net.serve(self.handle, cfg.host, cfg.port, secrets=self.secrets, roles=ACCEPTS,
                              limits=self.limits, name="dispatcher", ssl=self.settings.server_tls),
            "dispatcher", cfg.host, cfg.port)
        host, port = server.sockets[0].getsockname()[:2]
        daemon.announce("dispatcher", host, port, f" (data in {self.store.dir})")
        beat = asyncio.create_task(self.heartbeat_loop(stop))
        try:
            await stop.wait()
        finally:
            server.close()
            beat.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(beat, *self.tasks, return_exceptions=True)
            for link in self.links.values():
                await link.close()

    # ------------------------------------------------------------ applying plans

    def apply(self, plan: Plan | None) -> None:
        """Persist a plan in one transaction, then start the sends it asks for.
        Assignments are persisted and sent by hand_out, a moment later."""
        if not plan:
            return
        for build, why in plan.requeued:
            self._log_line(build.id, f"--- {why}; queued again ---")
        for build, why in plan.errored:
            self._log_line(build.id, f"--- build error: {why} ---")
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
            self._notify(build)
        if plan.assign:
            self.outgoing += [(build, runner, build.attempt) for build, runner in plan.assign]
            for build, runner in plan.assign:
                self.unsent.setdefault(runner.name, set()).add((build.id, build.attempt))
            if self.handing_out is None:
                self.handing_out = self._spawn(self.hand_out())
        for runner, build_id, attempt in plan.cancel:
            self._spawn(self.send_cancel(runner, build_id, attempt))
        if self.watchers:
            for build in builds.values():
                self._event("build", build=build.summary())
            for runner in plan.dead:
                self._event("runner", runner=runner.summary())
        self._changed()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def hand_out(self) -> None:
        """Persist and send the assignments apply() left in ``outgoing``, in
        batches: each attempt's first log line is written in a thread (creating
        a log file is the dearest step of a hand-out, and the event loop goes on
        meanwhile), then one transaction for the whole batch, then the `run`s.
        A lease that ended in the meantime (cancelled, its runner lost) is dropped."""
        try:
            while self.outgoing:
                batch, self.outgoing = self.outgoing, []
                try:
                    await self._hand_out(batch)
                except Exception:       # the builds stay leased in memory: the runner's next pong takes them back
                    log.exception("handing out %d build(s) failed", len(batch))
                finally:
                    for build, runner, attempt in batch:
                        leases = self.unsent.get(runner.name)
                        if leases is not None:
                            leases.discard((build.id, attempt))
                            if not leases:
                                del self.unsent[runner.name]
        finally:
            self.handing_out = None

    async def _hand_out(self, batch: list[tuple[Build, Runner, int]]) -> None:
        stamp = time.strftime('%Y-%m-%d %H:%M:%S')
        lines = [(build.id, f"=== attempt {attempt} on {runner.name} ({runner.host}:{runner.port}) at {stamp} ===")
                 for build, runner, attempt in batch if self.sched.is_leased(build.id, attempt)]
        sizes = await asyncio.to_thread(self._write_lines, lines)
        now = self.clock()
        # started now, in the same step as the `run` is queued on the runner's link:
        # a ping that goes out before it cannot take the build back (see Scheduler.heartbeat)
        batch = [(build, runner, attempt) for build, runner, attempt in batch
                 if build.id in sizes and self.sched.sending(build.id, attempt, now)]
        for build, _, _ in batch:
            build.log_base = sizes[build.id]
            self.attempt_bytes[build.id] = 0
        with self.store.transaction():
            self.store.save(build for build, _, _ in batch)
        for build, runner, attempt in batch:
            log.info("build %d attempt %d -> %s", build.id, attempt, runner.name)
            if attempt > 1:
                self.artifacts.clear(build.id, build.sha)     # what an earlier attempt uploaded
            self._spawn(self.send_run(build, runner, attempt))
        if self.watchers:
            for build, _, _ in batch:
                self._event("build", build=build.summary())
        self._changed()

    def _write_lines(self, lines: list[tuple[int, str]]) -> dict[int, int]:
        """(In a thread.) Each build's line, as _log_line writes it; its log's new size."""
        sizes = {}
        for build_id, text in lines:
            self.logcap.close(build_id)
            sizes[build_id] = self.store.append_line(build_id, text)
        return sizes

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _event(self, kind: str, **data) -> None:
        for queue in list(self.watchers):
            if queue.full():               # a watcher that cannot keep up is dropped, not waited for
                self.watchers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
            else:
                queue.put_nowait({"type": "event", "event": kind, **data})

    def _notify(self, build: Build) -> None:
        """Start the notify.on_finish commands for a build that ended; never waited for."""
        cfg = self.config.notify
        if not cfg.on_finish:
            return
        env = notify.environment(build.summary(), str(self.store.log_path(build.id).absolute()))
        for command in cfg.on_finish:
            self._spawn(notify.run(command, env, cfg.timeout, f"build {build.id}"))

    def _log_line(self, build_id: int, text: str) -> int:
        """Append a line of the dispatcher's own, on a line of its own (after
        the tail of an attempt's log that went over the cap)."""
        build = self.sched.builds.get(build_id)
        # a line written while an attempt still sends its log (a cancel): the
        # runner's offsets count only its own bytes, so the attempt's base moves
        # past this line and its count stays what it was
        sending = build is not None and build.runner is not None and build.status in (
            Status.RUNNING, Status.CANCELLED) and build_id not in self._unsent_ids()
        before = self._attempt_size(build) if sending else None
        self.logcap.close(build_id)
        self.attempt_bytes.pop(build_id, None)
        size = self.store.append_line(build_id, text)
        if before is not None:
            build.log_base = size - before
            self.attempt_bytes[build_id] = before
        return size

    def _unsent_ids(self) -> set[int]:
        return {build_id for leases in self.unsent.values() for build_id, _ in leases}

    def _attempt_size(self, build: Build) -> int:
        have = self.attempt_bytes.get(build.id)
        if have is None:
            have = self.attempt_bytes[build.id] = self.logcap.size(build.id, build.log_base)
        return have

    def link(self, runner: Runner) -> net.Client:
        link = self.links.get(runner.name)
        if link is None or (link.host, link.port) != (runner.host, runner.port):
            link = net.Client(runner.host, runner.port, protocol.DISPATCHER, self.secret, self.limits,
                              self.client_tls)
            self.links[runner.name] = link
        return link

    # ------------------------------------------------------------ talking to runners

    async def send_run(self, build: Build, runner: Runner, attempt: int) -> None:
        # the lease is pinned when the send is decided: should the build be taken
        # back and handed to someone else before this task runs, sending
        # build.attempt here would give one lease to two runners
        if not self.sched.is_leased(build.id, attempt) or build.runner != runner.name:
            return
        cfg = self.config.build
        msg = {"type": "run", "build": build.id, "attempt": attempt, "repo": build.repo,
               "sha": build.sha, "branch": build.branch, "steps": list(cfg.steps),
               "timeout": cfg.timeout, "env": dict(cfg.env), "job": build.job,
               "artifacts_limit": self.config.dispatcher.max_artifact_bytes}
        try:
            try:
                await self.link(runner).request(msg)
            except net.PeerError as exc:
                if isinstance(exc, (net.PeerRefused, net.PeerTimeout)) or not self.sched.is_leased(build.id, attempt):
                    raise
                # the kept connection was dead (the runner restarted or stopped):
                # one fresh attempt tells a stopped runner from a live one at once
                await self.link(runner).request(msg)
        except protocol.RemoteError as exc:
            log.warning("runner %s refused build %d: %s", runner.name, build.id, exc)
            self.apply(self.sched.refused(build.id, attempt, f"runner {runner.name} refused it: {exc}",
                                          self.clock()))
        except net.PeerRefused as exc:
            self.apply(self.sched.lost(runner.name, str(exc), self.clock()))
        except net.PeerError as exc:
            # unknown whether it arrived: the next pong tells
            log.warning("sending build %d to %s: %s", build.id, runner.name, exc)

    async def send_cancel(self, runner: Runner, build_id: int, attempt: int) -> None:
        try:
            await self.link(runner).request({"type": "cancel", "build": build_id, "attempt": attempt})
            log.info("cancelled build %d attempt %d on %s", build_id, attempt, runner.name)
        except (net.PeerError, protocol.RemoteError) as exc:
            log.warning("cancelling build %d on %s: %s", build_id, runner.name, exc)

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Ping every live runner each heartbeat_interval, and sweep for the
        silent ones four times as often, so a frozen runner is declared dead
        close to the deadline rather than up to a whole interval after it."""
        interval = self.config.dispatcher.heartbeat_interval
        next_ping = 0.0
        while not stop.is_set():
            now = self.clock()
            self.apply(self.sched.expire(now))
            if now >= next_ping:
                next_ping = now + interval
                for runner in list(self.sched.runners.values()):
                    if runner.alive and runner.name not in self.pinging:
                        self._spawn(self.ping(runner))
            try:
                await aio.within(stop.wait(), interval / 4)
            except asyncio.TimeoutError:
                pass

    async def ping(self, runner: Runner) -> None:
        self.pinging.add(runner.name)
        try:
            for retry in (False, True):
                sent_at = self.clock()
                try:
                    reply = await self.link(runner).request(
                        {"type": "ping"}, timeout=self.config.dispatcher.heartbeat_interval)
                except net.PeerRefused as exc:
                    self.apply(self.sched.lost(runner.name, str(exc), self.clock()))
                    return
                except net.PeerTimeout:
                    return                  # a miss: expire() decides when enough were missed
                except (net.PeerError, protocol.RemoteError) as exc:
                    if not retry:           # a dropped connection: reconnect once at once
                        continue
                    log.debug("ping %s: %s", runner.name, exc)
                    return
                leases = {tuple(lease) for lease in reply["running"]}
                # what it was given but not yet sent, it cannot report: not a reason to take it back
                leases |= self.unsent.get(runner.name, set()) & runner.running
                self.apply(self.sched.heartbeat(runner.name, leases, sent_at, self.clock()))
                # one small frame per runner per interval, so a console's "last seen" stays true
                if self.watchers and runner.alive:
                    self._event("runner", runner=runner.summary())
                return
        finally:
            self.pinging.discard(runner.name)

    # ------------------------------------------------------------ requests

    async def handle(self, conn: net.Connection, msg: dict) -> dict | None:
        handler = getattr(self, "on_" + msg["type"], None)
        if handler is None:
            return protocol.error("unsupported", f"the dispatcher does not handle {msg['type']!r}")
        return await handler(conn, msg)

    async def on_commit(self, conn: net.Connection, msg: dict) -> dict:
        allowed = self.config.dispatcher.repos
        if allowed and msg["repo"] not in allowed:
            log.warning("refused a commit from %s for repository %r: not in dispatcher.repos",
                        conn.peer, msg["repo"][:200])
            return protocol.error("forbidden_repo", f"this dispatcher does not build {msg['repo'][:200]!r} "
                                               f"(not in its dispatcher.repos)")
        marker = next((m for m in SKIP_MARKERS if m in (msg.get("message") or msg["subject"]).lower()), None)
        builds, created = self._queue_jobs(
            dict(repo=msg["repo"], branch=msg["branch"], sha=msg["sha"], subject=msg["subject"],
                 author=msg["author"], commit_time=msg["time"]),
            msg.get("jobs") or DEFAULT_JOBS, msg.get("config_error", ""), skip=marker)
        return protocol.ok(build=builds[0].id, builds=[b.id for b in builds], duplicate=not created)

    def _queue_jobs(self, commit: dict, jobs: list[dict], config_error: str = "", skip: str | None = None,
                    reason: str = "commit", note: str = "") -> tuple[list[Build], list[Build]]:
        """Store one build per job of a commit, all or none, and queue the new
        ones; a broken .ci.yaml or a skip marker gives one final build instead.
        Returns (builds, those newly created)."""
        now = self.clock()
        status = Status.SKIPPED if skip else Status.ERROR if config_error else Status.QUEUED
        if status is not Status.QUEUED:
            jobs = DEFAULT_JOBS
        builds, created = [], []
        with self.store.transaction():
            for job in jobs:
                build, duplicate = self.store.add_build(**commit, reason=reason, labels=tuple(job["labels"]),
                                                        job=job["name"], status=status, now=now)
                builds.append(build)
                if not duplicate:
                    created.append(build)
        for build in created:
            if note:
                self._log_line(build.id, f"=== {note} ===")
            what = f"{build.branch} {build.sha[:7]} {build.subject[:60]}" + (f" job {build.job}" if build.job else "")
            if skip:
                self._log_line(build.id, f"=== skipped: the commit message says {skip}; not built "
                                         f"(`tinyci trigger {build.sha[:12]}` builds it anyway) ===")
                log.info("build %d skipped (%s): %s", build.id, skip, what)
            elif config_error:
                self._log_line(build.id, f"=== build error: {config_error} ===")
                log.warning("build %d error: %s: %s", build.id, what, config_error)
                self._notify(build)
            else:
                log.info("build %d queued (%s): %s", build.id, reason, what)
            self._event("build", build=build.summary())
        queued = [b for b in created if b.status is Status.QUEUED]
        plan = Plan()
        if queued and reason == "commit":
            plan += self._supersede(queued[0])
        for build in queued:
            plan += self.sched.add(build, now)
        self.apply(plan)
        self._changed()
        return builds, created

    def _supersede(self, newer: Build) -> Plan:
        """With ``supersede`` on for the branch, cancel its queued (never its
        running) commit builds older than ``newer``."""
        plan = Plan()
        if not any(fnmatch.fnmatchcase(newer.branch, p) for p in self.config.dispatcher.supersede):
            return plan
        for build in self.sched.queued():
            if build.branch == newer.branch and build.repo == newer.repo and build.reason == "commit" \
                    and build.id < newer.id:
                cancelled = self.sched.cancel(build.id, self.clock())
                if cancelled:
                    self._log_line(build.id, f"=== cancelled: superseded by build {newer.id}, a newer commit "
                                             f"({newer.sha[:12]}) of {newer.branch} ===")
                    log.info("build %d superseded by build %d on %s", build.id, newer.id, newer.branch)
                    plan += cancelled
        return plan

    async def on_register(self, conn: net.Connection, msg: dict) -> dict:
        name = msg["name"]
        # a runner that registers from 0.0.0.0 is reached at the address it came from
        host = msg["host"] if msg["host"] not in ("", "0.0.0.0", "::") else conn.peer.rsplit(":", 1)[0]
        known = name in self.sched.runners
        plan = self.sched.register(name, host, msg["port"], tuple(msg["labels"]), msg["slots"],
                                   {tuple(x) for x in msg.get("running", [])}, self.clock())
        runner = self.sched.runners[name]
        with self.store.transaction():
            self.store.save_runners([runner])
        log.info("runner %s %s at %s:%d (slots %d, labels %s)", name, "re-registered" if known else "registered",
                 host, msg["port"], msg["slots"], ",".join(msg["labels"]) or "-")
        self._event("runner", runner=runner.summary())
        self.apply(plan)
        return protocol.ok(heartbeat_interval=self.config.dispatcher.heartbeat_interval)

    async def on_log(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        if not self.sched.is_current(build_id, attempt):
            return protocol.error("stale", f"build {build_id} attempt {attempt} is not current")
        build = self.sched.builds[build_id]
        have = self._attempt_size(build)
        data = msg["data"].encode()
        if msg["offset"] > have:
            return protocol.error("offset", f"log of build {build_id} has {have} bytes, not {msg['offset']}",
                             expected=have)
        skip = have - msg["offset"]
        if skip < len(data):
            self.attempt_bytes.pop(build_id, None)     # not kept if the append fails half way
            have = self.attempt_bytes[build_id] = self.logcap.append(build_id, data[skip:], build.log_base)
            self._changed()
        return protocol.ok(offset=have)

    async def on_result(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        if not self.sched.is_current(build_id, attempt):
            return protocol.error("stale", f"build {build_id} attempt {attempt} is not current")
        build = self.sched.builds[build_id]
        have = self._attempt_size(build)
        if have < msg.get("log_size", 0):
            return protocol.error("offset", f"log of build {build_id} is incomplete ({have} bytes)", expected=have)
        status = Status(msg["status"])
        was_cancelled = build.status is Status.CANCELLED
        plan = self.sched.finish(build_id, attempt, status, msg["exit_code"], self.clock())
        if was_cancelled:
            self._log_line(build_id, f"=== cancelled (the runner reported {status.value} as it stopped) ===")
        else:
            self._log_line(build_id, f"=== {status.value} (exit {msg['exit_code']}) in "
                                     f"{msg['duration']:.2f}s on {build.runner} ===")
            log.info("build %d %s on %s", build_id, status.value, build.runner)
        self.apply(plan)
        return protocol.ok()

    async def on_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        if not self.sched.is_current(build_id, attempt):
            return protocol.error("stale", f"build {build_id} attempt {attempt} is not current")
        try:
            data = base64.b64decode(msg["data"], validate=True)
        except (binascii.Error, ValueError):
            return protocol.error("bad_field", "artifact.data: expected base64")
        build = self.sched.builds[build_id]
        try:
            size = self.artifacts.write(build_id, build.sha, msg["path"], msg["offset"], data, msg["eof"],
                                        self.config.dispatcher.max_artifact_bytes)
        except ArtifactError as exc:
            log.warning("build %d: artifact %r refused: %s", build_id, msg["path"][:100], exc.message)
            return protocol.error(exc.code, exc.message)
        except OSError as exc:
            return protocol.error("internal", f"cannot store artifact {msg['path'][:100]!r}: {exc.strerror}")
        return protocol.ok(offset=size)

    async def on_artifacts(self, conn: net.Connection, msg: dict) -> dict:
        if self.store.get(msg["build"]) is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        return protocol.ok(artifacts=self.artifacts.list(msg["build"]))

    async def on_fetch_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build = self.store.get(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        offset = msg.get("offset", 0)
        try:
            data, size = self.artifacts.read(build.id, build.sha, msg["path"], offset, ARTIFACT_CHUNK)
        except ArtifactError as exc:
            return protocol.error(exc.code, exc.message)
        return protocol.ok(data=base64.b64encode(data).decode(), offset=offset, size=size,
                      eof=offset + len(data) >= size)

    async def on_cancel(self, conn: net.Connection, msg: dict) -> dict:
        build_id = msg["build"]
        plan = self.sched.cancel(build_id, self.clock())
        if plan is None:
            build = self.store.get(build_id)
            if build is None:
                return protocol.error("not_found", f"no build {build_id}")
            return protocol.error("finished", f"build {build_id} is already {build.status.value}")
        who = f"{msg['by']} ({conn.role} at {conn.peer})" if msg.get("by") else f"{conn.role} at {conn.peer}"
        self._log_line(build_id, f"=== cancelled by {who}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===")
        self.apply(plan)
        return protocol.ok(builds=[build_id])

    async def on_status(self, conn: net.Connection, msg: dict) -> dict:
        builds = self.store.recent(msg.get("limit", 50))
        # active builds are authoritative in memory (the store has them too, but
        # reading both keeps one source for each)
        builds = [self.sched.builds.get(b.id, b) for b in builds]
        summaries = []
        for build in builds:
            summary = build.summary()
            if build.status is Status.QUEUED:
                summary["waiting_for"] = self._waiting_for(build)
            summaries.append(summary)
        return protocol.ok(runners=[r.summary() for r in sorted(self.sched.runners.values(), key=lambda r: r.name)],
                      builds=summaries, pipelines=pipelines(summaries),
                      queue=[b.id for b in self.sched.queued()])

    def _waiting_for(self, build: Build) -> list[str] | None:
        """None when some live runner has every label the build needs; else the
        labels no live runner offers (all of them when each is offered somewhere,
        but never together; [] when no runner is alive at all)."""
        live = [r for r in self.sched.runners.values() if r.alive]
        need = set(build.labels)
        if any(need <= set(r.labels) for r in live):
            return None
        offered = set().union(*(set(r.labels) for r in live))
        return sorted(need - offered) or sorted(need)

    async def on_build(self, conn: net.Connection, msg: dict) -> dict:
        build = self.sched.builds.get(msg["build"]) or self.store.get(msg["build"])
        if build is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        return protocol.ok(build=build.summary())

    async def on_read_log(self, conn: net.Connection, msg: dict) -> None:
        build_id = msg["build"]
        if self.store.get(build_id) is None:
            await conn.send(protocol.error("not_found", f"no build {build_id}"))
            return
        offset = msg.get("offset", 0)
        while True:
            changed = self.changed
            data = self.store.read_log(build_id, offset, LOG_CHUNK)
            cut = utf8_boundary(data)       # never send half a character: its rest may come
            if cut:
                await conn.send({"type": "chunk", "offset": offset, "data": data[:cut].decode(errors="replace")})
                offset += cut
                continue
            build = self.sched.builds.get(build_id) or self.store.get(build_id)
            final = build.status.final and build_id not in self.sched.builds
            if final and data:              # a finished log that ends inside a character
                await conn.send({"type": "chunk", "offset": offset, "data": data.decode(errors="replace")})
                offset += len(data)
                continue
            if final or not msg.get("follow"):
                if final and self.store.log_size(build_id) > offset:
                    continue                # the last lines landed while we looked
                await conn.send({"type": "end", "status": build.status.value, "offset": offset})
                return
            try:
                await aio.within(changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def on_watch(self, conn: net.Connection, msg: dict) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        self.watchers.add(queue)
        try:
            snapshot = await self.on_status(conn, {"type": "status", "limit": msg.get("limit", 50)})
            # every active build too, however old, so a watcher can show the whole queue
            shown = {b["id"] for b in snapshot["builds"]}
            snapshot["builds"] += [b.summary() for b in sorted(self.sched.builds.values(), key=lambda b: -b.id)
                                   if b.id not in shown]
            await conn.send(snapshot)
            while True:
                event = await queue.get()
                if event is None:
                    await conn.send({"type": "end", "reason": "watcher too slow"})
                    return
                await conn.send(event)
        finally:
            self.watchers.discard(queue)

    async def on_trigger(self, conn: net.Connection, msg: dict) -> dict:
        rev = msg.get("rev") or msg.get("branch")
        repo = self.store.latest_repo()
        if not rev:
            return protocol.error("bad_request", "trigger needs a branch or a revision")
        if repo is None:
            return protocol.error("not_found", "no repository known yet: no commit has been reported")
        found = await asyncio.to_thread(_resolve, repo, rev)
        if found is None:
            return protocol.error("not_found", f"{rev!r} is not a commit in {repo}")
        sha, author, subject = found
        branch = msg.get("branch") or "manual"
        # a manual trigger ignores [skip ci]; its jobs come from .ci.yaml at the commit, as for a push
        jobs, problem = await asyncio.to_thread(_jobs_at, repo, sha)
        builds, _ = self._queue_jobs(dict(repo=repo, branch=branch, sha=sha, author=author,
                                          subject=subject or f"triggered {rev}"),
                                     jobs, problem, reason="manual", note="manual")
        return protocol.ok(builds=[b.id for b in builds])

    async def on_rebuild(self, conn: net.Connection, msg: dict) -> dict:
        old = self.store.get(msg["build"])
        if old is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        reason = f"rebuild of {old.id}"
        jobs, problem = [{"name": old.job, "labels": list(old.labels)}], ""
        if not old.job:         # a skipped or broken commit may have jobs now: read them as a trigger does
            jobs, problem = await asyncio.to_thread(_jobs_at, old.repo, old.sha)
        builds, _ = self._queue_jobs(dict(repo=old.repo, branch=old.branch, sha=old.sha, subject=old.subject,
                                          author=old.author),
                                     jobs, problem, reason=reason, note=reason)
        return protocol.ok(builds=[b.id for b in builds])


def pipelines(builds: list[dict]) -> list[dict]:
    """Each commit among ``builds`` (newest first) with its status by the
    pipeline rule, over the newest build of each of its jobs."""
    commits: dict[tuple, dict] = {}
    for build in builds:
        entry = commits.setdefault((build["repo"], build["sha"]), {
            "sha": build["sha"], "branch": build["branch"], "subject": build["subject"], "jobs": {}})
        job = build.get("job") or ""
        if job not in entry["jobs"] or entry["jobs"][job]["build"] < build["id"]:
            entry["jobs"][job] = {"job": job, "build": build["id"], "status": build["status"],
                                  "labels": build["labels"]}
    out = []
    for entry in commits.values():
        jobs = sorted(entry["jobs"].values(), key=lambda j: j["job"])
        out.append({**entry, "status": pipeline_status([j["status"] for j in jobs]), "jobs": jobs})
    return out


def _jobs_at(repo: str, sha: str) -> tuple[list[dict], str]:
    """(jobs, problem) of the .ci.yaml at ``sha`` in a local ``repo``; the
    default job when the file is absent or the repository cannot be read here."""
    try:
        out = subprocess.run(["git", "-C", repo, "cat-file", "blob", f"{sha}:{buildfile.FILENAME}"],
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_JOBS, ""
    if out.returncode != 0:
        return DEFAULT_JOBS, ""
    try:
        return buildfile.parse(out.stdout.decode("utf-8")).job_list(), ""
    except UnicodeDecodeError:
        return DEFAULT_JOBS, f"{buildfile.FILENAME}: is not UTF-8 text"
    except buildfile.BuildFileError as exc:
        return DEFAULT_JOBS, str(exc)


def _resolve(repo: str, rev: str) -> tuple[str, str, str] | None:
    """(sha, author, subject) of a revision in the repository, or None."""
    if rev.startswith("-"):
        return None
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", "--end-of-options",
                              f"{rev}^{{commit}}"], capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or len(sha) != 40:
            return None
        info = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%an%x00%s", sha],
                              capture_output=True, text=True, errors="replace", timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    author, _, subject = info.stdout.rstrip("\n").partition("\0")
    return sha, author[:200], subject[:4000]


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    daemon.add_common_arguments(parser, 8888)
    parser.add_argument("--data", metavar="DIR",
                        help="where the database and build logs live (default .tinyci/dispatcher)")


def main(args: argparse.Namespace) -> int:
    overrides = {"dispatcher": {"host": args.host, "port": args.port, "data_dir": args.data}}

    async def body(stop: asyncio.Event) -> None:
        settings = daemon.load_config(args, overrides)
        try:
            store = Store(Path(settings.config.dispatcher.data_dir))
        except StoreError as exc:
            raise daemon.StartupError(str(exc)) from None
        try:
            dispatcher = Dispatcher(settings, store)
            dispatcher.recover()
            await dispatcher.serve(stop, args.insecure)
        finally:
            store.close()

    return daemon.run("dispatcher", body, args.verbose)


if __name__ == "__main__":
    import sys
    from .cli import main as cli
    sys.exit(cli(["dispatcher", *sys.argv[1:]]))
