"""Fetches one artifact of a build from the dispatcher into a file
(``read_artifact``, one stream): the runner's half of ``needs``, which puts
the artifacts of the builds a build needs into its checkout. The one place
that knows how an artifact comes down: ``stream_to`` on the runner's event
loop, ``copy_to`` on a blocking link for the CLI's ``artifacts --get`` (no
event loop to start; to a file or pipe each chunk's bytes spliced from the
socket by the kernel, else received into the link's kept buffer and written
from there, no copy in between); both follow the chunks with
``Offsets``. The web page has a loop over ``fetch_artifact`` (a request a
chunk: a browser may take its time with each).

Sends, to the dispatcher:
    read_artifact {build, path}  -> ok {size}, chunk {offset, data (bytes, a bulk frame)}..., end {offset}
                                    | error
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any

from . import aio, blocking, net, protocol

asyncio: Any = aio.Lazy(globals(), "asyncio")


def request(build: int, path: str) -> dict:
    return {"type": "read_artifact", "build": build, "path": path}


class Offsets:
    """Where the chunks of one artifact have got to: each must begin where the one before ended."""

    def __init__(self):
        self.offset = 0

    def take(self, frame: dict) -> Any:
        """The bytes of ``frame`` when it is a chunk that follows on (None for the
        other frames); ProtocolError when it leaves a gap or goes back."""
        if frame["type"] != "chunk":
            return None
        if frame["offset"] != self.offset:
            raise protocol.ProtocolError("bad_reply", f"a chunk at offset {frame['offset']}, "
                                                      f"expected {self.offset}")
        self.offset += len(frame["data"])
        return frame["data"]


def copy_to(link: blocking.BlockingLink, build: int, path: str, out: Any) -> int:
    """Write artifact ``path`` of ``build`` to ``out`` on a blocking link;
    returns its size. ``out``: a file descriptor, each chunk's bytes written to
    it as they arrive (``BlockingLink.stream(into=)``: spliced from the socket
    where Linux can), or anything with ``write``, each chunk written from the
    link's kept buffer before the next is received: one chunk in memory either
    way. A chunk out of place raises before any of its bytes is written (a
    pipe cannot take them back). Raises the link's errors (RemoteError,
    PeerError, ProtocolError), and an OSError of the file descriptor's."""
    offsets = Offsets()
    if isinstance(out, int):
        for _ in link.stream(request(build, path), into=out, accept=offsets.take):
            pass
        return offsets.offset
    for frame in link.stream(request(build, path), kept=1):
        data = offsets.take(frame)
        if data is not None:
            out.write(data)
    return offsets.offset


async def stream_to(client: net.Client, build: int, path: str, out: Any) -> int:
    """Write artifact ``path`` of ``build`` to ``out`` (anything with ``write``)
    as it comes down; returns its size. Each chunk is written in a thread
    while the next one arrives: at most two in memory. Raises the client's
    errors (RemoteError, PeerError, ProtocolError)."""
    writing = None
    offsets = Offsets()
    try:
        # closed however the loop ends: the stream holds the client until then
        async with contextlib.aclosing(client.stream(request(build, path))) as frames:
            async for frame in frames:
                data = offsets.take(frame)
                if data is None:
                    continue
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(aio.in_thread(out.write, data))
        if writing is not None:
            await writing
    finally:
        if writing is not None and not writing.done():
            await asyncio.gather(writing, return_exceptions=True)     # before ``out`` is closed
    return offsets.offset


async def download(client: net.Client, build: int, path: str, dest: Path) -> int:
    """Write artifact ``path`` of ``build`` to ``dest`` (aside, then renamed into
    place); returns its size. Raises ValueError saying why it did not arrive."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        # O_NOFOLLOW: a symlink the commit put at the aside name is not written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as out:
            size = await stream_to(client, build, path, out)
        os.replace(tmp, dest)
        return size
    except protocol.RemoteError as exc:
        raise ValueError(f"the dispatcher refused it: {exc.message or exc.code}") from None
    except (net.PeerError, protocol.ProtocolError) as exc:
        raise ValueError(f"the dispatcher is unreachable: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
