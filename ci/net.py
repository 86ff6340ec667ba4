"""The transport: framing on asyncio streams, the handshake, the server
every daemon runs and the client every daemon uses (a tool's blocking one,
on the same frames and handshake, is ``blocking``).

What the frames mean (the message table, roles, field kinds, validation)
is in ``protocol``; this module only moves frames and proves who sends them.
On connect the server speaks first (protocol v3)::

    server: hello {version, nonce: Ns, name: S}           S: the server's identity
    client: auth  {role: R, id: I, nonce: Nc, to: T, mac: client_mac(K, Ns, Nc, R, I, T)}
    server: ok    {role: R, mac: server_mac(K, Ns, Nc, R, I, T)}   (or auth_failed, then close)

Each MAC is HMAC-SHA256 keyed with K, the key for (R, I), over both nonces,
the role, the client's id and T, the identity the client meant to reach (its
own expectation, never copied from the hello). So a MAC is good on one
connection only: a relay that hands one peer's nonce to another gets a MAC
for the wrong nonce pair, or for the wrong target, which the server refuses
(``to`` must be its own identity). The client checks the server's MAC in
turn: a server that does not hold K cannot answer, so a client never takes a
stranger for the daemon it meant to reach (PeerNotProven).

Keys: the server asks ``keys(role, id)`` (None: refuse); the daemons pass
``Settings.key``. With no secret anywhere the keys are "" and the MACs
empty: the loopback-only default. A wrong role, id, target, or a wrong or
missing MAC gets the one answer ``auth_failed`` "authentication failed" and
the connection closes. With ``tls`` configured, all of this runs inside TLS
(``serve``/``Client`` ``ssl=``); after the handshake, plain TCP frames are
neither secret nor protected from someone on the path.
Before it authenticates a peer may send frames of HANDSHAKE_FRAME bytes at
most and must finish within ``read_timeout``; which connections a server
holds at all (handshakes, authenticated ones, per address) is ``gate``'s rule.

A malformed payload, an unknown type or a bad field is answered with an
``error`` naming it and the connection stays usable; an oversized length
prefix closes the connection, because the stream cannot be trusted after it.
So does a bulk frame (``protocol.encode_parts``: raw bytes after the JSON)
whose count is malformed or over ``max_bulk``; before the handshake is done
no bulk frame is taken at all. The raw bytes are read like the frame, within
``read_timeout``, and written without a copy.

Exactly one reply per request, from the table (``protocol.MESSAGES``): the
server sends what a handler returns only when the table allows it for the
request, and a handler that returns nothing, or something else, is a bug
answered with an ``internal`` error (and logged). Stream handlers send their
frames themselves. The clients check every reply against the same table.
"""

from __future__ import annotations

import contextlib
import os
import sys

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from .aio import Lazy, in_thread, within
from .limits import Limits      # net.Limits: callers build their bounds from here
from .protocol import (DISPATCHER_ID, HEADER, LENT, PROTOCOL_VERSION, ROLES, RUNNER, RUNNER_PREFIX, SERVER, Answers,
                       FatalProtocolError, ProtocolError, RemoteError, attach, bulk_header, bulk_size, check_reply,
                       decode, encode_parts, error, is_stream, ok, validate)

asyncio: Any = Lazy(globals(), "asyncio")
# A tool imports this module for one request: what only a server (the gate) or a
# secret (hmac) needs is imported where it is used, not here.
if TYPE_CHECKING:
    from .gate import Gate
# only a server logs: a tool that makes one request need not import logging at each start
log: Any = Lazy(globals(), "logging", "log", make=lambda logging: logging.getLogger(__name__))

# The largest frame a server reads before its peer has authenticated: a
# hello's answer is some hundred bytes, and a peer that proved nothing must
# not make a daemon hold a megabyte for it.
HANDSHAKE_FRAME = 4096
BULK_PIECE = 1 << 20        # the most of a bulk frame's bytes taken from the stream at a time
SPARES = 2                  # lent buffers a connection keeps: one being written while the next arrives
LEND_MIN = 1 << 20          # smaller lent frames are copied like any other: a small buffer is cheap to make

# ---------------------------------------------------------------- errors

class PeerError(Exception):
    """A peer could not be reached or stopped answering."""


class PeerRefused(PeerError):
    """Nothing listens at the peer's address (connection refused)."""


class PeerTimeout(PeerError):
    """The peer did not answer in time."""


class PeerAuthFailed(PeerError):
    """The handshake failed on credentials: the peer refused ours (wrong secret,
    role or target), or it could not prove it holds the key (not the daemon we
    meant to reach)."""


