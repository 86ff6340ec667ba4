"""Sends one build artifact from the runner to the dispatcher, in chunks
(``artifact_find.py`` chooses the files; the dispatcher's half, which checks
and stores them, is ``artifacts.py``).

Sends, to the dispatcher:
    artifact {build, attempt, path, offset, data (bytes: a bulk frame), eof}  -> ok {offset} | error

Each chunk is at most ``net.max_bulk`` bytes, sent from the file by the
kernel (``net.Client.send_file``: sendfile), WINDOW of them ahead of their
acknowledgements: the runner holds none of the artifact in memory, the
dispatcher one chunk (and one being written). Each chunk is written at
its offset and its ``ok`` says how much of the file is written; the last
one's comes once the whole file is on the dispatcher's disk (fsync), so its
wait grows with the size.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from . import net, protocol

TRIES = 3                   # sends of the artifact before the dispatcher counts as unreachable
WINDOW = 2                  # chunks on their way at once: one arriving while the dispatcher writes another
SYNC_RATE = 16 << 20        # bytes a second the slowest disk is expected to sync: the last ack's extra wait


async def upload(client: net.Client, max_bulk: int, build: int, attempt: int, rel: str,
                 file: Path) -> None:
    """Send one artifact in chunks of at most ``max_bulk`` bytes; raises
    ValueError saying why it did not arrive. When the connection fails the
    artifact is sent again from its start (the first chunk starts the file
    afresh), up to TRIES times in all."""
    chunk = max(1024, max_bulk)
    try:
        with open(file, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            base = {"type": "artifact", "build": build, "attempt": attempt, "path": rel}
            requests = [({**base, "offset": offset, "eof": offset + chunk >= size}, offset, min(chunk, size - offset))
                        for offset in range(0, max(size, 1), chunk)]
            for attempt_no in range(TRIES):
                try:
                    replies = await client.send_file(requests, f, WINDOW, last_idle=size / SYNC_RATE)
                    break
                except (net.PeerError, protocol.ProtocolError) as exc:
                    if attempt_no == TRIES - 1:
                        raise ValueError(f"the dispatcher is unreachable: {exc}") from None
                    await asyncio.sleep(0.5 * (attempt_no + 1))
    except protocol.RemoteError as exc:
        raise ValueError(f"the dispatcher refused it: {exc.message or exc.code}") from None
    if replies[-1]["offset"] != size:
        raise ValueError(f"the dispatcher has {replies[-1]['offset']} bytes of it, not {size}")
