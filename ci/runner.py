"""The runner daemon: listens for work from the dispatcher, runs each build in
one of its slots (``execution.py``), and delivers logs and results through its
durable outbox (``outbox.py``).

Receives, from role ``dispatcher`` only, proven with this runner's own key
(``Settings.runner_key``: its ``auth.runners`` entry, else the shared runner
secret) and meant for this runner (``runner:<name>``):
    run {build, attempt, repo, sha, branch, steps, timeout, env, job?, artifacts_limit?,
         definition?, override?, secrets?}
                                                                  -> ok | error busy
    ping                                                          -> pong {running}
    cancel {build, attempt?}                                      -> ok
Sends to the dispatcher:
    register (see registration.py)
    log, result (see outbox.py)
    artifact (see artifact_upload.py)

``running`` always lists every lease (build, attempt) this runner holds: the
builds it runs and those whose result is still in its outbox, so the
dispatcher never takes back a build whose result is merely undelivered.

A runner without ``--name`` is ``<host>-<n>`` (``workdir.py``: the lock on
its workdir is the claim on the name).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from . import aio, artifact_download, artifact_upload, clones, daemon, files, net, patterns, protocol
from .attempt import RunRequest
from .buildlog import BuildLog
from .cache import Cache
from .execution import Execution
from .models import Status
from .outbox import STALE, Delivery, Outbox, Spares
from .procgroup import Steps, become_subreaper, reap_orphans
from .registration import Refused, Registration
from .settings import Settings
from .slots import Slots
from .workdir import ClaimError, claim, claim_default_name, runners_dir

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.0        # at shutdown, SIGKILL a step this soon after SIGTERM


class Runner:
    def __init__(self, settings: Settings, stop: asyncio.Event):
        rc = settings.config.runner
        self.settings = settings
        self.stop = stop
        try:
            self.dispatcher = net.parse_addr(rc.dispatcher)
        except ValueError as exc:
            raise daemon.StartupError(f"runner.dispatcher: {exc}") from None
        if rc.name and not patterns.is_name(rc.name):
            raise daemon.StartupError(f"runner.name {rc.name!r} must be a {patterns.NAME_RULE}")
        bad = [label for label in rc.labels if not patterns.is_name(label)]
        if bad:
            raise daemon.StartupError(f"runner.labels: {bad[0]!r} must be a {patterns.NAME_RULE}")
        self.host, self.port = rc.host, rc.port
        self.name = rc.name
        self.workdir = Path(".")
        self.cache: Cache | None = None
        self.outbox: Outbox | None = None
        self.slots = Slots(rc.slots)
        self.deliveries: dict[tuple, Delivery] = {}     # every lease held, by (build, attempt)
        self.spares = Spares(self._client, rc.slots)      # deliveries' connections, kept for the next
        self.tasks: set[asyncio.Task] = set()
        self.registration: Registration | None = None      # once the name is known
        self._locks: list[files.DirLock] = []
        self.steps = Steps()            # the steps running in every slot, for ending their strays

    # ------------------------------------------------------------ life cycle

    async def start(self, insecure: bool = False) -> asyncio.AbstractServer:
        """Listen, then claim the workdir and pick up what the outbox holds."""
        rc = self.settings.config.runner
        # work comes only from the dispatcher role: whoever holds its secret can run commands here
        daemon.check_exposure("runner", rc.host, self.settings, [protocol.DISPATCHER], insecure)
        server = await daemon.listen(
            lambda: net.serve(self.handle, rc.host, rc.port, keys=self._keys,
                              roles=frozenset({protocol.DISPATCHER}), limits=self.settings.limits,
                              identity=lambda: protocol.runner_identity(self.name),
                              name=f"runner {rc.name or ''}".strip(), ssl=self.settings.server_tls),
            "runner", rc.host, rc.port)
        try:
            self.port = server.sockets[0].getsockname()[1]
            if not self.name:
                self.name, lock = claim_default_name()
                self._locks.append(lock)
            # absolute: git runs inside the checkouts, where a relative path would mean something else
            self.workdir = Path(rc.workdir or runners_dir() / self.name).absolute()
            if not self._locks or rc.workdir:
                self._locks.append(claim(self.workdir))
            if self.settings.runner_key(self.name) is None:
                raise daemon.StartupError(
                    f"runner {self.name} has no secret: set auth.runner_secret (or _file) to its own "
                    f"credential, the one the dispatcher holds for it in auth.runners")
            self.registration = Registration(self._client(), self._register_message)
            # the workdir is ours now: end any step a killed predecessor left running in it
            for pgid in reap_orphans(self.workdir / "checkouts"):
                log.warning("killed process group %d: a build step left running when this runner "
                            "last stopped", pgid)
            self.cache = Cache(self.workdir / "cache", rc.cache_bytes)    # sweeps what a crash left
            outbox = Outbox(self.workdir)
            pending = outbox.load()
            outbox.sweep_logs({(r["build"], r["attempt"]) for r in pending})
        except ClaimError as exc:
            server.close()
            raise daemon.StartupError(str(exc)) from None
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
            self._deliver(Delivery(self._client(), *key, outbox.log_path(*key), self.settings.limits.max_bulk,
                                   start=result["log_size"], result=result))
        return server

    async def serve(self) -> None:
        """Register and stay registered until the stop event is set. A refused
        credential ends the runner (StartupError): retrying cannot help."""
        registering = asyncio.ensure_future(self.registration.run())
        stopping = asyncio.ensure_future(self.stop.wait())
        self._spawn(self._sweep_clones(), "the sweep of unused clones")
        try:
            await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (registering, stopping):
                task.cancel()
            await asyncio.gather(registering, stopping, return_exceptions=True)
        if not registering.cancelled() and isinstance(registering.exception(), Refused):
            raise daemon.StartupError(str(registering.exception()))
        if not registering.cancelled() and registering.exception() is not None:
            log.error("registration failed", exc_info=registering.exception())

    async def _sweep_clones(self) -> None:
        """Delete the slots' clones unused for runner.clone_days, now and every hour."""
        days, checkouts = self.settings.config.runner.clone_days, self.workdir / "checkouts"
        while days > 0:
            for clone, age in await aio.in_thread(clones.stale, checkouts, days, time.time()):
                # decided here, on the loop: a slot seen idle cannot take a build before the rename
                if int(clone.name) not in self.slots.active and clones.set_aside(clone):
                    log.info("deleting the working clone %s: no build used it for %.0f days", clone, age)
            await aio.in_thread(clones.delete_aside, checkouts)
            await asyncio.sleep(clones.SWEEP_INTERVAL)

    async def shutdown(self) -> None:
        """Kill running builds (the dispatcher requeues them) and stop within a second or two."""
        builds = self.slots.stop_all("shutdown", SHUTDOWN_GRACE)
        if builds:
            await asyncio.wait(builds, timeout=SHUTDOWN_GRACE + 0.5)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        if self.registration is not None:
            await self.registration.close()
        await self.spares.close()
        for lock in self._locks:
            lock.release()

    def _client(self) -> net.Client:
        host, port = self.dispatcher
        return net.Client(host, port, protocol.RUNNER, self.settings.runner_key(self.name) or "",
                          self.settings.limits, self.settings.client_tls, id=self.name, to=protocol.DISPATCHER_ID)

    def _keys(self, role: str, id: str) -> str | None:
        """The dispatcher proves itself with this runner's own key: no other role is served."""
        return self.settings.runner_key(self.name) if role == protocol.DISPATCHER else None

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

    def _register_message(self) -> dict:
        rc = self.settings.config.runner
        return {"type": "register", "name": self.name, "host": self.host, "port": self.port,
                "labels": list(rc.labels), "slots": rc.slots, "running": self.leases()}

    # ------------------------------------------------------------ requests

    async def handle(self, conn: net.Connection, msg: dict) -> dict:
        kind = msg["type"]
        if kind == "ping":
            if self.registration is not None:
                self.registration.pinged()
            return {"type": "pong", "running": self.leases()}
        if kind == "run":
            return self._run(msg)
        if kind == "cancel":
            for execution in self.slots.find(msg["build"], msg.get("attempt")):
                log.info("build %d attempt %d: cancelled by %s",
                         execution.request.build, execution.request.attempt, conn.role)
                execution.stop("cancelled")
            return protocol.ok()
        return protocol.error("unsupported", f"runner {self.name} does not handle {kind!r}")

    def _run(self, msg: dict) -> dict:
        build, attempt = key = (msg["build"], msg["attempt"])
        rc = self.settings.config.runner
        if self.outbox is None or self.stop.is_set():
            return protocol.error("busy", f"runner {self.name} is starting or stopping")
        if key in self.deliveries:
            # the dispatcher resends `run` when its connection broke mid-request:
            # the lease is ours already, so say yes again rather than "busy"
            return protocol.ok()
        if self.slots.runs_build(build):
            return protocol.error("busy", f"runner {self.name} is already running build {build}")
        slot = self.slots.free()
        if slot is None:
            return protocol.error("busy", f"all {rc.slots} slot(s) of runner {self.name} are busy")
        timeout = msg["timeout"] if msg["timeout"] > 0 else self.settings.config.build.timeout
        request = RunRequest(build, attempt, msg["repo"], msg["sha"], msg["branch"], tuple(msg["steps"]),
                             float(timeout), dict(msg["env"]), msg.get("job", ""),
                             msg.get("artifacts_limit", RunRequest.artifacts_limit), tuple(msg.get("inputs", ())),
                             msg.get("definition", ""), msg.get("override", False), dict(msg.get("secrets", {})))
        path = self.outbox.log_path(build, attempt)
        client, reused = self.spares.take()
        delivery = Delivery(client, build, attempt, path, self.settings.limits.max_bulk, reused=reused)
        try:
            buildlog = BuildLog(path, delivery.wake)
        except OSError as exc:
            self._spawn(client.close(), "closing a delivery's connection")
            return protocol.error("internal", f"runner {self.name} cannot write {path}: {exc.strerror}")
        execution = Execution(request, self.workdir / "checkouts" / str(slot), buildlog, rc.kill_grace,
                              header=f"runner {self.name} slot {slot}: ",
                              upload=lambda rel, file: self._upload(build, attempt, rel, file),
                              steps=self.steps, fetch=self._fetch, build_cache=self.cache)
        self._deliver(delivery)
        task = self._spawn(self._execute(slot, execution, delivery, buildlog), f"build {build}")
        self.slots.take(slot, execution, task)
        log.info("build %d attempt %d: running %s on slot %d", build, attempt, request.sha[:12], slot)
        return protocol.ok()

    # ------------------------------------------------------------ builds and deliveries

    async def _execute(self, slot: int, execution: Execution, delivery: Delivery,
                       buildlog: BuildLog) -> None:
        request = execution.request
        key = (request.build, request.attempt)
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
            result = {"build": request.build, "attempt": request.attempt, "status": outcome.status.value,
                      "exit_code": outcome.exit_code, "steps": outcome.steps,
                      "duration": outcome.duration, "log_size": buildlog.size}
            if outcome.step_results:
                result["step_results"] = list(outcome.step_results)
            if outcome.tests is not None:
                result["tests"] = outcome.tests
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
            clones.used(execution.checkout)
            self.slots.release(slot, execution)

    def _keep(self, buildlog: BuildLog, result: dict) -> None:
        """Sync the log, then write the outbox entry that promises it (in a worker thread)."""
        buildlog.close()
        try:
            self.outbox.save(result)
        except OSError as exc:
            log.error("build %d attempt %d: cannot write the outbox entry (%s); "
                      "the result is only in memory", result["build"], result["attempt"], exc)

    async def _upload(self, build: int, attempt: int, rel: str, file: Path) -> None:
        client = self._client()
        try:
            await artifact_upload.upload(client, self.settings.limits.max_bulk, build, attempt, rel, file)
        finally:
            await client.close()

    async def _fetch(self, build: int, rel: str, dest: Path) -> int:
        """One artifact of a needed build into the checkout (execution's ``fetch``)."""
        client = self._client()
        try:
            return await artifact_download.download(client, build, rel, dest)
        finally:
            await client.close()

    def _deliver(self, delivery: Delivery) -> None:
        self.deliveries[(delivery.build, delivery.attempt)] = delivery
        self._spawn(self._delivery(delivery), f"delivery of {delivery!r}")

    async def _delivery(self, delivery: Delivery) -> None:
        key = (delivery.build, delivery.attempt)
        try:
            outcome = await delivery.run()
        except BaseException:
            await delivery.client.close()
            raise
        await self.spares.give(delivery.client)
        if outcome == STALE:
            log.warning("build %d attempt %d is stale (given to another runner); dropping it", *key)
            for execution in self.slots.find(*key):
                execution.stop(STALE)
        else:
            log.info("build %d attempt %d: result delivered", *key)
        if self.deliveries.get(key) is delivery:
            del self.deliveries[key]
            # off the event loop (unlinks can take milliseconds): the next `run` comes right now
            await asyncio.get_running_loop().run_in_executor(None, self.outbox.discard, *key)


async def serve(settings: Settings, stop: asyncio.Event, insecure: bool = False) -> None:
    runner = Runner(settings, stop)
    # the daemon's process only (not a Runner made inside another program): a step's process
    # that leaves its group (setsid) is then reparented here, to be ended with its step
    if not become_subreaper():
        log.warning("cannot become the reaper of build steps' processes (Linux only): a process "
                    "a step starts outside its process group (setsid) may outlive the build")
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
    parser.add_argument("--name", help="this runner's name (default <host>-<n>: the host name and the "
                                       "lowest number no live runner in this directory holds)")
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
        settings = daemon.load_config(args, overrides, [protocol.RUNNER])
    except daemon.StartupError as exc:
        print(f"tinyci runner: {exc}", file=sys.stderr, flush=True)
        return 2
    return daemon.run("runner", lambda stop: serve(settings, stop, getattr(args, "insecure", False)),
                      getattr(args, "verbose", False), getattr(args, "log_file", None))


if __name__ == "__main__":
    from .cli import main as cli
    sys.exit(cli(["runner", *sys.argv[1:]]))
