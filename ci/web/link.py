"""The web process's way to the dispatcher: a client like the console's,
with the reader role (and the operator role only when actions are on).

Sends (role reader): ``status``, ``build``, ``history``, ``branch_status``,
``log_window``, ``counts``, ``artifacts``, ``fetch_artifact``, and the two
streams ``read_log`` and ``watch``. Requests share a few kept connections
(``net.Client`` serialises its requests; a page asks several things at
once); each stream has a connection of its own for as long as it runs.

``watch`` feeds a ``Tracker`` (the live picture, see ``tracker.py``) and is
opened again with capped, jittered backoff whenever it breaks.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from .. import aio, net, protocol

log = logging.getLogger(__name__)

POOL = 4                        # kept connections for plain requests
REQUEST_TIMEOUT = 10.0
STREAM_IDLE = 30.0              # no frame for this long: open a fresh watch (the old one may be dead)
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 5.0
WATCH_LIMIT = 100


class Unreachable(Exception):
    """The dispatcher cannot be asked; the message says why, in one line."""


def describe(exc: BaseException, addr: str) -> str:
    """One line for a page or a log: what went wrong talking to the dispatcher."""
    if isinstance(exc, net.PeerAuthFailed) or getattr(exc, "code", "") == "auth_failed":
        return (f"the dispatcher at {addr} refused the web's credentials: set auth.reader_secret "
                f"(or auth.secret) to the dispatcher's")
    if isinstance(exc, net.PeerRefused):
        return f"cannot reach the dispatcher at {addr} (connection refused)"
    if isinstance(exc, net.PeerTimeout):
        return f"cannot reach the dispatcher at {addr} (timed out)"
    if isinstance(exc, protocol.RemoteError):
        return exc.message or exc.code
    return f"the dispatcher at {addr}: {exc}"


class Link:
    def __init__(self, host: str, port: int, secrets: dict[str, str], limits: net.Limits, tls=None):
        self.host, self.port, self.secrets, self.limits, self.tls = host, port, secrets, limits, tls
        self.addr = f"{host}:{port}"
        self._idle: list[net.Client] = []

    def client(self, role: str = protocol.READER) -> net.Client:
        return net.Client(self.host, self.port, role, self.secrets.get(role, ""), self.limits, self.tls)

    async def request(self, msg: dict, role: str = protocol.READER) -> dict:
        """One request and its reply. RemoteError for an error reply (``not_found``...);
        Unreachable when the dispatcher cannot be asked. A kept connection that
        turns out dead (the dispatcher restarted) is replaced once at once:
        every request here only reads, so asking again is safe."""
        while True:
            pooled = role == protocol.READER and bool(self._idle)
            client = self._idle.pop() if pooled else self.client(role)
            keep = False
            try:
                reply = await client.request(msg, REQUEST_TIMEOUT)
                keep = True
                return reply
            except protocol.RemoteError as exc:
                keep = exc.code != "auth_failed"
                if not keep:
                    raise Unreachable(describe(exc, self.addr)) from None
                raise
            except (net.PeerError, protocol.ProtocolError, OSError) as exc:
                if pooled and not isinstance(exc, (net.PeerTimeout, net.PeerAuthFailed)):
                    await self._drop_idle()
                    continue
                raise Unreachable(describe(exc, self.addr)) from None
            finally:
                if keep and role == protocol.READER and len(self._idle) < POOL:
                    self._idle.append(client)
                else:
                    await client.close()

    async def _drop_idle(self) -> None:
        """Close every kept connection: when one is dead, they all are."""
        idle, self._idle = self._idle, []
        for client in idle:
            await client.close()

    @asynccontextmanager
    async def stream(self, msg: dict, idle: float | None = STREAM_IDLE) -> AsyncIterator[AsyncIterator[dict]]:
        """The frames of a stream on a connection of its own, closed when the block ends."""
        client = self.client()
        frames = client.stream(msg, idle=idle)
        try:
            yield frames
        finally:
            await frames.aclose()
            await client.close()

    async def close(self) -> None:
        await self._drop_idle()

    async def watch(self, tracker, stop: asyncio.Event) -> None:
        """Feed ``tracker`` from the ``watch`` stream until ``stop``; never gives up."""
        retry = aio.Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        while not stop.is_set():
            got = False
            try:
                async with self.stream({"type": "watch", "limit": WATCH_LIMIT}) as frames:
                    async for frame in frames:
                        if frame["type"] == "ok":
                            got = True
                            tracker.snapshot(frame)
                            retry.reset()
                        elif frame["type"] == "event":
                            tracker.event(frame)
                        elif frame["type"] == "end":
                            tracker.lost(frame.get("reason") or "the dispatcher ended the stream")
            except net.PeerTimeout:
                if got:
                    continue        # quiet for a while: a fresh watch tells whether the link still works
                tracker.lost(describe(net.PeerTimeout(), self.addr))
            except (net.PeerError, protocol.RemoteError, protocol.ProtocolError, OSError) as exc:
                problem = describe(exc, self.addr)
                if tracker.problem != problem:
                    log.warning("%s", problem)
                tracker.lost(problem)
            try:
                await aio.within(stop.wait(), retry.next())
            except asyncio.TimeoutError:
                pass
