"""The dispatcher's side of talking to runners: hand-outs, cancels, and the
heartbeat.

Sends ``run`` (a hand-out), ``cancel`` and ``ping``; reads their replies
(``ok``, ``error`` busy, ``pong`` {running}). What a reply teaches (a runner
refused a build, a runner is gone, what a runner runs) goes to the
scheduler, and the plan that comes back to the dispatcher's ``apply``. Two
kept connections per runner, made again when the runner moves: one for
``run`` and ``cancel``, one for pings, so a slow ``run`` never holds up the
heartbeat. Each proves the dispatcher to that runner with the runner's own
key, for that runner's identity only (``runner:<name>``), and the runner
must prove it holds the key too: a runner at the address that cannot is
declared lost.

The heartbeat runs on the monotonic clock. Each ping, from connect to pong,
gets one heartbeat interval; one that runs out is a miss, and
``heartbeat_misses`` in a row make the runner lost (``Scheduler.missed``).
A ping whose timeout fired late because this process itself was not running
(SIGSTOP, a VM pause, swap) proves nothing about the runner and is not
counted: the next ping, sent after waking, judges. Dead runners are
forgotten after ``dispatcher.forget_dead_after`` seconds.

A registration of a live runner's name from another address asks
``taken_by``: the holder is pinged once at once, and keeps its name only if
it answers.

Hand-outs go in batches: each attempt's first log line is written in a
thread (creating a log file is the dearest step of a hand-out), then one
transaction for the whole batch, then the ``run``s. A lease that ended in
the meantime (cancelled, its runner lost) is dropped, never sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from . import aio, needs, net, protocol, sanitize
from .artifacts import Artifacts
from .buildlogs import BuildLogs
from .models import Build, RunnerRecord
from .scheduler import Plan, Scheduler
from .settings import Settings
from .store import Store
from .watchers import Watchers

log = logging.getLogger(__name__)

# a ping timeout that fires later than this many intervals after the send is
# our own process having stood still, not the runner's silence
STALLED = 1.5


class RunnerLinks:
    def __init__(self, settings: Settings, sched: Scheduler, store: Store, logs: BuildLogs,
                 artifacts: Artifacts, watchers: Watchers, *, apply: Callable[[Plan | None], None],
                 spawn: Callable, monotonic: Callable[[], float] = time.monotonic,
                 dial: Callable[[RunnerRecord], net.Client] | None = None):
        """``monotonic``: the clock of every deadline here and of the scheduler's ``now``."""
        self.config = settings.config
        self.settings = settings
        self.sched, self.store, self.logs = sched, store, logs
        self.artifacts, self.watchers = artifacts, watchers
        self.apply, self.spawn, self.clock = apply, spawn, monotonic
        self.dial = dial or self._dial
        self.links: dict[str, net.Client] = {}      # runner name -> connection for run/cancel
        self.ping_links: dict[str, net.Client] = {}     # runner name -> connection for pings
        self.pinging: set[str] = set()
        self.waiting_for: set[str] = set()          # runners known from before a restart, said so once
        self.claims: dict[str, asyncio.Lock] = {}   # runner name -> held while a registration claims it
        self.outgoing: list[tuple[Build, RunnerRecord, int]] = []   # assigned, not yet persisted and sent
        self.unsent: dict[str, set] = {}            # runner name -> leases of its assignments not yet sent
        self.handing_out: asyncio.Task | None = None

    def _dial(self, runner: RunnerRecord) -> net.Client:
        # no key for it (it could not have registered): the handshake fails, and says so
        key = self.settings.runner_key(runner.name) or ""
        return net.Client(runner.host, runner.port, protocol.DISPATCHER, key, self.settings.limits,
                          self.settings.client_tls, to=protocol.runner_identity(runner.name))

    def link(self, runner: RunnerRecord, kept: dict[str, net.Client] | None = None) -> net.Client:
        """The kept connection to ``runner`` in ``kept`` (default: for run and cancel)."""
        kept = self.links if kept is None else kept
        link = kept.get(runner.name)
        if link is None or (link.host, link.port) != (runner.host, runner.port):
            link = kept[runner.name] = self.dial(runner)
        return link

    async def close(self) -> None:
        for link in [*self.links.values(), *self.ping_links.values()]:
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
        # (see Scheduler.sending): every lease not handed to send_run is released below
        batch = [(build, runner, attempt) for build, runner, attempt in batch
                 if build.id in sizes and self.sched.sending(build.id, attempt, now)]
        spawned: set[int] = set()
        try:
            for build, _, _ in batch:
                self.logs.begin(build, sizes[build.id])
            with self.store.transaction():
                self.store.save(build for build, _, _ in batch)
            for build, runner, attempt in batch:
                log.info("build %d attempt %d -> %s", build.id, attempt, runner.name)
                if attempt > 1:
                    self.artifacts.clear(build.id, build.sha)     # what an earlier attempt uploaded
                self.spawn(self.send_run(build, runner, attempt))
                spawned.add(build.id)
        finally:
            for build, _, attempt in batch:
                if build.id not in spawned:
                    self.sched.sent(build.id, attempt, self.clock())
        if self.watchers.active:
            for build, _, _ in batch:
                self.watchers.event("build", build=build.summary())
        self.watchers.touch()

    async def send_run(self, build: Build, runner: RunnerRecord, attempt: int) -> None:
        try:
            await self._send_run(build, runner, attempt)
        finally:
            # acknowledged, refused or unknown: from now on the runner's pongs tell
            self.sched.sent(build.id, attempt, self.clock())

    async def _send_run(self, build: Build, runner: RunnerRecord, attempt: int) -> None:
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
        if build.needs:     # the artifacts of the builds it needs, fetched into its checkout
            msg["inputs"] = needs.inputs(build, self.store.commit_builds(build.repo, build.sha), self.artifacts.list)
        msg.update(self.definition_fields(build))
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
        except (net.PeerRefused, net.PeerAuthFailed) as exc:    # the run never reached runner.name
            self._lost(runner, exc)
        except (net.PeerError, protocol.ProtocolError) as exc:
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

    # ------------------------------------------------------------ heartbeat

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Ping every live runner each heartbeat_interval (a runner still
        answering the last ping is not pinged again), and forget the runners
        dead for longer than forget_dead_after."""
        cfg = self.config.dispatcher
        next_ping = 0.0
        while not stop.is_set():
            now = self.clock()
            if now >= next_ping:
                next_ping = now + cfg.heartbeat_interval
                for runner in list(self.sched.runners.values()):
                    if runner.alive and runner.name not in self.pinging:
                        self.spawn(self.ping(runner))
                for name in self.sched.forgettable(cfg.forget_dead_after, now):
                    log.info("forgetting runner %s: dead for %gs or more (dispatcher.forget_dead_after)",
                             name, cfg.forget_dead_after)
                    await self.forget(name)
            try:
                await aio.within(stop.wait(), max(0.0, next_ping - self.clock()))
            except asyncio.TimeoutError:
                pass

    async def forget(self, name: str) -> RunnerRecord:
        """Remove a dead runner: from the scheduler, the store and the viewers'
        screens. KeyError: unknown; ValueError: alive."""
        runner = self.sched.forget(name)
        with self.store.transaction():
            self.store.forget_runners([name])
        self.waiting_for.discard(name)
        for kept in (self.links, self.ping_links):
            link = kept.pop(name, None)
            if link is not None:
                await link.close()
        if self.watchers.active:
            self.watchers.event("runner_forgotten", runner={"name": name})
        self.watchers.touch()
        return runner

    async def ping(self, runner: RunnerRecord) -> None:
        """Ping until the runner answers, refuses or is lost. After a miss the
        next ping goes out one interval after the last one was sent (at once
        after a timeout), so a frozen runner is lost about heartbeat_misses
        intervals after it froze."""
        interval = self.config.dispatcher.heartbeat_interval
        self.pinging.add(runner.name)
        try:
            while runner.alive and self.sched.runners.get(runner.name) is runner:
                sent_at = self.clock()
                if not await self._ping_once(runner, interval):
                    return
                await asyncio.sleep(max(0.0, sent_at + interval - self.clock()))
        finally:
            self.pinging.discard(runner.name)

    async def _ping_once(self, runner: RunnerRecord, interval: float) -> bool:
        """One ping (and one reconnect at once if the kept connection was dead);
        True when it went unanswered: a miss."""
        why = ""
        for retry in (False, True):
            sent_at = self.clock()
            try:
                # the whole exchange, connect and handshake too, within one interval:
                # a frozen runner's kernel still accepts the connection
                reply = await aio.within(
                    self.link(runner, self.ping_links).request({"type": "ping"}, timeout=interval), interval)
            except (net.PeerRefused, net.PeerAuthFailed) as exc:
                self._lost(runner, exc)
                return False
            except (net.PeerTimeout, asyncio.TimeoutError):
                why = f"no pong within {interval:g}s"
                break
            except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
                why = str(exc)          # e.g. no route to the host, or a connection reset
                if not retry:           # a dropped kept connection: reconnect once at once
                    continue
                break
            except ValueError as exc:   # a host name the resolver refuses (UnicodeError from idna)
                why = f"cannot reach {sanitize.plain(runner.host)!r}: {exc}"
                break
            leases = {tuple(lease) for lease in reply["running"]}
            # what it was given but not yet sent, it cannot report: not a reason to take it back
            leases |= self.unsent.get(runner.name, set()) & runner.running
            self.waiting_for.discard(runner.name)
            self.apply(self.sched.heartbeat(runner.name, leases, sent_at, self.clock()))
            # one small frame per runner per interval, so a console's "last seen" stays true
            if self.watchers.active and runner.alive:
                self.watchers.event("runner", runner=runner.summary())
            return False
        self._missed(runner, sent_at, interval, why)
        return True

    def _missed(self, runner: RunnerRecord, sent_at: float, interval: float, why: str) -> None:
        now = self.clock()
        if now - sent_at > interval * STALLED:
            # the timeout fired late: this process was not running (paused,
            # stopped, swapped out), so the pong may be sitting unread
            log.info("ping to runner %s ended %.1fs after it was sent, not within %gs: this dispatcher "
                     "was not running meanwhile; not counted as a miss", runner.name, now - sent_at, interval)
            return
        log.debug("ping %s: %s", runner.name, why)
        self.apply(self.sched.missed(runner.name, why, now))

    def _lost(self, runner: RunnerRecord, exc: net.PeerError) -> None:
        """Nothing listens at its address, or what does is not that runner (it
        cannot prove it holds the runner's key: another process took the port,
        or a relay). A runner known from before a restart has its window to
        come back first."""
        now = self.clock()
        if self.sched.in_grace(runner.name, now):
            if runner.name not in self.waiting_for:
                self.waiting_for.add(runner.name)
                log.info("runner %s (%s:%d), known from before this dispatcher started, does not answer "
                         "yet (%s); it has %.1fs to come back before its builds are taken back",
                         runner.name, runner.host, runner.port, exc, runner.grace_until - now)
            return
        if isinstance(exc, net.PeerAuthFailed) and runner.alive:
            log.warning("runner %s: %s", runner.name, exc)
        self.apply(self.sched.unreachable(runner.name, str(exc), now))

    # ------------------------------------------------------------ names

    async def taken_by(self, name: str, host: str, port: int) -> str:
        """The address of the live runner at another host:port that holds
        ``name``, or "" when there is none. The holder is pinged once, at once,
        on a connection of its own: when it does not answer within a heartbeat
        interval, the name is free, so a runner that restarted elsewhere takes
        its name back at once, and nobody takes over a live runner's name.
        (The registration that follows takes back the builds the newcomer does
        not report, as for a restart in place, and keeps those it does: its
        outbox may hold their results.)"""
        # one claim of a name at a time: two at once would both find the old holder gone and
        # both take the name. The caller registers before its next await, so before the next
        # claim runs. A lock per name, kept as long as the scheduler keeps the name: for ever
        async with self.claims.setdefault(name, asyncio.Lock()):
            return await self._taken_by(name, host, port)

    async def _taken_by(self, name: str, host: str, port: int) -> str:
        old = self.sched.runners.get(name)
        if old is None or not old.alive or (old.host, old.port) == (host, port):
            return ""
        holder = f"{old.host}:{old.port}"
        why = await self._probe(old)
        if not old.alive:           # the heartbeat gave it up meanwhile
            return ""
        if not why:
            return holder
        log.info("runner %s registers from %s:%d; its old address %s %s", name, host, port, holder, why)
        return ""

    async def _probe(self, runner: RunnerRecord) -> str:
        """"" when the runner answers a ping within a heartbeat interval, else why not."""
        interval = self.config.dispatcher.heartbeat_interval
        client = self.dial(runner)
        try:
            await aio.within(client.request({"type": "ping"}, timeout=interval), interval)
            return ""
        except asyncio.TimeoutError:
            return f"did not answer a ping within {interval:g}s"
        except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
            return f"did not answer a ping ({exc})"
        finally:
            await client.close()
