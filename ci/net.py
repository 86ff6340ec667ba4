"""The transport: framing on asyncio streams, the handshake, the server
every daemon runs and the clients every daemon and tool uses.

What the frames mean (the message table, roles, field kinds, validation)
is in ``protocol``; this module only moves frames and proves who sends them.
On connect the server speaks first::

    server: {"type": "hello", "version": 1, "nonce": N}
    client: {"type": "auth", "role": R, "mac": HMAC-SHA256(secret of R, N + ":" + R)}
    server: {"type": "ok", "role": R}            (or an error, then close)

Each role has its own secret (config ``auth.<role>_secret``, falling back to
``auth.secret``); a wrong role, or a wrong or missing MAC, gets the one answer
``auth_failed`` "authentication failed" and the connection closes. With
``tls`` configured, all of this runs inside TLS (``serve``/``Client`` ``ssl=``).
Before it authenticates a peer may send frames of HANDSHAKE_FRAME bytes at
most and must finish within ``read_timeout``; which connections a server
holds at all (handshakes, authenticated ones, per address) is ``gate``'s rule.

A malformed payload, an unknown type or a bad field is answered with an
``error`` naming it and the connection stays usable; an oversized length
prefix closes the connection, because the stream cannot be trusted after it.

Exactly one reply per request, from the table (``protocol.MESSAGES``): the
server sends what a handler returns only when the table allows it for the
request, and a handler that returns nothing, or something else, is a bug
answered with an ``internal`` error (and logged). Stream handlers send their
frames themselves. The clients check every reply against the same table.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets as _secrets
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from .aio import LazyAsyncio, within
from .gate import Gate
from .limits import Limits      # net.Limits: callers build their bounds from here
from .protocol import (HEADER, PROTOCOL_VERSION, ROLES, SERVER, Answers, FatalProtocolError,
                       ProtocolError, RemoteError, check_reply, decode, encode, error, is_stream, ok,
                       validate)

asyncio: Any = LazyAsyncio(globals())

log = logging.getLogger(__name__)

# The largest frame a server reads before its peer has authenticated: a
# hello's answer is some hundred bytes, and a peer that proved nothing must
# not make a daemon hold a megabyte for it.
HANDSHAKE_FRAME = 4096

# ---------------------------------------------------------------- errors

class PeerError(Exception):
    """A peer could not be reached or stopped answering."""


class PeerRefused(PeerError):
    """Nothing listens at the peer's address (connection refused)."""


class PeerTimeout(PeerError):
    """The peer did not answer in time."""


class PeerAuthFailed(PeerError):
    """The peer refused our credentials in the handshake (wrong secret or role)."""


# ---------------------------------------------------------------- framing

