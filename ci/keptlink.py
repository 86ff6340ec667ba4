"""A kept connection on which requests overlap: the dispatcher's link to
each runner (``run``, ``cancel`` and ``ping``).

Each request is written at once and its reply matched to it in order, by
a protocol's callback: a server answers one request before it reads the
next (``net._serve_requests``), so replies come back in the order the
requests went out. No task, timer, lock or stream read per request: an idle
dispatcher's work is its pings, one per runner per interval, and through
``net.Client`` each one cost twice what the exchange itself costs (a lock, a
deadline, two stream reads, a task to wait in). Here a ping is a write and,
later, a callback (``post``); ``request`` is the same with a future for the
callers that wait.

The handshake is ``net.Client``'s, on its streams; then the transport is
handed to ``_Replies``, which frames what arrives. Replies only: no streams,
no bulk frames. Every reply is checked against the table
(``protocol.check_reply``); a frame it does not allow, one nobody waits
for, or one that cannot be read puts the connection out of step: it is
closed, and every request still waiting fails.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

from . import net, protocol
from .aio import within
from .limits import Limits

log = logging.getLogger(__name__)

OnReply = Callable[[Any, Any], None]   # (reply, None) or (None, the exception that ended the wait)


class KeptLink:
    """A kept, authenticated connection to one peer, made on demand, whose
    requests overlap. Errors are ``net.Client``'s: PeerRefused, PeerTimeout,
    PeerAuthFailed, PeerError, ProtocolError (a reply the table does not
    allow), RemoteError (an ``error`` reply, from ``request``)."""

    def __init__(self, host: str, port: int, role: str, secret: str = "", limits: Limits = Limits(),
                 ssl: Any = None, *, id: str = "", to: str = protocol.DISPATCHER_ID):
        self.host, self.port, self.limits = host, port, limits
        self.addr = f"{host}:{port}"
        self._dialer = net.Client(host, port, role, secret, limits, ssl, id=id, to=to)
        self._replies: _Replies | None = None
        self._connecting: asyncio.Future | None = None

    @property
    def connected(self) -> bool:
        """A connection is open, as far as is known without asking."""
        return self._replies is not None and not self._replies.closed

    async def connect(self) -> None:
        """Make the connection unless there is one; callers at once share one attempt."""
        if self.connected:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._opened)
        attempt = self._connecting
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and not (task is not None and getattr(task, "cancelling", lambda: 1)()):
                # the attempt was stopped by ``close``, not this caller (3.11+ tells them apart)
                raise net.PeerError(f"the connection to {self.addr} was closed") from None
            raise

    async def _open(self) -> None:
        conn = await self._dialer.open()
        self._replies = _Replies.take_over(conn, self.addr, self.limits)

    def _opened(self, attempt: asyncio.Future) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()     # retrieved: its callers got it

    def post(self, msg: dict, on_reply: OnReply) -> None:
        """Write ``msg`` now, on the open connection (``connect`` first);
        ``on_reply(reply, None)`` when its reply is in, checked against the
        table (an ``error`` reply included), or ``on_reply(None, exc)`` when
        the connection fails or falls out of step first. The reply to a bare
        request (``ping``) may be the same dict as the last one: read it, do not change it."""
        if not self.connected:
            raise net.PeerError(f"no connection to {self.addr}")
        self._replies.post(msg, on_reply)

    async def request(self, msg: dict, timeout: float | None = None) -> dict:
        """Send one request and return its reply (connecting first if need be).
        A reply not in within ``timeout`` (``read_timeout``) closes the
        connection: the replies behind it would be out of step. As with ``post``, a
        bare request's reply may be shared with the last one: read it, do not change it."""
        await self.connect()
        future = asyncio.get_running_loop().create_future()

        def settle(reply: Any, exc: Any) -> None:
            if not future.done():
                future.set_exception(exc) if exc is not None else future.set_result(reply)

        replies = self._replies
        self.post(msg, settle)
        wait = self.limits.read_timeout if timeout is None else timeout
        try:
            reply = await within(future, wait)      # cancelled with its waiter: a late reply finds it done
        except asyncio.TimeoutError:
            replies.fail(net.PeerTimeout(f"{self.addr} did not answer {msg['type']!r} within {wait:g}s"))
            raise net.PeerTimeout(f"{self.addr} did not answer {msg['type']!r} within {wait:g}s") from None
        if reply["type"] == "error":
            raise protocol.RemoteError(reply)
        return reply

    def drop(self, exc: Exception) -> None:
        """Close the connection: every request waiting fails with ``exc``."""
        if self._replies is not None:
            self._replies.fail(exc)

    def abandon(self, exc: Exception) -> None:
        """``drop``, and a connection being made now is closed once made (the
        peer moved: this link is no longer kept)."""
        self.drop(exc)
        if self._connecting is not None:
            self._connecting.cancel()

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        self.drop(net.PeerError(f"the connection to {self.addr} was closed"))


_BARE: dict[str, bytes] = {}     # the frames of messages that are a type alone (``ping``): always the same


