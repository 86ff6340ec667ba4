"""The dispatcher's side of talking to runners: the one kept connection to
each, hand-outs and cancels.

Sends ``run`` (a hand-out), ``cancel`` and ``ping``; reads their replies
(``ok``, ``error`` busy, ``pong`` {running}). What a reply teaches (a runner
refused a build, a runner is gone, what a runner runs) goes to the
scheduler, and the plan that comes back to the dispatcher's ``apply``. One
kept connection per runner, made again when the runner moves, for ``run``,
``cancel`` and ``ping`` alike: a runner answers a ``run`` at once (its build
goes on in the background), and a second connection per runner for pings
cost a handshake, a socket and a reader in both processes for every runner,
which at 500 runners swamped both (pings timed out, their connections were
made again, more timed out). It is a ``keptlink.KeptLink``: requests on it
overlap and the runner answers them in order, so a ping sent after a
``run`` reaches the runner after it, and a pong waiting behind a ``run``'s
answer counts that wait in its interval, as it should: the runner is not
answering. It proves the dispatcher to that runner with the runner's own
key, for that runner's identity only (``runner:<name>``), and the runner
must prove it holds the key too: a runner at the address that cannot is
declared lost.

The heartbeat (pings, misses, a name claimed from another address) is
``heartbeat.Heartbeat``, on the same connections.

Hand-outs go in batches: each attempt's first log line is written in a
thread (creating a log file is the dearest step of a hand-out), then one
transaction for the whole batch, then the ``run``s. A lease that ended in
the meantime (cancelled, its runner lost) is dropped, never sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Callable

from . import keptlink, needs, net, protocol
from .artifacts import Artifacts
from .buildlogs import BuildLogs
from .heartbeat import Heartbeat
from .models import Build, RunnerRecord
from .scheduler import Plan, Scheduler
from .settings import Settings
from .store import Store
from .watchers import Watchers

log = logging.getLogger(__name__)

class RunnerLinks:
    def __init__(self, settings: Settings, sched: Scheduler, store: Store, logs: BuildLogs,
                 artifacts: Artifacts, watchers: Watchers, *, apply: Callable[[Plan | None], None],
                 spawn: Callable, monotonic: Callable[[], float] = time.monotonic,
                 dial: Callable[[RunnerRecord], keptlink.KeptLink] | None = None):
        """``monotonic``: the clock of every deadline here and of the scheduler's ``now``."""
        self.config = settings.config
        self.settings = settings
        self.sched, self.store, self.logs = sched, store, logs
        self.artifacts, self.watchers = artifacts, watchers
        self.apply, self.spawn, self.clock = apply, spawn, monotonic
        self.dial = dial or self._dial
        self.links: dict[str, keptlink.KeptLink] = {}      # runner name -> its one kept connection
        self.outgoing: list[tuple[Build, RunnerRecord, int]] = []   # assigned, not yet persisted and sent
        self.unsent: dict[str, set] = {}            # runner name -> leases of its assignments not yet sent
        self.handing_out: asyncio.Task | None = None
        self.beat = Heartbeat(self)

    def _dial(self, runner: RunnerRecord) -> keptlink.KeptLink:
        # no key for it (it could not have registered): the handshake fails, and says so
        key = self.settings.runner_key(runner.name) or ""
        return keptlink.KeptLink(runner.host, runner.port, protocol.DISPATCHER, key, self.settings.limits,
                          self.settings.client_tls, to=protocol.runner_identity(runner.name))

    def link(self, runner: RunnerRecord) -> keptlink.KeptLink:
        """The kept connection to ``runner`` (run, cancel and ping)."""
        link = self.links.get(runner.name)
        if link is None or (link.host, link.port) != (runner.host, runner.port):
            if link is not None:        # it moved: what waits on the old address fails, and is sent anew
                link.abandon(net.PeerError(f"runner {runner.name} moved to {runner.host}:{runner.port}"))
            link = self.links[runner.name] = self.dial(runner)
        return link

    def let_go(self, runner: RunnerRecord) -> None:
        """A runner found dead: its kept connection closed now, not when it is forgotten."""
        link = self.links.get(runner.name)
        if link is not None:
            link.drop(net.PeerError(f"runner {runner.name} is dead"))

    async def close(self) -> None:
        self.beat.stopped = True        # the pings the closes fail are not sent again
        for link in list(self.links.values()):
            await link.close()

    # ------------------------------------------------------------ hand-outs

    def assign(self, assignments: list[tuple[Build, RunnerRecord]]) -> None:
        """A plan's assignments: persisted and sent by hand_out, a moment later."""
        self.outgoing += [(build, runner, build.attempt) for build, runner in assignments]
        for build, runner in assignments:
            self.unsent.setdefault(runner.name, set()).add((build.id, build.attempt))
        if self.handing_out is None:
            self.handing_out = self.spawn(self.hand_out())

    def is_unsent(self, build_id: int) -> bool:
        """True while an assignment of the build waits to be sent."""
        return any(build_id == held for leases in self.unsent.values() for held, _ in leases)

    async def hand_out(self) -> None:
        """Persist and send the assignments waiting in ``outgoing``, batch by batch."""
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

    async def _hand_out(self, batch: list[tuple[Build, RunnerRecord, int]]) -> None:
        stamp = time.strftime('%Y-%m-%d %H:%M:%S')
        lines = [(build.id, f"=== attempt {attempt} on {runner.name} ({runner.host}:{runner.port}) at {stamp} ===")
                 for build, runner, attempt in batch if self.sched.is_leased(build.id, attempt)]
        sizes = await asyncio.to_thread(self.logs.first_lines, lines)
        now = self.clock()
        # from here until the runner acknowledges the `run`, no pong judges the build
        # (see Scheduler.sending): every lease not handed to start_run is released below
        batch = [(build, runner, attempt) for build, runner, attempt in batch
                 if build.id in sizes and self.sched.sending(build.id, attempt, now)]
        started: set[int] = set()
        try:
            for build, _, _ in batch:
                self.logs.begin(build, sizes[build.id])
            with self.store.transaction():
                self.store.save(build for build, _, _ in batch)
            for build, runner, attempt in batch:
                log.info("build %d attempt %d -> %s", build.id, attempt, runner.name)
                if attempt > 1:
                    self.artifacts.clear(build.id, build.sha)     # what an earlier attempt uploaded
                try:
                    self.start_run(build, runner, attempt)   # from here, it calls sched.sent
                except Exception:
                    # a bug, or the disk refusing a read (a needed build's artifacts): this run is not
                    # sent (sent below: its runner's pong takes it back), and the rest of the batch goes on
                    log.exception("build %d: sending its run to %s failed", build.id, runner.name)
                    continue
                started.add(build.id)
        finally:
            for build, _, attempt in batch:
                if build.id not in started:
                    self.sched.sent(build.id, attempt, self.clock())
        if self.watchers.active:
            for build, _, _ in batch:
                self.watchers.event("build", build=build.summary())
        self.watchers.touch()

    def start_run(self, build: Build, runner: RunnerRecord, attempt: int) -> None:
        """Send a hand-out's ``run``. On the runner's open kept connection it is
        posted: a write now and a callback for its answer, no task or timer (the
        runner answers in order, so a runner that never answers it answers no
        ping either, and the heartbeat finds it lost). Otherwise a task connects
        first. Either way ``sched.sent`` follows, whatever the answer."""
        if not self._pinned(build, runner, attempt):
            self.sched.sent(build.id, attempt, self.clock())
            return
        msg = self._run_message(build, attempt)
        link = self.link(runner)
        if not link.connected:
            self.spawn(self.send_run(build, runner, attempt, msg))
            return
        try:
            link.post(msg, functools.partial(self._run_answered, build, runner, attempt, msg))
        except (net.PeerError, protocol.ProtocolError) as exc:
            self._run_answered(build, runner, attempt, msg, None, exc)

    def _run_answered(self, build: Build, runner: RunnerRecord, attempt: int, msg: dict,
                      reply: dict | None, exc: Exception | None) -> None:
        if exc is None and reply["type"] == "error":
            exc = protocol.RemoteError(reply)
        if isinstance(exc, net.PeerError) and not isinstance(exc, (net.PeerRefused, net.PeerTimeout)) \
                and self.sched.is_leased(build.id, attempt) and not self.beat.stopped:
            # the kept connection was dead (the runner restarted or stopped): one fresh
            # attempt tells a stopped runner from a live one at once. Not when the
            # dispatcher stops: its own close of the connections failed the run
            self.spawn(self.send_run(build, runner, attempt, msg))
            return
        try:
            if exc is not None:
                self._run_failed(build, runner, attempt, exc)
        finally:
            # acknowledged, refused or unknown: from now on the runner's pongs tell
            self.sched.sent(build.id, attempt, self.clock())

    async def send_run(self, build: Build, runner: RunnerRecord, attempt: int, msg: dict) -> None:
        """The ``run`` sent by a task: connecting first (no kept connection yet),
        or once more after a post found the kept one dead."""
        try:
            link = self.link(runner)
            await link.connect()
            if self._pinned(build, runner, attempt):     # connecting takes time: asked again
                await link.request(msg)
        except (protocol.RemoteError, net.PeerError, protocol.ProtocolError, ValueError) as exc:
            self._run_failed(build, runner, attempt, exc)
        finally:
            # acknowledged, refused or unknown: from now on the runner's pongs tell
            self.sched.sent(build.id, attempt, self.clock())

    def _pinned(self, build: Build, runner: RunnerRecord, attempt: int) -> bool:
        """Whether (build, attempt) is still ``runner``'s lease. The lease is pinned
        when the send is decided: should the build be taken back and handed to
        someone else before the run goes, sending build.attempt then would give
        one lease to two runners."""
        return self.sched.is_leased(build.id, attempt) and build.runner == runner.name

    def _run_message(self, build: Build, attempt: int) -> dict:
        cfg = self.config.build
        msg = {"type": "run", "build": build.id, "attempt": attempt, "repo": build.repo,
               "sha": build.sha, "branch": build.branch, "steps": list(cfg.steps),
               "timeout": cfg.timeout, "env": dict(cfg.env), "job": build.job,
               "artifacts_limit": self.config.dispatcher.max_artifact_bytes}
        if build.needs:     # the artifacts of the builds it needs, fetched into its checkout
            msg["inputs"] = needs.inputs(build, self.store.commit_builds(build.repo, build.sha), self.artifacts.list)
        msg.update(self.definition_fields(build))
        return msg

    def _run_failed(self, build: Build, runner: RunnerRecord, attempt: int, exc: Exception) -> None:
        if isinstance(exc, protocol.RemoteError):
            log.warning("runner %s refused build %d: %s", runner.name, build.id, exc)
            self.apply(self.sched.refused(build.id, attempt, f"runner {runner.name} refused it: {exc}",
                                          self.clock()))
        elif isinstance(exc, (net.PeerRefused, net.PeerAuthFailed)):    # the run never reached runner.name
            self.beat.lost(runner, exc)
        else:
            # unknown whether it arrived (or the runner answered outside the protocol): the next pong tells
            log.warning("sending build %d to %s: %s", build.id, runner.name, exc)

    def definition_fields(self, build: Build) -> dict:
        """What a `run` adds for the repository's definition kept here (the runner
        uses it when the checkout has no .ci.yaml, or it overrides) and for the
        build secrets the job asked for and its branch may have. The message
        itself is never logged: it may hold those values."""
        fields: dict = {}
        pipeline = self.settings.pipeline(build.repo)
        if pipeline is not None:
            fields.update(definition=pipeline.text, override=pipeline.override)
        if build.secrets:
            fields["secrets"] = self.settings.secrets_for(build.secrets, build.branch)
            gone = [name for name in build.secrets if name not in fields["secrets"]]
            if gone:    # allowed when queued, no longer (the configuration changed since): names only
                log.warning("build %d runs without secret(s) %s: %s", build.id, ", ".join(gone),
                            self.settings.secret_problem(gone[0], build.branch))
        return fields

    def cancel(self, runner: RunnerRecord, build_id: int, attempt: int) -> None:
        self.spawn(self.send_cancel(runner, build_id, attempt))

    async def send_cancel(self, runner: RunnerRecord, build_id: int, attempt: int) -> None:
        try:
            await self.link(runner).request({"type": "cancel", "build": build_id, "attempt": attempt})
            log.info("cancelled build %d attempt %d on %s", build_id, attempt, runner.name)
        except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
            log.warning("cancelling build %d on %s: %s", build_id, runner.name, exc)

    # ------------------------------------------------------------ runners

    async def forget(self, name: str) -> RunnerRecord:
        """Remove a dead runner: from the scheduler, the store and the viewers'
        screens. KeyError: unknown; ValueError: alive."""
        runner = self.sched.registry.forget(name)
        with self.store.transaction():
            self.store.forget_runners([name])
        self.beat.waiting_for.discard(name)
        self.beat.out.pop(name, None)
        link = self.links.pop(name, None)
        if link is not None:
            await link.close()
        if self.watchers.active:
            self.watchers.event("runner_forgotten", runner={"name": name})
        self.watchers.touch()
        return runner

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        await self.beat.loop(stop)

    async def taken_by(self, name: str, host: str, port: int) -> str:
        return await self.beat.taken_by(name, host, port)
