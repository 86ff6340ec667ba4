"""The runner's durable outbox, and the delivery of one attempt's log and
result to the dispatcher.

On disk, under the runner's workdir (names built only from integers)::

    logs/<build>-<attempt>.log      the attempt's log as it was written (UTF-8)
    outbox/<build>-<attempt>.json   its final result, written atomically before it is sent

An outbox entry and its log are deleted only once the dispatcher has accepted
the result or refused it as stale; until then a restarted runner finds them
and delivers them again.

A ``Delivery`` sends, to the dispatcher:
    log {build, attempt, offset, data (bytes: a bulk frame)}
                                         -> ok {offset} | error offset {expected} | error stale
                                            | error disk_full
    result {build, attempt, status, exit_code, steps, duration, log_size}
                                         -> ok | error offset {expected} | error stale

A ``log`` refused with ``disk_full`` (the dispatcher's disk is down to its
reserve) ends the sending of that log: the rest stays in the local file, and
the result goes as soon as the build ends; the dispatcher records it with a
note where the log stops, and the slot the build held there is free. Should
the dispatcher ask for the rest after all (``offset`` in reply to the result:
it restarted and has room), the log is sent again from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

from . import aio, files, net, protocol
from .text import utf8_boundary

log = logging.getLogger(__name__)

# While a build runs, a log frame smaller than a whole chunk waits until this
# long after the last one (a step writing a line at a time costs a frame a
# tenth of a second, not one a line); a whole chunk goes at once, so a step
# writing fast is never held back.
PACE = 0.1
# A log frame's bytes at most (and net.max_bulk): one frame a round trip, so
# big frames keep up with a step writing fast on a loaded machine.
MAX_CHUNK = 4 << 20
SPARE_FOR = 30.0        # seconds a finished delivery's connection is kept for the next one
_ENTRY = re.compile(r"(\d{1,19})-(\d{1,6})\.json\Z")
RESULT_FIELDS = ("build", "attempt", "status", "exit_code", "steps", "duration", "log_size")
ACCEPTED, STALE = "accepted", "stale"


class Outbox:
    """Results waiting for the dispatcher's acceptance, and the logs that go with them."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "outbox"
        self.logs = workdir / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def log_path(self, build: int, attempt: int) -> Path:
        return self.logs / f"{int(build)}-{int(attempt)}.log"

    def _path(self, build: int, attempt: int) -> Path:
        return self.dir / f"{int(build)}-{int(attempt)}.json"

    def save(self, result: dict) -> None:
        """Write one result so that a crash leaves either the whole file or none."""
        files.atomic_write(self._path(result["build"], result["attempt"]),
                           json.dumps(result).encode("utf-8"))

    def load(self) -> list[dict]:
        """Pending results, oldest build first; half-written or unreadable files are set aside."""
        results = []
        for path in sorted(self.dir.iterdir()):
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)        # a crash before the rename: never promised
                continue
            match = _ENTRY.match(path.name)
            if not match:
                continue
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(result, dict) or any(k not in result for k in RESULT_FIELDS):
                    raise ValueError("missing fields")
                if (result["build"], result["attempt"]) != (int(match[1]), int(match[2])):
                    raise ValueError("build and attempt do not match the file name")
                protocol.validate({"type": "result", **result}, protocol.RUNNER)
            except (OSError, ValueError, protocol.ProtocolError) as exc:
                bad = path.with_suffix(".bad")
                log.error("outbox entry %s is unreadable (%s); moved it to %s", path, exc, bad.name)
                os.replace(path, bad)
                continue
            size = self._log_size(result["build"], result["attempt"])
            if size < result["log_size"]:
                # the log was lost with the disk's cache; promise only what is still there
                log.warning("log of build %d attempt %d has %d of %d bytes; sending what is left",
                            result["build"], result["attempt"], size, result["log_size"])
                result["log_size"] = size
            results.append(result)
        results.sort(key=lambda r: (r["build"], r["attempt"]))
        return results

    def _log_size(self, build: int, attempt: int) -> int:
        try:
            return self.log_path(build, attempt).stat().st_size
        except OSError:
            return 0

    def discard(self, build: int, attempt: int) -> None:
        self._path(build, attempt).unlink(missing_ok=True)
        self.log_path(build, attempt).unlink(missing_ok=True)

    def sweep_logs(self, keep: set) -> None:
        """Delete logs of attempts a previous run left without a result (the dispatcher requeued them)."""
        for path in self.logs.glob("*.log"):
            parts = path.stem.split("-")
            if len(parts) == 2 and all(p.isdigit() for p in parts) and \
                    (int(parts[0]), int(parts[1])) not in keep:
                path.unlink(missing_ok=True)


class Spares:
    """Connections to the dispatcher that deliveries are done with, kept for the
    next ones: a connection per build (connect, then the handshake in both
    processes) cost a trivial build a tenth of the runner's loop. Kept for
    ``SPARE_FOR`` seconds (the dispatcher drops a client silent for
    ``net.idle_timeout``), at most ``keep`` of them."""

    def __init__(self, make: Callable[[], net.Client], keep: int):
        self.make, self.keep = make, keep
        self.kept: list[tuple[net.Client, float]] = []
        self.closed = False         # the runner is stopping: nothing more is kept

    def take(self) -> tuple[net.Client, bool]:
        """A connection for a delivery, and whether it was kept from an earlier one."""
        now = time.monotonic()
        while self.kept:
            client, since = self.kept.pop()
            if now - since < SPARE_FOR and client.connected:
                return client, True
            self.kept.append((client, since))       # closed by the next give or close
            break
        return self.make(), False

    async def give(self, client: net.Client) -> None:
        """A delivery is done with ``client``: kept if still connected and there is room."""
        now = time.monotonic()
        stale = [c for c, since in self.kept if now - since >= SPARE_FOR or not c.connected]
        self.kept = [(c, since) for c, since in self.kept if c not in stale]
        if client.connected and len(self.kept) < self.keep and not self.closed:
            self.kept.append((client, now))
        else:
            stale.append(client)
        for old in stale:
            await old.close()

    async def close(self) -> None:
        self.closed = True
        kept, self.kept = self.kept, []
        for client, _ in kept:
            await client.close()