def _encoded(msg: dict) -> tuple[bytes, Any, bool]:
    """The frame of ``msg``, its bulk part, and whether it is a bare message (a type alone)."""
    if len(msg) == 1:
        frame = _BARE.get(msg["type"])
        if frame is None:
            frame = _BARE[msg["type"]] = protocol.encode_parts(msg)[0]
        return frame, None, True
    return (*protocol.encode_parts(msg), False)


class _Replies(asyncio.Protocol):
    """Frames the replies of one connection and hands each to the request
    waiting longest (``waiting``, in the order they were written).

    The reply to a bare request (``ping``) whose bytes are those of the last
    reply to the same request is the last one again, not decoded and checked
    anew: decoding and checking are a function of those bytes and the
    request's type alone, and an idle runner's pong is the same bytes every
    time. Its callback gets the same dict as the last time: read it, do not
    change it."""

    def __init__(self, transport: Any, peer: str, limits: Limits):
        self.transport, self.peer, self.limits = transport, peer, limits
        self.buffer = bytearray()
        # (request type, its callback, whether the request was bare), in the order written
        self.waiting: collections.deque[tuple[str, OnReply, bool]] = collections.deque()
        self.last: tuple[str, bytes, dict] | None = None    # a bare request's type, its last reply's body, that reply
        self.closed = False
        self.conn: net.Connection | None = None

    @classmethod
    def take_over(cls, conn: net.Connection, peer: str, limits: Limits) -> "_Replies":
        """Frame what arrives on ``conn`` from now on, beginning with what its
        stream reader holds already."""
        transport = conn.writer.transport
        replies = cls(transport, peer, limits)
        replies.conn = conn         # held: a stream writer collected closes its transport
        held = net.held(conn.reader)
        transport.set_protocol(replies)
        # ``_eof``: the end may have come behind part of a frame, which at_eof does not say
        if conn.reader.at_eof() or getattr(conn.reader, "_eof", False) or transport.is_closing():
            replies.closed = True
            transport.close()
            return replies
        transport.resume_reading()      # the stream reader may have paused it
        if held:
            replies.data_received(bytes(held))
            held.clear()
        return replies

    def post(self, msg: dict, on_reply: OnReply) -> None:
        data, raw, bare = _encoded(msg)
        if raw is not None or len(data) - 4 > self.limits.max_frame:
            raise protocol.ProtocolError("frame_too_large", f"refusing to send a {len(data)}-byte "
                                                            f"{msg.get('type')!r} frame on {self.peer}")
        self.waiting.append((msg["type"], on_reply, bare))
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if not self.buffer and len(data) >= 4 and not self.closed:
            # the common arrival, one whole reply alone (a pong): no copy through the buffer
            (length,) = protocol.HEADER.unpack_from(data)
            if len(data) == 4 + length and length <= self.limits.max_frame:
                self._reply(data[4:])
                return
        self.buffer += data
        buffer = self.buffer
        while len(buffer) >= 4 and not self.closed:
            (length,) = protocol.HEADER.unpack_from(buffer)
            if length > self.limits.max_frame:
                self.fail(net.PeerError(f"{self.peer} sent a {length}-byte frame, over the limit of "
                                        f"{self.limits.max_frame}"))
                return
            if len(buffer) < 4 + length:
                return
            body = bytes(buffer[4:4 + length])
            del buffer[:4 + length]
            self._reply(body)

    def _reply(self, body: bytes) -> None:
        if not self.waiting:
            self.fail(net.PeerError(f"{self.peer} sent a frame nobody asked for"))
            return
        kind, on_reply, bare = self.waiting.popleft()
        last = self.last
        if bare and last is not None and last[1] == body and last[0] == kind:
            self._call(on_reply, last[2], None)
            return
        try:
            frame = protocol.validate(protocol.decode(body), protocol.SERVER)
            if protocol.BULK in frame:
                raise protocol.ProtocolError("bad_reply", f"a bulk frame in answer to {kind!r}")
            reply = protocol.check_reply(kind, frame)
        except protocol.ProtocolError as exc:
            self._shut()        # first: a caller trying again at once must find the connection gone
            self._call(on_reply, None, exc)
            self.fail(net.PeerError(f"{self.peer} is out of step: {exc.message}"))
            return
        if bare:
            self.last = (kind, body, reply)
        self._call(on_reply, reply, None)

    def _call(self, on_reply: OnReply, reply: Any, exc: Any) -> None:
        try:
            on_reply(reply, exc)
        except Exception:           # the connection's framing must go on whatever a caller does
            log.exception("handling the reply from %s failed", self.peer)

    def _shut(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def fail(self, exc: Exception) -> None:
        """Close the connection; every request waiting gets ``exc``."""
        self._shut()
        while self.waiting:
            _, on_reply, _ = self.waiting.popleft()
            self._call(on_reply, None, exc)

    def eof_received(self) -> bool:
        self.fail(net.PeerError(f"lost connection to {self.peer}: {self.peer} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = exc or f"{self.peer} closed the connection"
        self.fail(net.PeerError(f"lost connection to {self.peer}: {why}"))
