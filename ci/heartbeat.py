"""The dispatcher's heartbeat: a ``ping`` to every live runner each
``heartbeat_interval`` on its kept connection (``RunnerLinks.link``, a
``keptlink.KeptLink``), what the pongs and the silences teach handed to the
scheduler, and the claim of a runner's name from another address.

The heartbeat runs on the monotonic clock, one ``tick`` an interval. A tick
judges each ping still out: unanswered, it is a miss, and
``heartbeat_misses`` in a row make the runner lost (``Scheduler.missed``).
It stays out meanwhile, on the same connection: when its pong comes late (a
busy runner, or a busy dispatcher), it still counts, and nothing is made
again. Dropping the connection at each late pong and making it anew (a
handshake in both processes) is what made 500 runners' heartbeats collapse
under their own reconnections. A tick that comes late because this process
itself was not running (SIGSTOP, a VM pause, swap, a loop too busy to look)
judges nothing: what it would count proves nothing about the runners, and
the next tick judges (never two such in a row: a loop late all the time
still finds a frozen runner, at half the pace). Then each runner with no ping out gets one.

A ping is a write, and its pong a callback (``KeptLink.post``): no task, timer
or lock per ping, since pings are most of an idle dispatcher's work. One
that fails outright (a reset, no route) is sent again at once, once, on a
connection made anew (the kept one may have died with a runner that
restarted); failing again, it is a miss at the next tick, which sends the
next. Refused, or answered by something that cannot prove it is that
runner: lost at once (after the restart grace of a runner known from
before). A ping out for longer than ``read_timeout`` closes its connection,
and the next goes on a new one.

A registration of a live runner's name from another address asks
``taken_by``: the holder is pinged once at once, on a connection of its own,
and keeps its name only if it answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

from . import aio, net, protocol, sanitize
from .models import RunnerRecord

log = logging.getLogger(__name__)

# a tick later than this many intervals after the last is our own process
# having stood still, not the runners' silence
STALLED = 1.5
PING = {"type": "ping"}


@dataclass
class Ping:
    """A ping out to ``runner``: unanswered yet, or ``failed`` (why), which
    the next tick counts."""
    runner: RunnerRecord
    sent: float             # when it went out: the scheduler judges leases by it
    retried: bool = False   # this one is the at-once second try
    failed: str = ""


class Heartbeat:
    def __init__(self, links: Any):
        """``links``: the ``RunnerLinks`` it works through (its connections,
        scheduler, clock, plan sink and unsent leases; not imported: it imports this)."""
        self.links = links
        self.out: dict[str, Ping] = {}              # runner name -> its ping out
        self.waiting_for: set[str] = set()          # runners known from before a restart, said so once
        self.claims: dict[str, asyncio.Lock] = {}   # runner name -> held while a registration claims it
        self.last_tick: float | None = None
        self.skipped = False        # the last tick judged nothing (this process had stood still)
        self.stopped = False

    async def loop(self, stop: asyncio.Event) -> None:
        """A tick each heartbeat_interval, and the runners dead for longer than
        forget_dead_after forgotten."""
        links = self.links
        cfg = links.config.dispatcher
        next_tick = 0.0
        while not stop.is_set():
            now = links.clock()
            if now >= next_tick:
                next_tick = now + cfg.heartbeat_interval
                self.tick(now)
                for name in links.sched.registry.forgettable(cfg.forget_dead_after, now):
                    log.info("forgetting runner %s: dead for %gs or more (dispatcher.forget_dead_after)",
                             name, cfg.forget_dead_after)
                    await links.forget(name)
            try:
                await aio.within(stop.wait(), max(0.0, next_tick - links.clock()))
            except asyncio.TimeoutError:
                pass

    def tick(self, now: float) -> None:
        """One interval: each ping out judged, then a ping to each live runner
        with none out. What goes wrong for one runner (a plan that cannot be
        stored: a full disk) is logged and leaves the others' pings alone."""
        interval = self.links.config.dispatcher.heartbeat_interval
        # judged nothing: a tick this late means this process stood still. Never two in a
        # row, so that a loop late all the time (too busy) still finds a frozen runner
        stalled = (self.last_tick is not None and now - self.last_tick > interval * STALLED
                   and not self.skipped)
        if stalled:
            log.info("this dispatcher was not running for %.1fs (a heartbeat every %gs): the %d ping(s) out "
                     "meanwhile are not counted as misses", now - self.last_tick, interval, len(self.out))
        self.last_tick, self.skipped = now, stalled
        runners = self.links.sched.runners
        for name, ping in list(self.out.items()):
            if not ping.runner.alive or runners.get(name) is not ping.runner:
                del self.out[name]          # lost, or registered anew, meanwhile
            elif stalled and ping.failed:
                del self.out[name]          # not counted: sent again below
            elif not stalled:
                self._guarded(name, self._judge, ping, now)
        for runner in list(runners.values()):
            if runner.alive and runner.name not in self.out:
                self._guarded(runner.name, self.send, runner, now)

    def _guarded(self, name: str, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception:
            log.exception("the heartbeat of runner %s failed; the next tick tries again", name)

    def _judge(self, ping: Ping, now: float) -> None:
        """A ping out at a tick: a miss, with why (failed, or no pong yet)."""
        runner = ping.runner
        if ping.failed:
            del self.out[runner.name]
            self._missed(runner, ping.failed, now)
            return
        interval = self.links.config.dispatcher.heartbeat_interval
        self._missed(runner, f"no pong within {interval:g}s", now)
        limit = self.links.settings.limits.read_timeout
        if runner.alive and now - ping.sent > limit:
            # out of step or dead: the pong is not coming on this connection. Replaced
            # first, so that its failure is not counted again; a fresh ping goes below
            del self.out[runner.name]
            self.links.link(runner).drop(net.PeerTimeout(f"{runner.host}:{runner.port} did not answer a ping "
                                                         f"within {limit:g}s"))
        elif not runner.alive:
            self.out.pop(runner.name, None)

    def send(self, runner: RunnerRecord, now: float, retried: bool = False) -> None:
        """A ping out to ``runner`` now (on its kept connection, made first if need be)."""
        ping = self.out[runner.name] = Ping(runner, now, retried)
        link = self.links.link(runner)
        if link.connected:
            self._post(link, ping)
        else:
            self.links.spawn(self._dial(link, ping))

    async def _dial(self, link: Any, ping: Ping) -> None:
        try:
            await link.connect()
        except ValueError as exc:       # a host name the resolver refuses (UnicodeError from idna)
            self._failed(ping, f"cannot reach {sanitize.plain(ping.runner.host)!r}: {exc}")
        except (net.PeerError, protocol.ProtocolError) as exc:
            self.answered(ping, None, exc)
        else:
            self._post(link, ping)

    def _post(self, link: Any, ping: Ping) -> None:
        try:
            link.post(PING, functools.partial(self.answered, ping))
        except (net.PeerError, protocol.ProtocolError) as exc:
            self.answered(ping, None, exc)

    def answered(self, ping: Ping, reply: Any, exc: Any) -> None:
        """The pong to ``ping``, or why none came (``exc``)."""
        links, runner = self.links, ping.runner
        if self.out.get(runner.name) is not ping or self.stopped:
            return          # judged and replaced, or the runner gone, meanwhile; or shutting down
        if not runner.alive or links.sched.runners.get(runner.name) is not runner:
            del self.out[runner.name]
            return
        if exc is None and reply["type"] == "error":
            exc = protocol.RemoteError(reply)
        if exc is None:
            del self.out[runner.name]
            self._pong(runner, ping, reply)
        elif isinstance(exc, (net.PeerRefused, net.PeerAuthFailed)):
            del self.out[runner.name]
            self.lost(runner, exc)
        elif isinstance(exc, net.PeerTimeout) or ping.retried:
            self._failed(ping, str(exc))
        else:       # e.g. a connection reset: the kept one may be dead, so once more, at once (made anew if it was)
            self.send(runner, links.clock(), retried=True)

    def _failed(self, ping: Ping, why: str) -> None:
        if self.out.get(ping.runner.name) is ping:
            ping.failed = why

    def _pong(self, runner: RunnerRecord, ping: Ping, reply: dict) -> None:
        links = self.links
        leases = {tuple(lease) for lease in reply["running"]}
        unsent = links.unsent.get(runner.name)
        if unsent:      # what it was given but not yet sent, it cannot report: not a reason to take it back
            leases |= unsent & runner.running
        self.waiting_for.discard(runner.name)
        # always applied, empty or not: a lease taken back with an empty plan still ended an
        # attempt (a cancelled build its runner has stopped), whose unfinished uploads apply
        # settles; an empty plan costs apply no more than that look
        links.apply(links.sched.heartbeat(runner.name, leases, ping.sent, links.clock()))
        # one small frame per runner per interval, so a console's "last seen" stays true
        if links.watchers.active and runner.alive:
            links.watchers.event("runner", runner=runner.summary())

    def _missed(self, runner: RunnerRecord, why: str, now: float) -> None:
        log.debug("ping %s: %s", runner.name, why)
        self.links.apply(self.links.sched.missed(runner.name, why, now))

    def lost(self, runner: RunnerRecord, exc: net.PeerError) -> None:
        """Nothing listens at its address, or what does is not that runner (it
        cannot prove it holds the runner's key: another process took the port,
        or a relay). A runner known from before a restart has its window to
        come back first."""
        links = self.links
        now = links.clock()
        if links.sched.registry.in_grace(runner.name, now):
            if runner.name not in self.waiting_for:
                self.waiting_for.add(runner.name)
                log.info("runner %s (%s:%d), known from before this dispatcher started, does not answer "
                         "yet (%s); it has %.1fs to come back before its builds are taken back",
                         runner.name, runner.host, runner.port, exc, runner.grace_until - now)
            return
        if isinstance(exc, net.PeerAuthFailed) and runner.alive:
            log.warning("runner %s: %s", runner.name, exc)
        links.apply(links.sched.unreachable(runner.name, str(exc), now))

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
        old = self.links.sched.runners.get(name)
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
        interval = self.links.config.dispatcher.heartbeat_interval
        client = self.links.dial(runner)
        try:
            await aio.within(client.request({"type": "ping"}, timeout=interval), interval)
            return ""
        except asyncio.TimeoutError:
            return f"did not answer a ping within {interval:g}s"
        except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
            return f"did not answer a ping ({exc})"
        finally:
            await client.close()