class Delivery:
    """Streams one attempt's log while it grows, then sends its result, until the
    dispatcher accepts it or calls it stale. Never gives up on an absent dispatcher."""

    def __init__(self, client: net.Client, build: int, attempt: int, log_path: Path,
                 max_bulk: int = 4 << 20, start: int = 0, result: dict | None = None, reused: bool = False):
        """``reused``: ``client`` is a connection an earlier delivery kept (``Spares``):
        should it turn out dead (the dispatcher restarted), the first request is
        made again at once on a new one, unlogged."""
        self.client = client
        self.reused = reused
        self.build, self.attempt = build, attempt
        self.log_path = log_path
        self.chunk = max(1024, min(MAX_CHUNK, max_bulk))      # the log's bytes go raw, in bulk frames
        self.pos = start            # bytes of the log the dispatcher is known (or assumed) to have
        self.result = result
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()   # no more pacing: the build has ended
        self._failing = False
        self.cut = False                # the dispatcher's disk is full: the rest of the log is not sent
        if result is not None:
            self._ended.set()

    def __repr__(self) -> str:
        return f"build {self.build} attempt {self.attempt}"

    def wake(self) -> None:
        """The log grew."""
        self._wake.set()

    def ended(self) -> None:
        """The build ended, its result is on its way: send the rest of the log now, unpaced."""
        self._ended.set()
        self._wake.set()

    def finish(self, result: dict) -> None:
        """The build ended: deliver the rest of the log, then this result."""
        self.result = result
        self.ended()

    async def run(self) -> str:
        """Returns ACCEPTED or STALE."""
        backoff = aio.Backoff()
        last_sent = 0.0
        while True:
            self._wake.clear()
            size = self._size()
            if self.pos < size and not self.cut:
                pause = last_sent + PACE - time.monotonic()
                if pause > 0 and not self._ended.is_set() and size - self.pos < self.chunk:
                    # the end of the build cuts the pause short: its last lines go at once
                    try:
                        await aio.within(self._ended.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
                    size = self._size()
                frame = self._frame(size)
                if frame is None:       # only half a character so far
                    await self._wake.wait()
                    continue
                last_sent = time.monotonic()
                reply = await self._send(frame, backoff)
                if reply == STALE:
                    return STALE
                if reply is not None:
                    got = reply["offset"]           # the table checks it is a count
                    if got <= self.pos:
                        # the dispatcher did not take the chunk: do not spin on it
                        await asyncio.sleep(backoff.next())
                    self.pos = min(got, size)
                continue
            if self.result is not None:
                reply = await self._send({"type": "result", **self.result}, backoff)
                if reply == STALE:
                    return STALE
                if reply is not None:
                    return ACCEPTED
                continue
            await self._wake.wait()

    async def _send(self, msg: dict, backoff: aio.Backoff) -> dict | str | None:
        """One request; returns the ok reply, STALE, or None after moving ``pos`` or backing off."""
        try:
            reply = await self.client.request(msg)
        except protocol.RemoteError as exc:
            if exc.code == "stale":
                return STALE
            if exc.code == "disk_full" and msg["type"] == "log":
                if not self.cut:
                    log.warning("%r: the dispatcher's disk is full; the rest of its log stays in %s and its "
                                "result goes when it ends (%s)", self, self.log_path, exc.message)
                self.cut = True
                return None
            # `expected` (a count, checked by the table) comes with a log's offset error, not an artifact's
            expected = exc.reply.get("expected")
            if exc.code == "offset" and expected is not None:
                log.debug("%r: dispatcher has %d bytes of the log; resending from there", self, expected)
                self.cut = False        # it wants the rest after all
                self.pos = min(expected, self._size())
                if msg["type"] == "result" and expected > self.pos:
                    # it has more than we ever wrote: nothing left to send, avoid a tight loop
                    await asyncio.sleep(backoff.next())
                return None
            self._trouble(msg, f"the dispatcher refused it: {exc}")
        except (net.PeerError, protocol.ProtocolError) as exc:
            if self.reused and isinstance(exc, net.PeerError):
                self.reused = False         # a kept connection found dead: the client makes a new one
                return None
            self._trouble(msg, str(exc))
        else:
            self.reused = False
            if self._failing:
                log.info("%r: delivering to the dispatcher %s again", self, self.client.addr)
            self._failing = False
            backoff.reset()
            return reply
        await asyncio.sleep(backoff.next())
        return None

    def _trouble(self, msg: dict, why: str) -> None:
        if not self._failing:
            log.warning("%r: cannot deliver its %s to the dispatcher %s (%s); keeping it and retrying",
                        self, msg["type"], self.client.addr, why)
        self._failing = True

    def _size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _frame(self, size: int) -> dict | None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.pos)
                data = f.read(min(self.chunk, size - self.pos))
        except OSError:
            return None
        cut = utf8_boundary(data)
        if cut == 0 and self.result is None:
            return None
        data = data[:cut] if cut else data
        return {"type": "log", "build": self.build, "attempt": self.attempt, "offset": self.pos, "data": data}