class PeerNotProven(PeerAuthFailed):
    """The peer could not prove it holds the key, or said it is another daemon:
    not the one we meant to reach."""


# ---------------------------------------------------------------- framing

def held(reader: asyncio.StreamReader) -> bytes | bytearray:
    """What ``reader`` holds already, read by nobody yet (none known: nothing).
    The one place that reads asyncio.StreamReader's private ``_buffer``: a
    protocol that takes a transport over (``_Sink``, ``keptlink``) starts from it."""
    return getattr(reader, "_buffer", b"")


class Connection:
    """One framed, authenticated stream. Not safe for concurrent requests: callers serialise."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits, peer: str):
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.peer = peer
        self.role = ""
        self.id = ""            # the authenticated client's id: a runner's name for role runner
        self.sent = 0           # frames sent: tells the server whether a stream handler answered
        self.max_frame = limits.max_frame   # the largest frame read; smaller until a server's peer authenticates
        self.max_bulk = limits.max_bulk     # raw bytes a bulk frame may carry; none until a server's peer authenticates
        self.spares: list[bytearray] = []   # buffers handlers gave back, smallest first, for the next lent frames

    async def recv_raw(self, idle: float | None = None) -> Any:
        """Read one frame and decode its JSON (unvalidated).

        Raises ConnectionError when the peer is gone, PeerTimeout on silence,
        FatalProtocolError for an oversized length, ProtocolError for bad JSON.
        """
        timeout = self.limits.read_timeout if idle is None else idle
        stage = "header"
        reader = self.reader
        try:
            if sys.version_info < (3, 11):      # no asyncio.timeout: a timer per read
                return await self._with_bulk(decode(await self._read_310(timeout)))
            buffered = held(reader)
            if len(buffered) >= 4 and len(buffered) >= 4 + HEADER.unpack_from(buffered)[0]:
                # a whole frame is in already (requests sent ahead of their replies): no wait, no timer
                body = await reader.readexactly(self._length(await reader.readexactly(4)))
                return await self._with_bulk(decode(body))
            # one timer for the frame, moved when its header is in unless its body is in too: a
            # timer made and cancelled per read was a third of what an idle ping cost
            async with asyncio.timeout(timeout) as deadline:
                length = self._length(await reader.readexactly(4))
                stage = "body"
                if len(held(reader)) < length:
                    deadline.reschedule(asyncio.get_running_loop().time() + self.limits.read_timeout)
                body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{self.peer} closed the connection" +
                                  (" mid-frame" if stage == "body" else "")) from None
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stalled mid-frame" if stage == "body" else
                              f"{self.peer} sent nothing for {timeout:g}s") from None
        return await self._with_bulk(decode(body))

    def _length(self, header: bytes) -> int:
        (length,) = HEADER.unpack(header)
        if length > self.max_frame:
            raise FatalProtocolError(
                "frame_too_large", f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        return length

    async def _read_310(self, timeout: float) -> bytes:
        try:
            header = await within(self.reader.readexactly(4), timeout)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{self.peer} closed the connection") from None
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} sent nothing for {timeout:g}s") from None
        try:
            return await within(self.reader.readexactly(self._length(header)), self.limits.read_timeout)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{self.peer} closed the connection mid-frame") from None
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stalled mid-frame") from None

    async def _with_bulk(self, frame: Any) -> Any:
        """A bulk frame's header with its raw bytes attached; any other frame as it is."""
        size = bulk_size(frame, self.max_bulk)
        if size is None:
            return frame
        return attach(frame, await self._bulk(size, frame.get("type") in LENT))

    async def _bulk(self, size: int, lent: bool = False) -> bytes | memoryview:
        """A bulk frame's ``size`` raw bytes, all within ``read_timeout``; ``lent``:
        as a view of a buffer given back for reuse (``give_back``) when it can be."""
        deadline = asyncio.get_running_loop().time() + self.limits.read_timeout
        if _Sink.usable(self.reader, self.writer):
            return await self._bulk_direct(size, deadline, lent)
        return await self._bulk_pieces(size, deadline)

    async def _bulk_direct(self, size: int, deadline: float, lent: bool) -> bytes | memoryview:
        """The bytes the stream's reader holds already, then the rest received by
        the socket straight into one buffer (the transport's protocol swapped for
        a ``_Sink`` meanwhile): two copies of each byte, where the stream's
        reader makes four (its recv, its buffer, its read, the join). ``lent``
        (and LEND_MIN bytes or more): one copy, into the smallest spare buffer
        big enough when there is one. A buffer made afresh for every 4 MiB
        chunk, and the copy made of it, took the receive of 100 MiB from 0.11
        to 0.19 s here (8 MiB of fresh memory a chunk, faulted in and zeroed)."""
        lent = lent and size >= LEND_MIN
        # the spares are kept smallest first (give_back): the first that fits is the smallest
        spare = next((i for i, b in enumerate(self.spares) if len(b) >= size), None) if lent else None
        buffer = self.spares.pop(spare) if spare is not None else bytearray(size)
        view = memoryview(buffer)[:size]
        sink = _Sink.make(self.reader, self.writer.transport, view)
        try:
            if not sink.filled():
                await within(sink.done, max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stalled mid-frame") from None
        finally:
            sink.restore()
        if sink.lost:
            raise ConnectionError(f"{self.peer} closed the connection mid-frame")
        return view if lent else bytes(buffer)

    def give_back(self, data: bytes | memoryview, last: bool = False) -> None:
        """A handler is done with a lent frame's ``data``: nothing reads it, nor
        any view made of it (that is the caller's to know: views of a view do
        not count as its exports). Its buffer serves the next lent frame, up to
        SPARES kept, the biggest; ``last`` (an upload's last chunk) keeps none,
        so an idle connection holds no spare. ``data`` itself is released: a
        use of it after this raises. A handler that never gives it back only
        costs a new buffer."""
        if not isinstance(data, memoryview):
            return
        buffer = data.obj
        try:
            data.release()
        except BufferError:
            return          # C code holds this very view still: not reused
        if last:
            self.spares.clear()
        elif isinstance(buffer, bytearray):
            self.spares = sorted([*self.spares, buffer], key=len)[-SPARES:]

    async def _bulk_pieces(self, size: int, deadline: float) -> bytes:
        """In the pieces the stream holds, joined once (under TLS): ``readexactly``
        would grow one buffer to the whole size and copy it twice more."""
        parts, left = [], size
        while left:
            try:
                part = await within(self.reader.read(min(left, BULK_PIECE)),
                                    max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise PeerTimeout(f"{self.peer} stalled mid-frame") from None
            if not part:
                raise ConnectionError(f"{self.peer} closed the connection mid-frame")
            parts.append(part)
            left -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def recv(self, sender: str = SERVER, idle: float | None = None) -> dict:
        return validate(await self.recv_raw(idle), sender)

    async def send(self, msg: dict) -> None:
        data, raw = encode_parts(msg)
        if len(data) - 4 > self.limits.max_frame:
            raise ProtocolError("frame_too_large", f"refusing to send a {len(data)}-byte {msg.get('type')!r} frame")
        if raw is not None and len(raw) > self.limits.max_bulk:
            raise ProtocolError("frame_too_large", f"refusing to send {len(raw)} bytes in a {msg.get('type')!r} "
                                                   f"frame (net.max_bulk is {self.limits.max_bulk})")
        self.writer.write(data)
        if raw:
            self.writer.write(raw)
        self.sent += 1
        if not self.writer.transport.get_write_buffer_size():
            await self.writer.drain()       # all of it went out: returns at once, no timer needed
            return
        try:
            await within(self.writer.drain(), self.limits.read_timeout)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stopped reading") from None

    async def send_file(self, msg: dict, file: Any, offset: int, count: int, timeout: float | None = None) -> None:
        """``msg`` as a bulk frame whose ``count`` raw bytes are ``file``'s from
        ``offset``: sent by the kernel (sendfile) without passing through this
        process; under TLS read in one piece in a thread and written. Within
        ``timeout`` (``read_timeout``); a file shorter than that closes the
        connection (the frame said more)."""
        timeout = self.limits.read_timeout if timeout is None else timeout
        if count > self.limits.max_bulk:
            raise ProtocolError("frame_too_large", f"refusing to send {count} bytes in a {msg.get('type')!r} "
                                                   f"frame (net.max_bulk is {self.limits.max_bulk})")
        self.writer.write(bulk_header(msg, count))
        self.sent += 1
        try:
            if not count:       # sendfile's count 0 would mean the whole file
                sent = 0
            elif self.writer.get_extra_info("sslcontext") is None:
                file.seek(offset)       # asyncio's own fallback reads from where the file is when offset is 0
                sent = await within(asyncio.get_running_loop().sendfile(self.writer.transport, file, offset, count),
                                    timeout)
            else:
                data = await in_thread(os.pread, file.fileno(), count, offset)
                sent = len(data)
                self.writer.write(data)
                await within(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stopped reading") from None
        if sent != count:
            raise ConnectionError(f"the file sent to {self.peer} ended {count - sent} bytes early")

    async def close(self) -> None:
        self.writer.close()
        try:
            await within(self.writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass


class _Sink:
    """Receives a bulk frame's bytes straight into ``view`` (``recv_into``) for a
    plain TCP stream: what the stream's reader buffered already is taken
    first, then the transport's protocol is this one until ``view`` is full
    (it asks for no more than that, so nothing past the frame is read) and
    the reader's again after. Everything but the bytes (flow control, the
    peer's end) goes on to the reader's protocol as well, so its writer and
    reader see them. Relies on asyncio.StreamReader's ``_buffer`` and
    ``_paused``, checked by ``usable``. ``make`` gives one: the transport
    takes it for a buffered protocol only as an asyncio.BufferedProtocol,
    and asyncio is not imported before it is used."""

    kind: Any = None

    @classmethod
    def make(cls, reader: asyncio.StreamReader, transport: Any, view: memoryview) -> "_Sink":
        if cls.kind is None:
            cls.kind = type("BufferedSink", (cls, asyncio.BufferedProtocol), {})
        return cls.kind(reader, transport, view)

    def __init__(self, reader: asyncio.StreamReader, transport: Any, view: memoryview):
        self.reader, self.transport, self.view = reader, transport, view
        self.got, self.lost = 0, False
        buffered = held(reader)
        self.got = min(len(buffered), len(view))
        view[:self.got] = buffered[:self.got]
        del buffered[:self.got]
        self.done = asyncio.get_running_loop().create_future()
        self.previous = None
        if not self.filled() and (reader.at_eof() or reader.exception() is not None):
            self._end()         # the peer's end came with what was buffered: nothing more will
        elif not self.filled():
            self.previous = transport.get_protocol()
            transport.set_protocol(self)
            transport.resume_reading()

    @staticmethod
    def usable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return (writer.get_extra_info("sslcontext") is None and isinstance(getattr(reader, "_buffer", None),
                                                                           bytearray)
                and hasattr(reader, "_paused") and hasattr(writer.transport, "set_protocol"))

    def filled(self) -> bool:
        return self.got == len(self.view)

    def restore(self) -> None:
        if self.previous is not None:
            self.transport.set_protocol(self.previous)
            self.previous = None
            if not self.lost:
                self.reader._paused = False     # reading is on: the reader pauses it again when it holds too much
                self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.got:]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.filled() and not self.done.done():
            self.transport.pause_reading()      # until the reader's protocol is back
            self.done.set_result(None)

    def _end(self) -> None:
        self.lost = True
        if not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool | None:
        self._end()
        return self.previous.eof_received() if self.previous is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        if self.previous is not None:
            self.previous.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.previous is not None:
            self.previous.pause_writing()

    def resume_writing(self) -> None:
        if self.previous is not None:
            self.previous.resume_writing()


# ---------------------------------------------------------------- the handshake's proofs

def _mac(side: str, key: str, ns: str, nc: str, role: str, id: str, to: str) -> str:
    if not key:
        return ""
    # NUL between the parts: the protocol's kinds keep every part free of it, so no two
    # different handshakes give the same text
    text = "\0".join((f"tinyci/{PROTOCOL_VERSION} {side}", ns, nc, role, id, to))
    import hashlib
    import hmac
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


def client_mac(key: str, ns: str, nc: str, role: str, id: str, to: str) -> str:
    """What a client proves itself with: bound to both nonces, its role and id, and its target."""
    return _mac("client", key, ns, nc, role, id, to)


def server_mac(key: str, ns: str, nc: str, role: str, id: str, to: str) -> str:
    """What a server proves itself with, in its ``ok``: the same parts, another label."""
    return _mac("server", key, ns, nc, role, id, to)


def _same(a: str, b: str) -> bool:
    if not b:       # no key, so no MAC expected: nothing secret to time
        return not a
    # bytes: compare_digest refuses non-ASCII str, and a peer chooses what it sends
    import hmac
    return hmac.compare_digest(a.encode(), b.encode())


def nonce() -> str:
    return os.urandom(16).hex()         # secrets.token_hex(16), without importing secrets


class Greeting:
    """The client's side of one handshake: ``auth`` answers the server's
    hello, ``check`` the server's reply to it. Pure: the async Client and
    the blocking link share it, and the tests drive it without sockets."""

    def __init__(self, addr: str, role: str, key: str, id: str = "", to: str = DISPATCHER_ID):
        self.addr, self.role, self.key, self.id, self.to = addr, role, key, id, to
        self.ns = self.nc = ""

    def auth(self, hello: Any) -> dict:
        """The ``auth`` frame for the server's ``hello`` (raw, as decoded).
        Raises PeerError for a hello of another protocol version or one that is
        not a hello, PeerNotProven when the server says it is someone else."""
        if isinstance(hello, dict) and hello.get("type") == "hello" and hello.get("version") != PROTOCOL_VERSION:
            raise PeerError(f"{self.addr} speaks tinyci protocol version {_version(hello)}, this is version "
                            f"{PROTOCOL_VERSION}: run the same tinyci version everywhere")
        try:
            hello = validate(hello, SERVER)
        except ProtocolError as exc:
            raise PeerError(f"handshake with {self.addr} failed: {exc.message}") from None
        if hello["type"] == "error":        # e.g. busy: it has too many connections
            raise PeerError(f"{self.addr} refused the connection: {hello['code']}: {hello['message']}")
        if hello["type"] != "hello":
            raise PeerError(f"handshake with {self.addr} failed: it did not greet with 'hello'")
        if hello["name"] != self.to:
            # its word only (a hello proves nothing), but enough not to send it a proof at all
            raise PeerNotProven(f"{self.addr} is {hello['name']}, not {self.to} "
                                 f"(not the daemon you meant to reach?)")
        self.ns, self.nc = hello["nonce"], nonce()
        return {"type": "auth", "role": self.role, "id": self.id, "nonce": self.nc, "to": self.to,
                "mac": client_mac(self.key, self.ns, self.nc, self.role, self.id, self.to)}

    def check(self, reply: Any) -> None:
        """Accept the server's answer to our ``auth``, or raise: PeerAuthFailed
        when it refused us, PeerNotProven when it could not prove it holds the
        key, PeerError else."""
        try:
            reply = check_reply("auth", reply)
        except ProtocolError as exc:
            raise PeerError(f"handshake with {self.addr} failed: {exc.message}") from None
        if reply["type"] == "error":
            if reply["code"] == "auth_failed":
                raise PeerAuthFailed(f"{self.addr} refused our credentials as {self.role!r}: authentication failed")
            raise PeerError(f"handshake with {self.addr} failed: {reply['code']}: {reply['message']}")
        expected = server_mac(self.key, self.ns, self.nc, self.role, self.id, self.to)
        if reply["role"] != self.role or not _same(reply["mac"], expected):
            raise PeerNotProven(f"{self.addr} could not prove it holds the {self._key_name()} "
                                 f"(not the daemon you meant to reach?)")

    def _key_name(self) -> str:
        if self.to.startswith(RUNNER_PREFIX):
            return f"secret of runner {self.to[len(RUNNER_PREFIX):]}"
        if self.role == RUNNER:
            return f"secret of runner {self.id}"
        return f"{self.role} secret"


def _version(hello: dict) -> str:
    version = hello.get("version")
    return str(version) if isinstance(version, int) and not isinstance(version, bool) else "unknown"


# ---------------------------------------------------------------- server

if TYPE_CHECKING:
    # A handler gets the connection (for streams) and one validated request, and
    # returns the reply the table declares for it. A stream handler sends its
    # frames on the connection itself and returns None (or returns an error).
    Handler = Callable[[Connection, dict], Awaitable[dict | None]]
    Keys = Callable[[str, str], "str | None"]


async def serve(handler: Handler, host: str, port: int, *, secret: str = "",
                roles: frozenset = frozenset(ROLES), limits: Limits = Limits(),
                name: str = "server", secrets: Mapping[str, str] | None = None,
                ssl: Any = None, identity: str | Callable[[], str] = DISPATCHER_ID,
                keys: Keys | None = None) -> asyncio.Server:
    """Start a framed server; each connection does the handshake, then request/reply.

    ``identity`` is who this server is (``dispatcher``, ``observer``,
    ``runner:<name>``; a callable when known only once listening): a client
    must have meant to reach it. A client claiming one of ``roles`` proves
    it with ``keys(role, id)`` (None: refused); without ``keys``, with that
    role's entry in ``secrets``, else ``secret``. ``ssl`` is an SSLContext
    to listen with TLS. Connections are admitted by a ``gate.Gate`` (places
    for handshakes, for authenticated connections and per address); until it
    authenticates, a peer's frames are at most HANDSHAKE_FRAME bytes and the
    whole handshake must end within ``read_timeout``.
    """
    if keys is None:
        keys = _role_keys({role: (secrets or {}).get(role) or secret for role in ROLES})
    from .gate import Gate
    listener = _Listener(handler, Gate(limits, name), keys, roles, limits, name,
                         identity if callable(identity) else (lambda: identity))
    extra = {"ssl": ssl, "ssl_handshake_timeout": limits.read_timeout} if ssl is not None else {}
    return await asyncio.start_server(listener.on_connect, host, port, reuse_address=True, **extra)


class _Listener:
    """What ``serve`` does with each connection: admit, handshake, serve requests, close."""

    def __init__(self, handler: Handler, admission: Gate, keys: Keys, roles: frozenset, limits: Limits,
                 name: str, who: Callable[[], str]):
        self.handler, self.admission, self.keys, self.roles = handler, admission, keys, roles
        self.limits, self.name, self.who = limits, name, who

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name, limits = self.name, self.limits
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "peer"
        conn = Connection(reader, writer, limits, peer)
        ticket, why = self.admission.admit(peername[0] if peername else peer, writer.transport.abort)
        if ticket is None:
            await _refuse(conn, name, why)
            return
        conn.max_frame, conn.max_bulk = min(HANDSHAKE_FRAME, limits.max_frame), 0
        try:
            if await _bounded_handshake(conn, self.keys, self.roles, self.who()):
                if not self.admission.authenticated(ticket):
                    await _refuse(conn, name, f"{name} has {limits.max_connections} connections open")
                    return
                conn.max_frame, conn.max_bulk = limits.max_frame, limits.max_bulk
                await _serve_requests(conn, self.handler, name)
        except (ConnectionError, PeerError) as exc:
            log.debug("%s: %s: %s", name, peer, exc)
        except FatalProtocolError as exc:
            log.warning("%s: dropping %s: %s", name, peer, exc.message)
            try:
                await conn.send(error(exc.code, exc.message))
            except (OSError, PeerError, ProtocolError):
                pass
        except asyncio.CancelledError:
            # the daemon is stopping. This task is the outermost one for the
            # connection: ending it normally rather than "cancelled" keeps
            # asyncio's stream callback (3.11) from logging a traceback for it
            conn.writer.close()
            return
        except Exception:  # a bug in one handler must not take the daemon down
            log.exception("%s: connection from %s failed", name, peer)
        finally:
            self.admission.release(ticket)
            if not conn.writer.is_closing():
                try:
                    await conn.close()
                except asyncio.CancelledError:
                    pass        # the daemon stopped while this closed: end normally, as above


def _role_keys(by_role: Mapping[str, str]) -> Keys:
    return lambda role, id: by_role.get(role)


async def _refuse(conn: Connection, name: str, why: str) -> None:
    """Turn a connection away with ``busy`` (one log line) and close it."""
    log.warning("%s: refusing %s: %s", name, conn.peer, why)
    try:
        await conn.send(error("busy", why))
    except (OSError, PeerError, ProtocolError):
        pass
    await conn.close()


async def _bounded_handshake(conn: Connection, keys: Keys, roles: frozenset, identity: str) -> bool:
    """``_handshake`` within ``read_timeout`` as a whole: a peer sending its
    frames a byte at a time holds a handshake place no longer than that."""
    try:
        return await within(_handshake(conn, keys, roles, identity), conn.limits.read_timeout)
    except asyncio.TimeoutError:
        raise PeerTimeout(f"{conn.peer} did not finish the handshake within "
                          f"{conn.limits.read_timeout:g}s") from None


async def _handshake(conn: Connection, keys: Keys, roles: frozenset, identity: str) -> bool:
    ns = nonce()
    await conn.send({"type": "hello", "version": PROTOCOL_VERSION, "nonce": ns, "name": identity})
    try:
        raw = await conn.recv_raw(idle=conn.limits.read_timeout)
        if not isinstance(raw, dict) or raw.get("type") != "auth":
            raise ProtocolError("auth_required", "the first message must be 'auth'")
    except FatalProtocolError:
        raise
    except ProtocolError as exc:
        await conn.send(error(exc.code, exc.message))
        return False
    role = raw.get("role")
    try:
        auth: dict | None = validate(raw, role if role in ROLES else ROLES[0])
    except ProtocolError:
        auth = None
    key = _proven_key(auth, keys, roles, identity, ns)
    if auth is None or key is None:
        # one answer for a wrong role, id, target or MAC, or a malformed auth: no hint which it was.
        # The log names the claim, once the table has checked its parts are plain names
        claim = "" if auth is None else (f" as runner {auth['id']}" if auth["id"] else "") + (
            f", meant for {auth['to']}" if auth["to"] != identity else "")
        log.warning("authentication failed for %s (claimed role %s%s)", conn.peer,
                    role if role in ROLES else "unknown", claim)
        await conn.send(error("auth_failed", "authentication failed"))
        return False
    conn.role, conn.id = role, auth["id"]
    await conn.send(ok(role=role, mac=server_mac(key, ns, auth["nonce"], role, auth["id"], auth["to"])))
    return True


def _proven_key(auth: dict | None, keys: Keys, roles: frozenset, identity: str, ns: str) -> str | None:
    """The key a validated ``auth`` proves it holds, or None: a role this server
    does not accept, an id where none belongs (only a runner names itself), a
    target other than this server, or a MAC that is not the one for this
    connection's nonces."""
    if auth is None:
        return None
    role, id, nc, to = auth["role"], auth["id"], auth["nonce"], auth["to"]
    if role not in roles or (role == RUNNER) != bool(id) or to != identity:
        return None
    key = keys(role, id)
    if key is None or not _same(auth["mac"], client_mac(key, ns, nc, role, id, to)):
        return None
    return key


async def _serve_requests(conn: Connection, handler: Handler, name: str) -> None:
    while True:
        try:
            raw = await conn.recv_raw(idle=conn.limits.idle_timeout)
            msg = validate(raw, conn.role)
        except PeerTimeout:
            log.debug("%s: %s idle, closing", name, conn.peer)
            return
        except FatalProtocolError:
            raise
        except ProtocolError as exc:
            await conn.send(error(exc.code, exc.message))
            continue
        if msg["type"] in ("hello", "auth"):
            await conn.send(error("bad_message", f"{msg['type']!r} is only for the handshake"))
            continue
        sent = conn.sent
        try:
            reply = _allowed(await handler(conn, msg), msg, conn, sent, name)
        except ProtocolError as exc:
            reply = error(exc.code, exc.message)
        except (ConnectionError, PeerError):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: handling %r from %s failed", name, msg["type"], conn.peer)
            reply = error("internal", f"{name} failed to handle {msg['type']!r}: {type(exc).__name__}")
        if reply is not None:
            try:
                await conn.send(reply)
            except FatalProtocolError:
                raise
            except ProtocolError:       # nothing was written: the request still gets its one reply
                await conn.send(error("too_large", f"the reply to {msg['type']!r} would exceed the "
                                                   f"{conn.limits.max_frame}-byte frame limit; ask for less"))


def _allowed(reply: Any, msg: dict, conn: Connection, sent: int, name: str) -> dict | None:
    """What goes back for ``msg``: the handler's ``reply`` when the table allows
    it, None when a stream handler has answered on the connection, and
    otherwise an ``internal`` error naming the bug (which is logged)."""
    kind = msg["type"]
    if reply is None:
        if is_stream(kind) and conn.sent > sent:
            return None
        problem = "its handler returned no reply"
    elif is_stream(kind) and not (isinstance(reply, dict) and reply.get("type") == "error"):
        problem = "its handler returned a reply; a stream's handler sends its frames itself"
    else:
        try:
            return check_reply(kind, reply)
        except ProtocolError as exc:
            problem = f"its handler's reply is not one the table allows: {exc.message}"
    log.error("%s: bug: %r from %s: %s", name, kind, conn.peer, problem)
    return error("internal", f"{name} failed to answer {kind!r}: {problem}")


# ---------------------------------------------------------------- client

def parse_addr(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or ':port', or 'host' with a default port) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    host = host.strip("[]") or "127.0.0.1"
    if not port:
        if default_port is None:
            raise ValueError(f"address {text!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {text!r} has a bad port (expected HOST:PORT)")
    return host, int(port)


class Client:
    """A persistent, authenticated connection to one peer, opened on demand.

    Requests are serialised; after any transport failure the connection is
    dropped and the next request reconnects. The caller chooses the retries.
    """

    def __init__(self, host: str, port: int, role: str, secret: str = "",
                 limits: Limits = Limits(), ssl: Any = None, *, id: str = "", to: str = DISPATCHER_ID):
        """``id``: this client's name (a runner's, for role runner); ``to``: the
        identity it means to reach, which must prove it holds ``secret`` too."""
        self.host, self.port, self.role, self.secret, self.limits = host, port, role, secret, limits
        self.ssl, self.id, self.to = ssl, id, to
        self.addr = f"{host}:{port}"
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """A connection is open and the peer has not closed its end (as far as is known without asking)."""
        conn = self._conn
        return conn is not None and not conn.writer.is_closing() and not conn.reader.at_eof()

    async def open(self) -> Connection:
        """A new connection to the peer, after the handshake: the caller's to keep and close."""
        try:
            tls = {} if self.ssl is None else {
                "ssl": self.ssl, "server_hostname": self.host,
                "ssl_handshake_timeout": self.limits.connect_timeout}
            reader, writer = await within(
                asyncio.open_connection(self.host, self.port, limit=2 ** 16, **tls), self.limits.connect_timeout)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"connecting to {self.addr} timed out") from None
        except ConnectionRefusedError:
            raise PeerRefused(f"nothing listens on {self.addr} (connection refused)") from None
        except OSError as exc:
            raise PeerError(f"cannot connect to {self.addr}: {exc.strerror or exc}") from None
        except UnicodeError:            # the resolver refuses a host name (a runner may register any text)
            raise PeerError(f"cannot connect to {self.addr}: not a valid host name") from None
        conn = Connection(reader, writer, self.limits, self.addr)
        greeting = Greeting(self.addr, self.role, self.secret, self.id, self.to)
        try:
            await conn.send(greeting.auth(await conn.recv_raw()))
            greeting.check(await conn.recv_raw())
        except PeerError:
            await conn.close()
            raise
        except (ConnectionError, ProtocolError) as exc:
            await conn.close()
            raise PeerError(f"handshake with {self.addr} failed: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def request(self, msg: dict, timeout: float | None = None) -> dict:
        """Send one request and return its reply, which has the fields the table
        declares for it. An ``error`` reply raises RemoteError; a reply the table
        does not allow raises ProtocolError (and drops the connection: it may be
        out of step). Streams go through ``stream``."""
        if is_stream(msg["type"]):
            raise ValueError(f"{msg['type']!r} is answered by a stream: use Client.stream")
        async with self._lock:
            reply = await self._exchange(msg, timeout)
        if reply["type"] == "error":
            raise RemoteError(reply)
        return reply

    async def _exchange(self, msg: dict, timeout: float | None) -> dict:
        async with self._connection() as conn:
            await conn.send(msg)
            return check_reply(msg["type"], await conn.recv(idle=timeout or self.limits.read_timeout))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """The connection, made if there is none, for a caller holding the lock. Any
        failure while it is used drops it (after a timeout, a bad frame or a cancel
        the stream is out of step); a transport's failure becomes a PeerError."""
        try:
            if self._conn is None:
                self._conn = await self.open()
            yield self._conn
        except (ConnectionError, OSError) as exc:
            await self._drop()
            raise PeerError(f"lost connection to {self.addr}: {exc}") from None
        except BaseException:
            await self._drop()
            raise

    async def send_file(self, requests: list[tuple[dict, int, int]], file: Any, window: int,
                        last_idle: float = 0.0) -> list[dict]:
        """Send ``requests``, each (msg, offset, count): a bulk frame whose bytes
        are ``file``'s from ``offset`` (``Connection.send_file``), up to
        ``window`` of them ahead of their replies, so neither side waits for the
        other between two; returns the replies in order. Each reply within
        ``read_timeout``, the last within ``last_idle`` more. The first
        ``error`` raises RemoteError and drops the connection (the replies
        still on their way would be out of step)."""
        replies: list[dict] = []
        async with self._lock, self._connection() as conn:
            sent = 0
            while len(replies) < len(requests):
                while sent < len(requests) and sent - len(replies) < max(1, window):
                    msg, offset, count = requests[sent]
                    await conn.send_file(msg, file, offset, count)
                    sent += 1
                last = len(replies) == len(requests) - 1
                reply = check_reply(requests[len(replies)][0]["type"],
                                    await conn.recv(idle=self.limits.read_timeout + (last_idle if last else 0)))
                if reply["type"] == "error":
                    raise RemoteError(reply)
                replies.append(reply)
        return replies

    async def stream(self, msg: dict, idle: float | None = None) -> AsyncIterator[dict]:
        """Send a request whose answer is a stream; yields its frames, each checked
        against the table, up to and including ``end`` (for a plain request: its
        one reply). An ``error`` frame raises RemoteError, a frame the table does
        not allow there ProtocolError."""
        answers = Answers(msg["type"])
        async with self._lock, self._connection() as conn:
            await conn.send(msg)
            while not answers.done:
                frame = answers.check(await conn.recv(idle=idle))
                if frame["type"] == "error":
                    raise RemoteError(frame)
                yield frame

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


async def call(addr: str, msg: dict, role: str, secret: str = "", limits: Limits = Limits(),
               timeout: float | None = None, ssl: Any = None, *, id: str = "", to: str = DISPATCHER_ID) -> dict:
    """One request on a fresh connection (for command-line tools)."""
    host, port = parse_addr(addr)
    client = Client(host, port, role, secret, limits, ssl, id=id, to=to)
    try:
        return await client.request(msg, timeout)
    finally:
        await client.close()
