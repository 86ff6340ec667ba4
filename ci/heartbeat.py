"""The dispatcher's heartbeat: a ``ping`` to every live runner each
``heartbeat_interval`` on its kept connection (``RunnerLinks.link``), what
the pongs and the silences teach handed to the scheduler, and the claim of a
runner's name from another address.

The heartbeat runs on the monotonic clock. Each interval a ping goes
unanswered is a miss, and ``heartbeat_misses`` in a row make the runner lost
(``Scheduler.missed``). An unanswered ping stays out meanwhile, on the same
connection: when its pong comes late (a busy runner, or a busy dispatcher),
it still counts, and nothing is made again. Dropping the connection at each
late pong and making it anew (a handshake in both processes) is what made
500 runners' heartbeats collapse under their own reconnections. A wait that
ended late because this process itself was not running (SIGSTOP, a VM pause,
swap, a loop too busy to look) proves nothing about the runner and is not
counted: the next interval judges. A ping that fails outright (a reset, no
route) is a miss too, and the next goes out one interval after it, on a
connection made anew (at once, once, when the kept one turns out dead).
Refused, or answered by something that cannot prove it is that runner: lost
at once (after the restart grace of a runner known from before).

A registration of a live runner's name from another address asks
``taken_by``: the holder is pinged once at once, on a connection of its own,
and keeps its name only if it answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import aio, net, protocol, sanitize
from .models import RunnerRecord

log = logging.getLogger(__name__)

# a wait for a pong that ends later than this many intervals after it began is
# our own process having stood still, not the runner's silence
STALLED = 1.5


class Heartbeat:
    def __init__(self, links: Any):
        """``links``: the ``RunnerLinks`` it works through (its connections,
        scheduler, clock, plan sink and unsent leases; not imported: it imports this)."""
        self.links = links
        self.pinging: set[str] = set()
        self.waiting_for: set[str] = set()          # runners known from before a restart, said so once
        self.claims: dict[str, asyncio.Lock] = {}   # runner name -> held while a registration claims it
        self.stalls, self.stall_said = 0, -float("inf")    # late waits not yet logged; when one last was

    async def loop(self, stop: asyncio.Event) -> None:
        """Ping every live runner each heartbeat_interval (a runner still
        answering the last ping is not pinged again), and forget the runners
        dead for longer than forget_dead_after."""
        links = self.links
        cfg = links.config.dispatcher
        next_ping = 0.0
        while not stop.is_set():
            now = links.clock()
            if now >= next_ping:
                next_ping = now + cfg.heartbeat_interval
                for runner in list(links.sched.runners.values()):
                    if runner.alive and runner.name not in self.pinging:
                        links.spawn(self.ping(runner))
                for name in links.sched.registry.forgettable(cfg.forget_dead_after, now):
                    log.info("forgetting runner %s: dead for %gs or more (dispatcher.forget_dead_after)",
                             name, cfg.forget_dead_after)
                    await links.forget(name)
            try:
                await aio.within(stop.wait(), max(0.0, next_ping - links.clock()))
            except asyncio.TimeoutError:
                pass

    async def ping(self, runner: RunnerRecord) -> None:
        """Ping until the runner answers, refuses or is lost: each interval
        without an answer is a miss (see the module docstring), so a frozen
        runner is lost about heartbeat_misses intervals after it froze."""
        links = self.links
        interval = links.config.dispatcher.heartbeat_interval
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        gone = False

        def silent(since: float) -> None:
            # a timer rather than a task per ping to wait beside the exchange: pings are most of an idle dispatcher
            nonlocal timer, gone
            self._missed(runner, since, interval, f"no pong within {interval:g}s")
            if runner.alive and links.sched.runners.get(runner.name) is runner:
                timer = loop.call_later(interval, silent, links.clock())
            elif task is not None:
                gone = True
                task.cancel()       # its exchange waits no more

        self.pinging.add(runner.name)
        timer = None
        try:
            while runner.alive and links.sched.runners.get(runner.name) is runner:
                since = links.clock()
                timer = loop.call_later(interval, silent, since)
                try:
                    why = await self._exchange(runner, since)
                finally:
                    timer.cancel()
                if not why:
                    return          # answered, or handed to the scheduler as lost
                self._missed(runner, since, interval, why)
                await asyncio.sleep(max(0.0, since + interval - links.clock()))
        except asyncio.CancelledError:
            if not gone:
                raise
            if task is not None and hasattr(task, "uncancel"):     # 3.11+
                task.uncancel()     # the cancel was this ping's own, for a runner now lost
        finally:
            self.pinging.discard(runner.name)

    async def _exchange(self, runner: RunnerRecord, sent_at: float) -> str:
        """One ping on the kept connection (made again at once, once, if it was
        dead), its pong handed to the scheduler; "" when answered or lost, else
        why it failed (a miss)."""
        links = self.links
        why = ""
        for retry in (False, True):
            try:
                # no deadline of its own beyond the connection's bounds: ``ping``
                # counts the misses while it waits, and cancels it when the runner is lost
                reply = await links.link(runner).request({"type": "ping"})
            except (net.PeerRefused, net.PeerAuthFailed) as exc:
                self.lost(runner, exc)
                return ""
            except net.PeerTimeout as exc:
                return str(exc)
            except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
                why = str(exc)          # e.g. no route to the host, or a connection reset
                if not retry:           # a dropped kept connection: reconnect once at once
                    continue
                return why
            except ValueError as exc:   # a host name the resolver refuses (UnicodeError from idna)
                return f"cannot reach {sanitize.plain(runner.host)!r}: {exc}"
            leases = {tuple(lease) for lease in reply["running"]}
            # what it was given but not yet sent, it cannot report: not a reason to take it back
            leases |= links.unsent.get(runner.name, set()) & runner.running
            self.waiting_for.discard(runner.name)
            links.apply(links.sched.heartbeat(runner.name, leases, sent_at, links.clock()))
            # one small frame per runner per interval, so a console's "last seen" stays true
            if links.watchers.active and runner.alive:
                links.watchers.event("runner", runner=runner.summary())
            return ""
        return why

    def _missed(self, runner: RunnerRecord, since: float, interval: float, why: str) -> None:
        now = self.links.clock()
        if now - since > interval * STALLED:
            # the wait ended late: this process was not running (paused, stopped,
            # swapped out, too busy), so the pong may be sitting unread. A stall
            # delays every runner's wait at once: one line an interval, not one a runner
            if now - self.stall_said < interval:
                self.stalls += 1
                return
            more = f" (and {self.stalls} other wait(s) since the last such line)" if self.stalls else ""
            self.stalls, self.stall_said = 0, now
            log.info("a wait for runner %s's pong ended %.1fs after it began, not within %gs: this "
                     "dispatcher was not running meanwhile; not counted as a miss%s", runner.name, now - since,
                     interval, more)
            return
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
