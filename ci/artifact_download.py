"""Fetches one artifact of a build from the dispatcher into a file
(``fetch_artifact``, in chunks): the runner's half of ``needs``, which puts
the artifacts of the builds a build needs into its checkout. The one place
that knows how an artifact comes down; the CLI and the web page have their own
loops over the same request.

Sends, to the dispatcher:
    fetch_artifact {build, path, offset}  -> ok {data (bytes, a bulk frame), offset, size, eof} | error
"""

from __future__ import annotations

import os
from pathlib import Path

from . import net, protocol


async def download(client: net.Client, build: int, path: str, dest: Path) -> int:
    """Write artifact ``path`` of ``build`` to ``dest`` (aside, then renamed into
    place); returns its size. Raises ValueError saying why it did not arrive."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        # O_NOFOLLOW: a symlink the commit put at the aside name is not written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as out:
            offset = 0
            while True:
                reply = await client.request({"type": "fetch_artifact", "build": build, "path": path,
                                              "offset": offset})
                data = reply["data"]
                out.write(data)
                offset += len(data)
                if reply["eof"] or not data:
                    break
        os.replace(tmp, dest)
        return offset
    except protocol.RemoteError as exc:
        raise ValueError(f"the dispatcher refused it: {exc.message or exc.code}") from None
    except (net.PeerError, protocol.ProtocolError) as exc:
        raise ValueError(f"the dispatcher is unreachable: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