class Connection:
    """One framed, authenticated stream. Not safe for concurrent requests: callers serialise."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits, peer: str):
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.peer = peer
        self.role = ""
        self.sent = 0           # frames sent: tells the server whether a stream handler answered
        self.max_frame = limits.max_frame   # the largest frame read; smaller until a server's peer authenticates

    async def recv_raw(self, idle: float | None = None) -> Any:
        """Read one frame and decode its JSON (unvalidated).

        Raises ConnectionError when the peer is gone, PeerTimeout on silence,
        FatalProtocolError for an oversized length, ProtocolError for bad JSON.
        """
        timeout = self.limits.read_timeout if idle is None else idle
        try:
            header = await within(self.reader.readexactly(4), timeout)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{self.peer} closed the connection") from None
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} sent nothing for {timeout:g}s") from None
        (length,) = HEADER.unpack(header)
        if length > self.max_frame:
            raise FatalProtocolError(
                "frame_too_large", f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        try:
            body = await within(self.reader.readexactly(length), self.limits.read_timeout)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{self.peer} closed the connection mid-frame") from None
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stalled mid-frame") from None
        return decode(body)

    async def recv(self, sender: str = SERVER, idle: float | None = None) -> dict:
        return validate(await self.recv_raw(idle), sender)

    async def send(self, msg: dict) -> None:
        data = encode(msg)
        if len(data) - 4 > self.limits.max_frame:
            raise ProtocolError("frame_too_large", f"refusing to send a {len(data)}-byte {msg.get('type')!r} frame")
        self.writer.write(data)
        self.sent += 1
        try:
            await within(self.writer.drain(), self.limits.read_timeout)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{self.peer} stopped reading") from None

    async def close(self) -> None:
        self.writer.close()
        try:
            await within(self.writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass


def mac(secret: str, nonce: str, role: str) -> str:
    if not secret:
        return ""
    return hmac.new(secret.encode(), f"{nonce}:{role}".encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- server

# A handler gets the connection (for streams) and one validated request, and
# returns the reply the table declares for it. A stream handler sends its
# frames on the connection itself and returns None (or returns an error).
Handler = Callable[[Connection, dict], Awaitable[dict | None]]


async def serve(handler: Handler, host: str, port: int, *, secret: str = "",
                roles: frozenset = frozenset(ROLES), limits: Limits = Limits(),
                name: str = "server", secrets: Mapping[str, str] | None = None,
                ssl: Any = None) -> asyncio.Server:
    """Start a framed server; each connection does the handshake, then request/reply.

    A client claiming a role proves it with that role's entry in ``secrets``
    (``secret`` for roles without one). ``ssl`` is an SSLContext to listen with TLS.
    Connections are admitted by a ``gate.Gate`` (places for handshakes, for
    authenticated connections and per address); until it authenticates, a
    peer's frames are at most HANDSHAKE_FRAME bytes and the whole handshake
    must end within ``read_timeout``.
    """
    admission = Gate(limits, name)
    keys = {role: (secrets or {}).get(role) or secret for role in ROLES}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "peer"
        conn = Connection(reader, writer, limits, peer)
        ticket, why = admission.admit(peername[0] if peername else peer, writer.transport.abort)
        if ticket is None:
            await _refuse(conn, name, why)
            return
        conn.max_frame = min(HANDSHAKE_FRAME, limits.max_frame)
        try:
            if await _bounded_handshake(conn, keys, roles):
                if not admission.authenticated(ticket):
                    await _refuse(conn, name, f"{name} has {limits.max_connections} connections open")
                    return
                conn.max_frame = limits.max_frame
                await _serve_requests(conn, handler, name)
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
            admission.release(ticket)
            if not conn.writer.is_closing():
                await conn.close()

    extra = {"ssl": ssl, "ssl_handshake_timeout": limits.read_timeout} if ssl is not None else {}
    return await asyncio.start_server(on_connect, host, port, reuse_address=True, **extra)


async def _refuse(conn: Connection, name: str, why: str) -> None:
    """Turn a connection away with ``busy`` (one log line) and close it."""
    log.warning("%s: refusing %s: %s", name, conn.peer, why)
    try:
        await conn.send(error("busy", why))
    except (OSError, PeerError, ProtocolError):
        pass
    await conn.close()


async def _bounded_handshake(conn: Connection, keys: Mapping[str, str], roles: frozenset) -> bool:
    """``_handshake`` within ``read_timeout`` as a whole: a peer sending its
    frames a byte at a time holds a handshake place no longer than that."""
    try:
        return await within(_handshake(conn, keys, roles), conn.limits.read_timeout)
    except asyncio.TimeoutError:
        raise PeerTimeout(f"{conn.peer} did not finish the handshake within "
                          f"{conn.limits.read_timeout:g}s") from None


async def _handshake(conn: Connection, keys: Mapping[str, str], roles: frozenset) -> bool:
    nonce = _secrets.token_hex(16)
    await conn.send({"type": "hello", "version": PROTOCOL_VERSION, "nonce": nonce})
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
        validate(raw, role if role in ROLES else ROLES[0])
        # bytes: compare_digest refuses non-ASCII str, and a peer chooses what it sends
        good = role in roles and hmac.compare_digest(raw["mac"].encode(), mac(keys[role], nonce, role).encode())
    except ProtocolError:
        good = False
    if not good:
        # one answer for a wrong role, a wrong, missing or malformed MAC: no hint which it was
        log.warning("authentication failed for %s (claimed role %s)", conn.peer,
                    role if role in ROLES else "unknown")
        await conn.send(error("auth_failed", "authentication failed"))
        return False
    conn.role = role
    await conn.send(ok(role=role))
    return True


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
                 limits: Limits = Limits(), ssl: Any = None):
        self.host, self.port, self.role, self.secret, self.limits = host, port, role, secret, limits
        self.ssl = ssl
        self.addr = f"{host}:{port}"
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> Connection:
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
        conn = Connection(reader, writer, self.limits, self.addr)
        try:
            hello = await conn.recv()
            if hello["type"] != "hello":
                raise ProtocolError("bad_message", f"{self.addr} did not greet with 'hello'")
            await conn.send({"type": "auth", "role": self.role,
                             "mac": mac(self.secret, hello["nonce"], self.role)})
            reply = check_reply("auth", await conn.recv())
            if reply["type"] == "error":
                if reply.get("code") == "auth_failed":
                    raise PeerAuthFailed(f"{self.addr} refused our credentials as {self.role!r}: "
                                         f"authentication failed")
                raise ProtocolError(reply.get("code", "error"), reply.get("message", ""))
        except PeerAuthFailed:
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
        try:
            if self._conn is None:
                self._conn = await self._connect()
            conn = self._conn
            await conn.send(msg)
            return check_reply(msg["type"], await conn.recv(idle=timeout or self.limits.read_timeout))
        except (ConnectionError, OSError) as exc:
            await self._drop()
            raise PeerError(f"lost connection to {self.addr}: {exc}") from None
        except (PeerError, ProtocolError, asyncio.CancelledError):
            # after a timeout or a bad frame the stream is out of step
            await self._drop()
            raise

    async def stream(self, msg: dict, idle: float | None = None) -> AsyncIterator[dict]:
        """Send a request whose answer is a stream; yields its frames, each checked
        against the table, up to and including ``end`` (for a plain request: its
        one reply). An ``error`` frame raises RemoteError, a frame the table does
        not allow there ProtocolError."""
        answers = Answers(msg["type"])
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                await self._conn.send(msg)
                while not answers.done:
                    frame = answers.check(await self._conn.recv(idle=idle))
                    if frame["type"] == "error":
                        raise RemoteError(frame)
                    yield frame
            except (ConnectionError, OSError) as exc:
                await self._drop()
                raise PeerError(f"lost connection to {self.addr}: {exc}") from None
            except BaseException:
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


async def call(addr: str, msg: dict, role: str, secret: str = "", limits: Limits = Limits(),
               timeout: float | None = None, ssl: Any = None) -> dict:
    """One request on a fresh connection (for command-line tools)."""
    host, port = parse_addr(addr)
    client = Client(host, port, role, secret, limits, ssl)
    try:
        return await client.request(msg, timeout)
    finally:
        await client.close()


def request_blocking(addr: str, msg: dict, role: str, secret: str = "", limits: Limits = Limits(),
                     ssl: Any = None) -> dict:
    """One request on a fresh blocking socket, without an event loop: the same
    frames, table and handshake as ``Client``, for `tinyci notify` in git hooks."""
    import socket

    if is_stream(msg["type"]):
        raise ValueError(f"{msg['type']!r} is answered by a stream, which needs a Client")
    host, port = parse_addr(addr)
    try:
        sock = socket.create_connection((host, port), timeout=limits.connect_timeout)
    except ConnectionRefusedError:
        raise PeerRefused(f"nothing listens on {host}:{port} (connection refused)") from None
    except socket.timeout:
        raise PeerTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise PeerError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        if ssl is not None:
            sock = ssl.wrap_socket(sock, server_hostname=host)
        sock.settimeout(limits.read_timeout)

        def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                part = sock.recv(n - len(data))
                if not part:
                    raise ConnectionError(f"{host}:{port} closed the connection")
                data += part
            return data

        def recv() -> dict:
            (length,) = HEADER.unpack(exactly(4))
            if length > limits.max_frame:
                raise FatalProtocolError("frame_too_large", f"{host}:{port} sent a {length}-byte frame")
            return validate(decode(exactly(length)), SERVER)

        hello = recv()
        if hello["type"] != "hello":
            raise ProtocolError("bad_message", f"{host}:{port} did not greet with 'hello'")
        sock.sendall(encode({"type": "auth", "role": role, "mac": mac(secret, hello["nonce"], role)}))
        welcome = check_reply("auth", recv())
        if welcome["type"] == "error":
            if welcome.get("code") == "auth_failed":
                raise PeerAuthFailed(f"{host}:{port} refused our credentials")
            raise PeerError(f"handshake with {host}:{port} failed: {welcome.get('message', '')}")
        sock.sendall(encode(msg))
        reply = check_reply(msg["type"], recv())
    except socket.timeout:
        raise PeerTimeout(f"{host}:{port} did not answer in time") from None
    except ProtocolError as exc:
        raise PeerError(f"{host}:{port}: {exc.message}") from None
    except OSError as exc:      # ConnectionError and TLS errors included
        raise PeerError(f"lost connection to {host}:{port}: {exc}") from None
    finally:
        sock.close()
    if reply["type"] == "error":
        raise RemoteError(reply)
    return reply
