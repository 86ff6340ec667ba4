"""Keeps a runner registered with the dispatcher: registers at start-up, and
again whenever the dispatcher's pings stop for ``FORGOTTEN_AFTER`` heartbeat
intervals (it restarted, or forgot the runner). Never gives up on an absent
dispatcher: it retries with backoff and says so once per outage. A
refused credential is another matter: ``run`` raises ``Refused`` and the
runner stops, since the same secret would be refused forever.

Sends, to the dispatcher:
    register {name, host, port, labels, slots, running}   -> ok {heartbeat_interval}
                                                             | error name_taken (a live runner holds the name)

The connection authenticates as this runner (role runner, id = its name):
the name registered is that one, or the dispatcher refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from . import aio, net, protocol

log = logging.getLogger(__name__)

FORGOTTEN_AFTER = 5         # heartbeat intervals without a ping before registering again


class Refused(Exception):
    """The dispatcher refused this runner's credentials: retrying the same
    secret cannot help, so the runner stops, saying so in one line."""


def refusal(exc: BaseException) -> bool:
    """True for an answer that means our secret is wrong (not that the dispatcher is away)."""
    return isinstance(exc, net.PeerAuthFailed) or (
        isinstance(exc, protocol.RemoteError) and exc.code == "auth_failed")


class Registration:
    """``message()`` builds each ``register`` afresh (the leases held change)."""

    def __init__(self, client: net.Client, message: Callable[[], dict]):
        self.client = client
        self.message = message
        self.last_ping = time.monotonic()

    def pinged(self) -> None:
        """The dispatcher pinged: it knows this runner."""
        self.last_ping = time.monotonic()

    async def run(self) -> None:
        addr = self.client.addr
        backoff = aio.Backoff()
        down = False
        quiet = False       # the dispatcher answers registrations but never pings: say so once
        while True:
            msg = self.message()
            try:
                reply = await self.client.request(msg)
            except (net.PeerError, protocol.ProtocolError, protocol.RemoteError) as exc:
                if refusal(exc):
                    raise Refused(f"the dispatcher at {addr} refused the credentials of runner {msg['name']} "
                                  f"({exc}): set auth.runner_secret (or auth.secret) to the secret the "
                                  f"dispatcher holds for it; under `tinyci up`, start it in or below the "
                                  f"directory up ran in") from None
                if not down:
                    if isinstance(exc, protocol.RemoteError) and exc.code == "name_taken":
                        log.error("the dispatcher at %s refused the name %s: %s; retrying in the background "
                                  "in case that runner stops", addr, msg["name"], exc.message)
                    else:
                        log.warning("cannot register with the dispatcher at %s: %s; "
                                    "retrying in the background until it answers", addr, exc)
                down = True
                await asyncio.sleep(backoff.next())
                continue
            interval = reply["heartbeat_interval"]         # the table checks it is a positive number
            (log.debug if quiet else log.info)(
                "registered with the dispatcher at %s as %s (%d slot(s), %d lease(s) held)",
                addr, msg["name"], msg["slots"], len(msg["running"]))
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

    async def close(self) -> None:
        await self.client.close()
