"""The blocking link: one authenticated connection without an event loop,
with the same frames, table and handshake (``net.Greeting``) as
``net.Client``. For `tinyci notify` in git hooks (no asyncio at all), a
tool's one request (``request_blocking``), and `tinyci log` and `artifacts
--get`, whose bulk frames are received into buffers the link keeps, or
written to a file as they arrive: spliced socket -> pipe -> file by the
kernel on Linux over plain TCP. Errors are ``net``'s: PeerRefused,
PeerTimeout, PeerError, and ProtocolError for a frame the table does not
allow.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

from . import files
from .limits import Limits
from .net import Greeting, PeerError, PeerRefused, PeerTimeout, parse_addr
from .protocol import (DISPATCHER_ID, HEADER, SERVER, Answers, FatalProtocolError, ProtocolError, RemoteError,
                       attach, bulk_size, check_reply, decode, encode_parts, is_stream, validate)


def _dialable(host: str) -> str | bytes:
    """``host`` as getaddrinfo takes it fastest: given text, it loads the IDNA
    codec first, some 8 ms of every tool's start, to turn a plain ASCII name or
    address into the same bytes. A host the codec would refuse (an empty or
    over-long label) or need (non-ASCII) stays text, for its error or encoding."""
    if host.isascii() and all(0 < len(label) < 64 for label in host.removesuffix(".").split(".")):
        return host.encode()
    return host


class BlockingLink:
    """A fresh blocking socket to one peer, after the handshake. Bulk frames
    are received (``recv_into``) into buffers it keeps and handed on without a
    copy, where asyncio's stream reader copied each byte three times, or
    written to a file as they arrive (``stream(into=)``: spliced, on Linux)."""

    def __init__(self, addr: str, role: str, secret: str = "", limits: Limits = Limits(),
                 ssl: Any = None, *, to: str = DISPATCHER_ID):
        import socket

        self.limits = limits
        self._buf = bytearray()
        self._ring: list[bytearray] = []        # ``stream(kept=...)``'s buffers, and which is next
        self._turn = 0
        self._pipe: tuple[int, int, int] | None = None     # ``stream(into=...)``'s (read end, write end, size)
        self._no_splice = False         # this kernel or file system refused a splice: never again on this link
        host, port = parse_addr(addr)
        self.addr = f"{host}:{port}"
        try:
            sock = socket.create_connection((_dialable(host), port), timeout=limits.connect_timeout)
        except ConnectionRefusedError:
            raise PeerRefused(f"nothing listens on {self.addr} (connection refused)") from None
        except socket.timeout:
            raise PeerTimeout(f"connecting to {self.addr} timed out") from None
        except OSError as exc:
            raise PeerError(f"cannot connect to {self.addr}: {exc.strerror or exc}") from None
        except UnicodeError:
            raise PeerError(f"cannot connect to {self.addr}: not a valid host name") from None
        self.sock = sock
        try:
            if ssl is not None:
                try:
                    self.sock = ssl.wrap_socket(sock, server_hostname=host)
                except socket.timeout:
                    raise PeerTimeout(f"connecting to {self.addr} timed out (TLS)") from None
                except OSError as exc:      # a certificate refused, or no TLS at the other end
                    raise PeerError(f"cannot connect to {self.addr}: {exc.strerror or exc}") from None
            with self._failures(handshake=True):     # the same words as Client's
                greeting = Greeting(self.addr, role, secret, to=to)
                self.send(greeting.auth(self._recv(limits.read_timeout)))
                greeting.check(self._recv(limits.read_timeout))
        except BaseException:
            self.close()
            raise

    def send(self, msg: dict) -> None:
        head, raw = encode_parts(msg)
        self.sock.settimeout(self.limits.read_timeout)
        with self._failures():
            self.sock.sendall(head)
            if raw:
                self.sock.sendall(raw)

    def request(self, msg: dict, timeout: float | None = None) -> dict:
        """Send one request; its one reply (an ``error`` raises RemoteError), which
        must begin within ``timeout`` (``read_timeout`` when None)."""
        if is_stream(msg["type"]):
            raise ValueError(f"{msg['type']!r} is answered by a stream: use BlockingLink.stream")
        self.send(msg)
        with self._failures():
            reply = check_reply(msg["type"], validate(self._recv(timeout or self.limits.read_timeout), SERVER))
        if reply["type"] == "error":
            raise RemoteError(reply)
        return reply

    def stream(self, msg: dict, idle: float | None = None, *, kept: int = 0,
               into: int | None = None, accept: Callable[[dict], Any] | None = None) -> Iterator[dict]:
        """Send a request answered by a stream; yields its frames, each checked
        against the table, up to and including ``end``. ``idle``: how long to
        wait for a frame to begin (``read_timeout`` when None). ``kept``: a bulk
        frame's ``data`` is not a copy but one of ``kept`` buffers this link
        keeps for them in turn (a bytearray), good until ``kept`` more bulk
        frames have come: a caller holds fewer than that at once. ``into``: a
        file descriptor each bulk frame's bytes are written to, at its position,
        once its header is checked and before the frame is yielded with ``data``
        a ``Written`` (their count): see ``_write``. ``accept``: called with each
        such frame (its ``data`` a ``Written`` already) before a byte of it is
        written; it raises to refuse the frame, whose bytes then never reach the file."""
        answers = Answers(msg["type"])
        self._ring, self._turn = [], 0      # this stream's own: a buffer of an earlier one may still be held
        spliced = into is not None and _spliceable(self.sock, into)
        self.send(msg)
        while not answers.done:
            size = None
            with self._failures():
                if into is None:
                    frame = self._recv(idle or self.limits.read_timeout, kept)
                    raw = frame.get("data") if kept and isinstance(frame, dict) else None
                else:
                    frame, size, deadline = self._head(idle or self.limits.read_timeout)
                    raw = attach(frame, bytearray())["data"] if size is not None else None
                if isinstance(raw, bytearray):
                    # the table's kind for raw data is bytes, whatever their count: it checks an
                    # empty stand-in, and the frame then carries the kept buffer (or where its bytes went)
                    frame["data"] = b""
                    frame = answers.check(validate(frame, SERVER))
                    frame["data"] = raw
                else:
                    frame = answers.check(validate(frame, SERVER))
            if size is not None:
                frame["data"] = Written(size)
                if accept is not None:
                    accept(frame)
                self._write(into, size, deadline, spliced)
            if frame["type"] == "error":
                raise RemoteError(frame)
            yield frame

    def close(self) -> None:
        self.sock.close()
        self._drop_pipe()

    def _recv(self, idle: float, kept: int = 0) -> Any:
        """One frame: it must begin within ``idle`` and, once begun, be whole within
        ``read_timeout``. ``kept``: a bulk frame's bytes go to the next kept buffer."""
        frame, size, deadline = self._head(idle)
        if size is None:
            return frame
        # as bytes, the table's kind (the one copy out of the kept buffer), unless kept
        return attach(frame, self._kept(size, deadline, kept) if kept else self._exactly(size, deadline))

    def _head(self, idle: float) -> tuple[Any, int | None, float]:
        """A frame's JSON (begun within ``idle``), the count of raw bytes after it
        (None: not a bulk frame), and when all of it must be in."""
        (length,) = HEADER.unpack(self._exactly(4, time.monotonic() + idle))
        if length > self.limits.max_frame:
            raise FatalProtocolError("frame_too_large", f"{self.addr} sent a {length}-byte frame")
        deadline = time.monotonic() + self.limits.read_timeout
        frame = decode(self._exactly(length, deadline))
        return frame, bulk_size(frame, self.limits.max_bulk), deadline

    def _exactly(self, n: int, deadline: float) -> bytes:
        """``n`` bytes, received into one kept buffer (a new one per frame cost as
        much as the copy out of it: zeroed, and its pages faulted in each time)."""
        if len(self._buf) < n:
            self._buf = bytearray(n)
        with memoryview(self._buf)[:n] as view:
            self._fill(view, deadline)
            return view.tobytes()

    def _kept(self, n: int, deadline: float, kept: int) -> bytearray:
        """``n`` bytes received into the next of ``kept`` buffers, used in turn and
        never given back (new pages cost as much as the copy they spare)."""
        if len(self._ring) < kept:
            self._ring.append(bytearray(n))
        buf = self._ring[self._turn % len(self._ring)]
        self._turn += 1
        if len(buf) > n:
            del buf[n:]
        elif len(buf) < n:
            buf.extend(bytes(n - len(buf)))
        with memoryview(buf) as view:       # released: the buffer may be resized next time
            self._fill(view, deadline)
        return buf

    def _write(self, fd: int, n: int, deadline: float, spliced: bool) -> "Written":
        """A bulk frame's ``n`` bytes written to ``fd`` as they arrive, waiting for
        the peer no longer than ``deadline`` (the time ``fd`` takes them is not the
        peer's). ``spliced`` (Linux, a plain socket, a file or pipe splice can
        write: ``_spliceable``): they go socket -> pipe -> ``fd`` in the kernel, no
        byte through this process, which halves the copies of a download; else,
        and from the first refusal of a kernel or file system that does not
        splice, they are received into a kept buffer and written from it. The
        socket's failures are the link's errors; the file's are its OSError."""
        left = n
        if spliced and not self._no_splice:
            try:
                left, deadline = self._splice(fd, n, deadline)
            except BaseException:
                self._drop_pipe()       # what it may hold is out of step with any later stream
                raise
        if left:
            with self._failures():
                data = self._kept(left, deadline, 1)
            files.write_all(fd, data)
        return Written(n)

    def _splice(self, fd: int, n: int, deadline: float) -> tuple[int, float]:
        """``_write``'s spliced path; returns how many of the ``n`` bytes are left
        for the plain one (0, unless splice was refused: then never again on this
        link), and the deadline moved by the time the output took."""
        if self._pipe is None:
            self._pipe = _pipe()
        read_end, write_end, size = self._pipe
        left = n
        while left:
            with self._failures():
                moved = self._splice_in(write_end, min(left, size), deadline)
            if moved is None:
                self._no_splice = True
                self._drop_pipe()           # empty: nothing was taken from the socket
                return left, deadline
            left -= moved
            began = time.monotonic()
            while moved:        # what the pipe holds, to the file (which may take it in parts)
                try:
                    out = os.splice(read_end, fd, moved)
                except OSError as exc:
                    if exc.errno not in _SPLICE_REFUSED:
                        raise
                    self._no_splice = True
                    files.write_all(fd, _read_all(read_end, moved))
                    self._drop_pipe()       # emptied just now
                    return left, deadline
                if not out:     # never for a file or a pipe that takes bytes: no endless loop should one not
                    raise OSError(errno.EIO, f"splice wrote nothing of {moved} bytes")
                moved -= out
            deadline += time.monotonic() - began
        return 0, deadline

    def _splice_in(self, pipe: int, count: int, deadline: float) -> int | None:
        """Up to ``count`` bytes from the socket into the (empty) pipe, waiting
        for them until ``deadline``; at least one. None: this kernel refuses to
        splice from the socket (nothing was taken from it)."""
        import select
        import socket

        readable = None
        while True:
            try:
                moved = os.splice(self.sock.fileno(), pipe, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout() from None
                if readable is None:
                    readable = select.poll()
                    readable.register(self.sock.fileno(), select.POLLIN)
                readable.poll(left * 1000)
                continue
            except OSError as exc:
                if exc.errno in _SPLICE_REFUSED:
                    return None
                raise
            if not moved:
                raise ConnectionError(f"{self.addr} closed the connection")
            return moved

    def _drop_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    def _fill(self, view: memoryview, deadline: float) -> None:
        import socket

        got, n = 0, len(view)
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            part = self.sock.recv_into(view[got:])
            if not part:
                raise ConnectionError(f"{self.addr} closed the connection")
            got += part

    @contextlib.contextmanager
    def _failures(self, handshake: bool = False) -> Iterator[None]:
        """The socket's and the frames' failures as Client's errors."""
        import socket

        try:
            yield
        except socket.timeout:
            raise PeerTimeout(f"{self.addr} did not answer in time") from None
        except ProtocolError as exc:
            if handshake:       # a hello or an answer to auth that is not one: as Client says it
                raise PeerError(f"handshake with {self.addr} failed: {exc}") from None
            raise
        except OSError as exc:      # ConnectionError and TLS errors included
            if handshake:
                raise PeerError(f"handshake with {self.addr} failed: {exc}") from None
            raise PeerError(f"lost connection to {self.addr}: {exc}") from None


class Written:
    """In a frame of ``BlockingLink.stream(into=...)``, its ``data``: the bytes
    went to the file; ``len`` is their count."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Written({self.count})"


# a kernel or file system that does not splice (no splice_write, a seccomp filter): write instead
_SPLICE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})


def _read_all(fd: int, n: int) -> bytes:
    """``n`` bytes a pipe holds."""
    parts = []
    while n:
        part = os.read(fd, n)
        if not part:
            raise OSError(errno.EIO, f"a pipe held {n} bytes fewer than were put in it")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


PIPE_SIZE = 1 << 20     # a splice's pipe: 64 KiB by default, a syscall pair per 64 KiB; 1 MiB, unprivileged Linux's most


def _spliceable(sock: Any, fd: int) -> bool:
    """Whether bytes can go from ``sock`` to ``fd`` by ``os.splice``: Linux, a
    plain socket (under TLS the bytes on it are not the data), and a file or
    pipe that is neither appended to (splice refuses it) nor non-blocking."""
    import fcntl
    import stat

    if not hasattr(os, "splice") or hasattr(sock, "cipher"):
        return False
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return False
    return (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)) and not flags & (os.O_APPEND | os.O_NONBLOCK)


def _pipe() -> tuple[int, int, int]:
    """A pipe for ``splice``: (read end, write end, its size), as large as Linux lets it be."""
    import fcntl

    read_end, write_end = os.pipe()
    try:
        try:
            size = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:         # over the user's pipe quota: the default size
            size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    return read_end, write_end, size


def request_blocking(addr: str, msg: dict, role: str, secret: str = "", limits: Limits = Limits(),
                     ssl: Any = None, *, to: str = DISPATCHER_ID) -> dict:
    """One request on a fresh blocking socket, without an event loop (``BlockingLink``)."""
    if is_stream(msg["type"]):
        raise ValueError(f"{msg['type']!r} is answered by a stream, which needs a Client")
    link = BlockingLink(addr, role, secret, limits, ssl, to=to)
    try:
        return link.request(msg)
    except ProtocolError as exc:
        raise PeerError(f"{link.addr}: {exc.message}") from None
    finally:
        link.close()
