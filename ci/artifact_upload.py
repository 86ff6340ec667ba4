"""Sends one build artifact from the runner to the dispatcher, in chunks
(``artifact_find.py`` chooses the files; the dispatcher's half, which checks
and stores them, is ``artifacts.py``).

Sends, to the dispatcher:
    artifact {build, attempt, path, offset, data (bytes: a bulk frame), eof}  -> ok {offset} | error

Each chunk is at most ``net.max_bulk`` bytes, read from the file (in a
thread, the next one while the current one is on its way): the runner holds
at most two chunks of an artifact in memory, the dispatcher one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from . import aio, net, protocol

TRIES = 3                   # sends of one chunk before the dispatcher counts as unreachable


async def upload(client: net.Client, max_bulk: int, build: int, attempt: int, rel: str,
                 file: Path) -> None:
    """Send one artifact in chunks of at most ``max_bulk`` bytes; raises
    ValueError saying why it did not arrive. A chunk whose send fails is sent
    again (the dispatcher takes it by offset)."""
    chunk = max(1024, max_bulk)
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            data = await aio.in_thread(f.read, chunk)
            while True:
                eof = offset + len(data) >= size or not data
                ahead = None if eof else asyncio.ensure_future(aio.in_thread(f.read, chunk))
                try:
                    await _send(client, {"type": "artifact", "build": build, "attempt": attempt, "path": rel,
                                         "offset": offset, "data": data, "eof": eof})
                finally:
                    if ahead is not None and not ahead.done():
                        await asyncio.wait({ahead})     # never close the file under a read
                offset += len(data)
                if ahead is None:
                    return
                data = ahead.result()
    except protocol.RemoteError as exc:
        raise ValueError(f"the dispatcher refused it: {exc.message or exc.code}") from None


async def _send(client: net.Client, msg: dict) -> None:
    """One chunk, sent again (up to TRIES in all) while the dispatcher cannot be reached."""
    for attempt_no in range(TRIES):
        try:
            await client.request(msg)
            return
        except (net.PeerError, protocol.ProtocolError) as exc:
            if attempt_no == TRIES - 1:
                raise ValueError(f"the dispatcher is unreachable: {exc}") from None
            await asyncio.sleep(0.5 * (attempt_no + 1))
