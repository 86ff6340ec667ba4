"""What the runner-side tests share: a bounded wait on a condition, the pid a
step wrote to a file, and a fake
dispatcher (made with net.serve, in the test's own process) that records what
a runner sends and answers like the real one would."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ci import net, protocol

SECRET = "runner-test-secret"


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def read_pid(path: Path) -> int | None:
    """The pid a build step wrote to ``path``; None until it has."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


class FakeDispatcher:
    """Records what a runner sends and answers like the real dispatcher would."""

    def __init__(self, heartbeat: float = 60.0):
        self.heartbeat = heartbeat
        self.registers: list[dict] = []
        self.logs: dict[tuple, bytearray] = {}
        self.results: dict[int, dict] = {}
        self.result_tries: list[dict] = []
        self.artifacts: list[dict] = []
        self.refuse_results = False
        self.refuse_artifacts = ""            # a message to refuse every artifact with
        self.drop_artifact_at: int | None = None    # an artifact chunk's offset at which to drop the connection
        self.stale_at: dict[int, str] = {}    # build -> log text after which its lease is stale
        self.server = None
        self.port = 0
        self.result_peers: list[str] = []     # the address each accepted result came from
        self.conns: set[net.Connection] = set()

    async def start(self, port: int = 0) -> "FakeDispatcher":
        self.server = await net.serve(self.handle, "127.0.0.1", port, secret=SECRET,
                                      roles=frozenset({protocol.RUNNER}), name="fake dispatcher")
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def client(self) -> net.Client:
        """A client as the runner makes them, to this fake."""
        return net.Client("127.0.0.1", self.port, protocol.RUNNER, SECRET, id="r1")

    def log_text(self, build: int, attempt: int = 1) -> str:
        return bytes(self.logs.get((build, attempt), b"")).decode()

    def drop_connections(self) -> None:
        """Close every connection a runner made, as a dispatcher's restart would."""
        for conn in self.conns:
            conn.writer.close()
        self.conns.clear()

    async def handle(self, conn: net.Connection, msg: dict) -> dict:
        kind = msg["type"]
        self.conns.add(conn)
        if kind == "register":
            self.registers.append(msg)
            return protocol.ok(heartbeat_interval=self.heartbeat)
        if kind == "artifact":
            if self.refuse_artifacts:
                return protocol.error("too_big", self.refuse_artifacts)
            self.artifacts.append(msg)
            if self.drop_artifact_at == msg["offset"]:      # once: the connection is lost mid-upload
                self.drop_artifact_at = None
                raise ConnectionError("dropped by the test")
            return protocol.ok(offset=msg["offset"] + len(msg["data"]))     # the size so far, as the dispatcher's
        key = (msg["build"], msg["attempt"])
        have = self.logs.setdefault(key, bytearray())
        if kind == "log":
            data = msg["data"] if isinstance(msg["data"], bytes) else msg["data"].encode()
            if msg["offset"] > len(have):
                return protocol.error("offset", "gap in the log", expected=len(have))
            overlap = len(have) - msg["offset"]
            have.extend(data[overlap:])
            marker = self.stale_at.get(msg["build"])
            if marker and marker.encode() in have:
                return protocol.error("stale", "given to another runner")
            return protocol.ok(offset=len(have))
        if kind == "result":
            self.result_tries.append(msg)
            if self.refuse_results:
                return protocol.error("internal", "the test refuses results for now")
            if msg.get("log_size", 0) > len(have):
                return protocol.error("offset", "log incomplete", expected=len(have))
            self.results[msg["build"]] = msg
            self.result_peers.append(conn.peer)
            return protocol.ok()
        return protocol.error("unsupported", kind)

    async def result(self, build: int, timeout: float = 15.0) -> dict:
        await wait_until(lambda: build in self.results, f"the result of build {build}", timeout)
        return self.results[build]
