"""The runner daemon: listens for work from the dispatcher, runs each build in
one of its slots (``executor.py``), and delivers logs and results through its
durable outbox (``outbox.py``).

Receives, from role ``dispatcher`` only:
    run {build, attempt, repo, sha, branch, steps, timeout, env, job?, artifacts_limit?}
                                                                  -> ok | error busy
    ping                                                          -> pong {running}
    cancel {build, attempt?}                                      -> ok
Sends to the dispatcher:
    register {name, host, port, labels, slots, running}           -> ok {heartbeat_interval}
    log, result (see outbox.py)
    artifact {build, attempt, path, offset, data, eof}            -> ok {offset} | error

``running`` always lists every lease (build, attempt) this runner holds: the
builds it runs and those whose result is still in its outbox, so the
dispatcher never takes back a build whose result is merely undelivered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import aio, daemon, net, protocol
from .settings import Settings
from .executor import BuildLog, Execution, Job, reap_orphans
from .models import Status
from .outbox import STALE, Delivery, Outbox

log = logging.getLogger(__name__)

ARTIFACT_TRIES = 3
FORGOTTEN_AFTER = 5         # heartbeat intervals without a ping before registering again
SHUTDOWN_GRACE = 1.0        # at shutdown, SIGKILL a step this soon after SIGTERM


@dataclass
class Active:
    execution: Execution
    task: asyncio.Task


class Runner:
    def __init__(self, settings: Settings, stop: asyncio.Event):
        rc = settings.config.runner
        self.settings = settings
        self.config = settings.config
        self.stop = stop
        self.secret = settings.secret(protocol.RUNNER)      # what it proves itself with to the dispatcher
        self.limits = settings.limits
        self.client_tls = settings.client_tls
        try:
            self.dispatcher = net.parse_addr(rc.dispatcher)
        except ValueError as exc:
            raise daemon.StartupError(f"runner.dispatcher: {exc}") from None
        if rc.name and not protocol.NAME.check(rc.name):
            raise daemon.StartupError(f"runner.name {rc.name!r} must be a {protocol.NAME.name}")
        bad = [label for label in rc.labels if not protocol.NAME.check(label)]
        if bad:
            raise daemon.StartupError(f"runner.labels: {bad[0]!r} must be a {protocol.NAME.name}")
        self.host, self.port = rc.host, rc.port
        self.name = rc.name
        self.workdir = Path(".")
        self.outbox: Outbox | None = None
        self.active: dict[int, Active] = {}             # by slot
        self.deliveries: dict[tuple, Delivery] = {}     # every lease held, by (build, attempt)
        self.tasks: set[asyncio.Task] = set()
        self.last_ping = time.monotonic()
        self._lock_fd: int | None = None
        self._registrar = self._client()

    # ------------------------------------------------------------ life cycle

    async def start(self, insecure: bool = False) -> asyncio.AbstractServer:
        """Listen, then claim the workdir and pick up what the outbox holds."""
        rc = self.config.runner
        # work comes only from the dispatcher role: whoever holds its secret can run commands here
        daemon.check_exposure("runner", rc.host, self.settings, [protocol.DISPATCHER], insecure)
        server = await daemon.listen(
            lambda: net.serve(self.handle, rc.host, rc.port, secrets=self.settings.secrets,
                              roles=frozenset({protocol.DISPATCHER}), limits=self.limits,
                              name=f"runner {rc.name or ''}".strip(), ssl=self.settings.server_tls),
            "runner", rc.host, rc.port)
        try:
            self.port = server.sockets[0].getsockname()[1]
            self.name = self.name or f"runner-{self.port}"
            # absolute: git runs inside the checkouts, where a relative path would mean something else
            self.workdir = Path(rc.workdir or f".tinyci/runners/{self.name}").absolute()
            self._claim_workdir()
            # the workdir is ours now: end any step a killed predecessor left running in it
            for pgid in reap_orphans(self.workdir / "checkouts"):
                log.warning("killed process group %d: a build step left running when this runner "
                            "last stopped", pgid)
            outbox = Outbox(self.workdir)
            pending = outbox.load()
            outbox.sweep_logs({(r["build"], r["attempt"]) for r in pending})
        except OSError as exc:
            server.close()
            raise daemon.StartupError(f"runner workdir {self.workdir}: {exc.strerror or exc}") from None
        except BaseException:
            server.close()
            raise
        self.outbox = outbox
        for result in pending:
            key = (result["build"], result["attempt"])
            log.info("build %d attempt %d: result %s is still in the outbox; delivering it",
                     *key, result["status"])
            self._deliver(Delivery(self._client(), *key, outbox.log_path(*key), self.limits.max_frame,
                                   start=result["log_size"], result=result))
        return server

    def _claim_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise daemon.StartupError(f"runner workdir {self.workdir} is in use by another runner "
                                      f"(give each runner its own --workdir or --name)") from None
        self._lock_fd = fd

    async def serve(self) -> None:
        """Register and stay registered until the stop event is set."""
        self._spawn(self._register_loop(), "registration")
        await self.stop.wait()

    async def shutdown(self) -> None:
        """Kill running builds (the dispatcher requeues them) and stop within a second or two."""
        jobs = [a.task for a in self.active.values()]
        for active in self.active.values():
            active.execution.stop("shutdown", grace=SHUTDOWN_GRACE)
        if jobs:
            await asyncio.wait(jobs, timeout=SHUTDOWN_GRACE + 0.5)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        await self._registrar.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _client(self) -> net.Client:
        host, port = self.dispatcher
        return net.Client(host, port, protocol.RUNNER, self.secret, self.limits, self.client_tls)

    def _spawn(self, coro, what: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)

        def finished(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(finished)
        return task

    def leases(self) -> list[list[int]]:
        return [list(key) for key in sorted(self.deliveries)][:1000]

    # ------------------------------------------------------------ requests

    async def handle(self, conn: net.Connection, msg: dict) -> dict:
        kind = msg["type"]
        if kind == "ping":
            self.last_ping = time.monotonic()
            return {"type": "pong", "running": self.leases()}
        if kind == "run":
            return self._run(msg)
        if kind == "cancel":
            for active in self.active.values():
                job = active.execution.job
                if job.build == msg["build"] and msg.get("attempt", job.attempt) == job.attempt:
                    log.info("build %d attempt %d: cancelled by %s", job.build, job.attempt, conn.role)
                    active.execution.stop("cancelled")
            return protocol.ok()
        return protocol.error("unsupported", f"runner {self.name} does not handle {kind!r}")

    def _run(self, msg: dict) -> dict:
        build, attempt = key = (msg["build"], msg["attempt"])
        rc = self.config.runner
        if self.outbox is None or self.stop.is_set():
            return protocol.error("busy", f"runner {self.name} is starting or stopping")
        if key in self.deliveries:
            # the dispatcher resends `run` when its connection broke mid-request:
            # the lease is ours already, so say yes again rather than "busy"
            return protocol.ok()
        if any(a.execution.job.build == build for a in self.active.values()):
            return protocol.error("busy", f"runner {self.name} is already running build {build}")
        free = [slot for slot in range(rc.slots) if slot not in self.active]
        if not free:
            return protocol.error("busy", f"all {rc.slots} slot(s) of runner {self.name} are busy")
        slot = free[0]
        timeout = msg["timeout"] if msg["timeout"] > 0 else self.config.build.timeout
        job = Job(build, attempt, msg["repo"], msg["sha"], msg["branch"], tuple(msg["steps"]),
                  float(timeout), dict(msg["env"]), msg.get("job", ""),
                  msg.get("artifacts_limit", Job.artifacts_limit))
        path = self.outbox.log_path(build, attempt)
        delivery = Delivery(self._client(), build, attempt, path, self.limits.max_frame)
        try:
            buildlog = BuildLog(path, delivery.wake)
        except OSError as exc:
            return protocol.error("internal", f"runner {self.name} cannot write {path}: {exc.strerror}")
        execution = Execution(job, self.workdir / "checkouts" / str(slot), buildlog, rc.kill_grace,
                              header=f"runner {self.name} slot {slot}: ",
                              upload=lambda rel, file: self._upload(build, attempt, rel, file))
        self._deliver(delivery)
        task = self._spawn(self._execute(slot, execution, delivery, buildlog), f"build {build}")
        self.active[slot] = Active(execution, task)
        log.info("build %d attempt %d: running %s on slot %d", build, attempt, job.sha[:12], slot)
        return protocol.ok()

    # ------------------------------------------------------------ builds and deliveries

    async def _execute(self, slot: int, execution: Execution, delivery: Delivery,
                       buildlog: BuildLog) -> None:
        job = execution.job
        key = (job.build, job.attempt)
        try:
            try:
                outcome = await execution.run()
            except BaseException:
                buildlog.close()
                raise
            dropped = self.deliveries.get(key) is not delivery or (
                outcome.status == Status.CANCELLED and execution.stop_reason in (STALE, "shutdown"))
            if dropped:
                buildlog.close()
                return      # stale, or lost with the shutdown: the dispatcher decides what happens
            # the log is complete: its last lines go now, while the disk syncs it and the result
            delivery.ended()
            result = {"build": job.build, "attempt": job.attempt, "status": outcome.status.value,
                      "exit_code": outcome.exit_code, "steps": outcome.steps,
                      "duration": outcome.duration, "log_size": buildlog.size}
            # off the event loop: the fsyncs take milliseconds that other slots and pings can use
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._keep, buildlog, result)
            if self.deliveries.get(key) is not delivery:    # called stale while we wrote it
                await loop.run_in_executor(None, self.outbox.discard, *key)
                return
            delivery.finish(result)     # only now: the result is on disk before it is sent
            log.info("build %d attempt %d %s (exit code %d) after %.1fs",
                     *key, outcome.status.value, outcome.exit_code, outcome.duration)
        finally:
            lingering = execution.lingering
            if lingering is not None and not lingering.done() and not self.stop.is_set():
                await asyncio.wait([lingering])     # git still works in this slot's clone
            if self.active.get(slot) is not None and self.active[slot].execution is execution:
                del self.active[slot]

    def _keep(self, buildlog: BuildLog, result: dict) -> None:
        """Sync the log, then write the outbox entry that promises it (in a worker thread)."""
        buildlog.close()
        try:
            self.outbox.save(result)
        except OSError as exc:
            log.error("build %d attempt %d: cannot write the outbox entry (%s); "
                      "the result is only in memory", result["build"], result["attempt"], exc)

    async def _upload(self, build: int, attempt: int, rel: str, file: Path) -> None:
        """Send one artifact in chunks; raises ValueError saying why it did not arrive."""
        chunk = max(1024, min(256 * 1024, (self.limits.max_frame - 1024) * 3 // 4))
        client = self._client()
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                offset = 0
                while True:
                    data = f.read(chunk)
                    eof = offset + len(data) >= size or not data
                    msg = {"type": "artifact", "build": build, "attempt": attempt, "path": rel,
                           "offset": offset, "data": base64.b64encode(data).decode(), "eof": eof}
                    for attempt_no in range(ARTIFACT_TRIES):
                        try:
                            await client.request(msg)
                            break
                        except (net.PeerError, protocol.ProtocolError) as exc:
                            if attempt_no == ARTIFACT_TRIES - 1:
                                raise ValueError(f"the dispatcher is unreachable: {exc}") from None
                            await asyncio.sleep(0.5 * (attempt_no + 1))
                    offset += len(data)
                    if eof:
                        return
        except protocol.RemoteError as exc:
            raise ValueError(f"the dispatcher refused it: {exc.message or exc.code}") from None
        finally:
            await client.close()

    def _deliver(self, delivery: Delivery) -> None:
        self.deliveries[(delivery.build, delivery.attempt)] = delivery
        self._spawn(self._delivery(delivery), f"delivery of {delivery!r}")

    async def _delivery(self, delivery: Delivery) -> None:
        key = (delivery.build, delivery.attempt)
        try:
            outcome = await delivery.run()
        finally:
            await delivery.client.close()
        if outcome == STALE:
            log.warning("build %d attempt %d is stale (given to another runner); dropping it", *key)
            for active in self.active.values():
                if (active.execution.job.build, active.execution.job.attempt) == key:
                    active.execution.stop(STALE)
        else:
            log.info("build %d attempt %d: result delivered", *key)
        if self.deliveries.get(key) is delivery:
            del self.deliveries[key]
            # off the event loop (unlinks can take milliseconds): the next `run` comes right now
            await asyncio.get_running_loop().run_in_executor(None, self.outbox.discard, *key)

    # ------------------------------------------------------------ registration

    async def _register_loop(self) -> None:
        addr = f"{self.dispatcher[0]}:{self.dispatcher[1]}"
        rc = self.config.runner
        backoff = aio.Backoff()
        down = False
        quiet = False       # the dispatcher answers registrations but never pings: say so once
        while True:
            msg = {"type": "register", "name": self.name, "host": self.host, "port": self.port,
                   "labels": list(rc.labels), "slots": rc.slots, "running": self.leases()}
            try:
                reply = await self._registrar.request(msg)
            except (net.PeerError, protocol.ProtocolError, protocol.RemoteError) as exc:
                if not down:
                    log.warning("cannot register with the dispatcher at %s: %s; "
                                "retrying in the background until it answers", addr, exc)
                down = True
                await asyncio.sleep(backoff.next())
                continue
            interval = reply.get("heartbeat_interval")
            if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
                interval = 1.0
            (log.debug if quiet else log.info)(
                "registered with the dispatcher at %s as %s (%d slot(s), %d lease(s) held)",
                addr, self.name, rc.slots, len(self.deliveries))
            down = False
            backoff.reset()
            registered = self.last_ping = time.monotonic()
            limit = FORGOTTEN_AFTER * interval
            while (silent := time.monotonic() - self.last_ping) < limit:
                await asyncio.sleep(limit - silent + 0.01)
            pinged = self.last_ping > registered
            (log.debug if quiet else log.warning)(
                "no ping from the dispatcher at %s for %.1fs; registering again", addr, silent)
            quiet = not pinged


async def serve(settings: Settings, stop: asyncio.Event, insecure: bool = False) -> None:
    runner = Runner(settings, stop)
    server = await runner.start(insecure)
    daemon.announce("runner", runner.host, runner.port, f" as {runner.name}")
    try:
        await runner.serve()
    finally:
        server.close()
        try:
            await aio.within(server.wait_closed(), 0.5)
        except asyncio.TimeoutError:
            pass
        await runner.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    daemon.add_common_arguments(parser, 8889)
    parser.add_argument("--dispatcher", metavar="HOST:PORT",
                        help="the dispatcher to register with (default 127.0.0.1:8888)")
    parser.add_argument("--name", help="this runner's name (default runner-<port>)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="checkouts, logs and outbox (default .tinyci/runners/<name>)")
    parser.add_argument("--labels", metavar="A,B", help="comma-separated labels builds can ask for")
    parser.add_argument("--slots", type=int, metavar="N", help="builds run at once (default 1)")


def main(args: argparse.Namespace) -> int:
    labels = getattr(args, "labels", None)
    overrides = {"runner": {
        "host": getattr(args, "host", None), "port": getattr(args, "port", None),
        "dispatcher": getattr(args, "dispatcher", None), "name": getattr(args, "name", None),
        "workdir": getattr(args, "workdir", None), "slots": getattr(args, "slots", None),
        "labels": None if labels is None else [x.strip() for x in labels.split(",") if x.strip()],
    }}
    try:
        settings = daemon.load_config(args, overrides)
    except daemon.StartupError as exc:
        print(f"tinyci runner: {exc}", file=sys.stderr, flush=True)
        return 2
    return daemon.run("runner", lambda stop: serve(settings, stop, getattr(args, "insecure", False)),
                      getattr(args, "verbose", False))


if __name__ == "__main__":
    from .cli import main as cli
    sys.exit(cli(["runner", *sys.argv[1:]]))
