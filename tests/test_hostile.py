"""Hostile input: a property-based fuzz of random and mutated frames, first at
an in-process server answering from the table (fast), then, more than 10,000
of them, at a live dispatcher, runner and observer; and a slow-loris crowd
that must not stop a commit from being built.

Every well-framed request frame, however broken its content, gets exactly
the answer the table gives it (one reply, or a stream to its end; an error
for anything invalid), in order, and the connection stays usable after."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from ci import net, protocol

from conftest import finished
from test_protocol import ANSWERS


ROLES = ("dispatcher", "runner", "observer", "operator", "reader")
KEYS = {role: f"fuzz-{role}-secret" for role in ROLES if role != "dispatcher"}
KEYS["dispatcher"] = KEYS["runner"]     # the dispatcher proves itself to a runner with the runner's key
MAX_FRAME = 65536
SHA = "0123456789abcdef0123456789abcdef01234567"
FRAMES_WANTED = 10_000
ONLY_AN_ERROR = ""          # Answers for what is not a valid request: an error and nothing else

# One valid example of every message type.
TEMPLATES = {
    "hello": {"version": 3, "nonce": "ab" * 16, "name": "dispatcher"},
    "auth": {"role": "reader", "id": "", "nonce": "cd" * 16, "to": "dispatcher", "mac": ""},
    "commit": {"repo": "/tmp/repo", "branch": "main", "sha": SHA, "author": "A", "subject": "s", "time": 1.0},
    "register": {"name": "fuzz", "host": "127.0.0.1", "port": 1, "labels": ["x"], "slots": 1, "running": []},
    "log": {"build": 1, "attempt": 1, "offset": 0, "data": "x"},
    "result": {"build": 1, "attempt": 1, "status": "passed", "exit_code": 0, "steps": 1, "duration": 1.0},
    "artifact": {"build": 1, "attempt": 1, "path": "a.txt", "offset": 0, "data": "eA==", "eof": True},
    "run": {"build": 77, "attempt": 1, "repo": "/tmp/repo", "sha": SHA, "branch": "main",
            "steps": ["true"], "timeout": 5.0, "env": {"A": "b"}},
    "ping": {},
    "cancel": {"build": 424242},
    "status": {"limit": 3},
    "build": {"build": 1},
    "read_log": {"build": 1, "offset": 0, "follow": False},
    "watch": {"limit": 3},
    "artifacts": {"build": 1},
    "fetch_artifact": {"build": 1, "path": "a.txt"},
    "trigger": {"branch": "main"},
    "rebuild": {"build": 1},
    "poke": {"branch": "main"},
    "ok": {},
    "error": {"code": "x", "message": "y"},
    "pong": {"running": []},
    "chunk": {"offset": 0, "data": "x"},
    "event": {"event": "build"},
    "end": {},
}
# What each daemon lets the fuzzer in as (with the right secret), chosen so that
# no valid message it may send changes a build; the valid messages that would
# do real work there, only ever sent broken; and a request that must still be
# answered after the fuzz, on the same connection.
TARGETS = {
    "dispatcher": {"roles": ["reader"], "harmful": {"watch"}, "probe": {"type": "status", "limit": 1},
                   "to": "dispatcher"},
    "runner": {"roles": ["dispatcher"], "harmful": {"run"}, "probe": {"type": "ping"}, "to": "runner:r1"},
    "observer": {"roles": ["observer", "operator"], "harmful": set(), "probe": {"type": "poke"},
                 "to": "observer"},
}


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def encode(obj) -> bytes:
    return frame(json.dumps(obj).encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15)


def wrong_type(value):
    """A value of a JSON type no field of the table accepts where ``value`` is."""
    if isinstance(value, (bool, list, dict)):
        return st.sampled_from(["x", None, 3])
    if isinstance(value, (int, float)):
        return st.sampled_from(["7", None, [], {}])
    return st.sampled_from([7, None, [], {}, True])


@st.composite
def broken(draw):
    """A message of a known type that is certainly invalid (so never does anything)."""
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    msg = {"type": kind, **TEMPLATES[kind]}
    required = [k for k in protocol.MESSAGES[kind].required]
    how = draw(st.sampled_from(["drop", "unknown", "retype", "type"] if required else ["unknown", "type"]))
    if how == "drop":
        del msg[draw(st.sampled_from(required))]
    elif how == "unknown":
        msg["zz_" + draw(st.text(max_size=10))] = draw(json_values)
    elif how == "retype":
        name = draw(st.sampled_from(required))
        msg[name] = draw(wrong_type(msg[name]))
    else:
        msg["type"] = draw(st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2))
    return encode(msg)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"type":"status","limit":' + b"[" * depth + b"]" * depth + b"}"


def frames_for(harmful: set):
    """Well-framed frames (under MAX_FRAME) with any content at all."""
    valid = st.sampled_from(sorted(set(TEMPLATES) - harmful)).map(lambda k: encode({"type": k, **TEMPLATES[k]}))
    unknown = st.text(min_size=1, max_size=30).filter(lambda t: t not in protocol.MESSAGES).map(
        lambda t: encode({"type": t}))
    return st.one_of(
        valid,                                                          # allowed, or wrong role
        broken(),                                                       # wrong types, missing/extra fields
        unknown,                                                        # unknown types
        json_values.map(encode),                                        # any JSON at all
        st.binary(max_size=300).map(frame),                             # random bytes
        st.binary(max_size=100).map(lambda b: frame(b"\xff\xfe" + b)),  # not UTF-8
        st.builds(lambda o: frame(json.dumps(o).encode("utf-16")), json_values),
        st.builds(lambda d, k: frame(nested(d, k)), st.integers(1, 10_000),
                  st.sampled_from(["list", "object", "field"])),         # deeply nested
    )


def mutants(base: list[bytes], rng: random.Random, count: int, harmful: set) -> list[bytes]:
    """Byte-level mutations of the generated frames, cheap enough to make thousands: flips,
    insertions, deletions, duplications, truncations and splices of the JSON, each re-framed."""
    # a mutated harmful frame could turn valid again (a runner would run a `run`): never mutate one
    bodies = [f[4:] for f in base if not any(f'"{k}"'.encode() in f for k in harmful)] or [b"{}"]
    out = []
    for _ in range(count):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body) + 1)
            op = rng.randrange(6)
            if op == 0 and body:
                body[min(at, len(body) - 1)] = rng.randrange(256)
            elif op == 1:
                body[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 2:
                del body[at:at + rng.randint(1, 8)]
            elif op == 3:
                body[at:at] = body[at:at + rng.randint(1, 40)]
            elif op == 4:
                del body[at:]
            else:
                other = rng.choice(bodies)
                body[at:] = other[rng.randrange(len(other) + 1):]
        out.append(frame(bytes(body)))
    return out


# The last frame of a batch may leave the stream unusable: the daemon must drop it cleanly.
terminal = st.one_of(
    st.just(b""),
    st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(MAX_FRAME + 1, 2**32 - 1),
              st.binary(max_size=50)),                                   # oversized length prefix
    st.builds(lambda b, cut: b[:cut], st.sampled_from([encode({"type": "ping"}), encode(TEMPLATES["commit"])]),
              st.integers(1, 20)),                                       # truncated
    st.builds(lambda lie, body: struct.pack(">I", lie) + body, st.integers(0, 10),
              st.binary(min_size=11, max_size=60)),                      # length prefix that lies
)


def read_exactly(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_frame(sock: socket.socket):
    (length,) = struct.unpack(">I", read_exactly(sock, 4))
    frame = json.loads(read_exactly(sock, length))
    size = protocol.bulk_size(frame, 1 << 30)       # a bulk frame: its raw bytes follow
    return frame if size is None else protocol.attach(frame, read_exactly(sock, size))


def is_bulk(data: bytes) -> bool:
    try:
        return protocol.bulk_size(protocol.decode(data[4:]), 1 << 62) is not None
    except protocol.ProtocolError:
        return True         # a malformed count: the daemon closes the connection, which no answer says


def answers_for(data: bytes, role: str) -> protocol.Answers:
    """What the table says a daemon answers to one well-framed frame from ``role``."""
    try:
        msg = protocol.validate(protocol.decode(data[4:]), role)
    except protocol.ProtocolError:
        return protocol.Answers(ONLY_AN_ERROR)
    return protocol.Answers(msg["type"])        # hello and auth: an error (bad_message), which it allows


def authenticate(sock: socket.socket, role: str, secret: str, to: str) -> tuple[dict, net.Greeting]:
    """The handshake, as a client does it: the daemon's answer to our auth, and the greeting to check it."""
    greeting = net.Greeting("daemon", role, secret, id="fuzz" if role == "runner" else "", to=to)
    sock.sendall(encode(greeting.auth(read_frame(sock))))
    return read_frame(sock), greeting


def checked_session(addr: tuple[str, int], role: str, secret: str, frames: list[bytes], probe: dict,
                    harmful: set = frozenset(), to: str = "dispatcher") -> int:
    """Authenticate, pipeline the well-framed ``frames`` and then ``probe``, and read
    the table's answer to each, in order: exactly one reply per request (a stream to
    its end), an error for anything invalid. The probe's reply proves the connection
    still usable; after it the daemon, seeing our end, closes with nothing more to say.
    Frames that are valid ``harmful`` requests are not sent. Returns the frames sent."""
    # a JSON object with a "bytes" field is a bulk frame: raw bytes follow it, which these frames lack
    plan = [(data, answers_for(data, role)) for data in frames if len(data) - 4 <= MAX_FRAME and not is_bulk(data)]
    plan = [(data, answers) for data, answers in plan if answers.request not in harmful]
    with socket.create_connection(addr, timeout=10) as sock:
        welcome, greeting = authenticate(sock, role, secret, to)
        greeting.check(welcome)         # the daemon proved it holds the key too

        def send() -> None:         # while we read: a daemon that cannot write its replies stops reading
            try:
                sock.sendall(b"".join(data for data, _ in plan) + encode(probe))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                # the reads below say what went wrong
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for data, answers in plan:
                while not answers.done:
                    try:
                        answers.check(read_frame(sock))
                    except (protocol.ProtocolError, ConnectionError) as exc:
                        raise AssertionError(f"the answer to {data[:120]!r}: {exc}") from None
            reply = read_frame(sock)
            assert protocol.check_reply(probe["type"], reply)["type"] != "error", reply
            assert sock.recv(65536) == b"", "a frame after the last answer"
        finally:
            sender.join(10)
    return len(plan) + 1


def session(addr: tuple[str, int], role: str, secret: str, frames: list[bytes], first_is_auth: bool,
            to: str = "dispatcher") -> int:
    """Authenticate (or not), pipeline the frames, read until the daemon closes.
    Returns how many frames the daemon was in a position to read."""
    sent = 0
    with socket.create_connection(addr, timeout=10) as sock:
        if first_is_auth:
            welcome, _ = authenticate(sock, role, secret, to)
            authenticated = welcome.get("type") == "ok"
        else:
            read_frame(sock)                # the hello
            authenticated = False           # the first frame takes the place of the auth
        for data in frames:
            try:
                sock.sendall(data)
            except OSError:
                break
            if authenticated or sent == 0:
                sent += 1
        try:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass        # reset by a daemon that closed with our frames unread: fine
    return sent


# ---------------------------------------------------------------- in process, from the table

class TableServer:
    """net.serve in a thread of its own, answering every request with the
    table's example answer (test_protocol.ANSWERS), streams included."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, conn, msg):
        frames = [dict(f) for f in ANSWERS[msg["type"]]]
        if not protocol.is_stream(msg["type"]):
            return frames[0]
        for f in frames:
            await conn.send(f)
        return None

    def __enter__(self) -> "TableServer":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(net.serve(
            self.handle, "127.0.0.1", 0, secrets=KEYS, limits=net.Limits(max_frame=MAX_FRAME, read_timeout=2.0)),
            self.loop).result(10)
        self.addr = ("127.0.0.1", self.server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self.server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# a request each role may send, to show the connection still usable after the fuzz
PROBES = {"dispatcher": {"type": "ping"}, "runner": {"type": "log", **TEMPLATES["log"]},
          "observer": {"type": "poke"}, "operator": {"type": "status"}, "reader": {"type": "status"}}


@pytest.fixture(scope="module")
def table_server():
    with TableServer() as server:
        yield server


def test_every_request_frame_gets_exactly_the_answer_the_table_gives_it(table_server):
    @settings(max_examples=40, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(role=st.sampled_from(ROLES), base=st.lists(frames_for(set()), min_size=1, max_size=12),
           seed=st.integers(0, 2**32 - 1))
    def fuzz(role, base, seed):
        frames = base + mutants(base, random.Random(seed), 20, set())
        checked_session(table_server.addr, role, KEYS[role], frames, PROBES[role])
    fuzz()


# ---------------------------------------------------------------- the real daemons

@pytest.mark.slow
def test_fuzzed_frames_leave_every_daemon_alive_and_the_builds_unchanged(cluster, repo, tmp_path):
    c = cluster(extra={"auth": {f"{role}_secret": key for role, key in KEYS.items() if role != "dispatcher"},
                       "net": {"max_frame": MAX_FRAME, "read_timeout": 2.0}})
    c.dispatcher()
    runner = c.runner("r1")
    observer = c.observer(repo)
    before = c.wait_builds(finished, "the first commit built")
    assert [b["status"] for b in before] == ["passed"]
    daemons = {"dispatcher": c.disp, "runner": runner, "observer": observer}
    counts = dict.fromkeys(daemons, 0)

    for target, d in daemons.items():
        addr = net.parse_addr(d.addr)
        good, harmful, probe, to = (TARGETS[target][k] for k in ("roles", "harmful", "probe", "to"))

        @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        @given(who=st.one_of(st.sampled_from(good).map(lambda r: (r, KEYS[r], True)),
                             st.sampled_from(ROLES).map(lambda r: (r, "wrong", True)),
                             st.just(("reader", "", False))),
               base=st.lists(frames_for(harmful), min_size=4, max_size=12), seed=st.integers(0, 2**32 - 1),
               last=terminal)
        def fuzz(who, base, seed, last):
            role, secret, first_is_auth = who
            frames = base + mutants(base, random.Random(seed), 120, harmful)
            if secret == KEYS.get(role):
                counts[target] += checked_session(addr, role, secret, frames, probe, harmful, to)
                frames = frames[:2]       # then a stream that ends badly, on a connection of its own
            counts[target] += session(addr, role, secret, frames + [last], first_is_auth, to)
            assert d.alive(), f"the {target} died:\n{d.log()}"

        deadline = time.monotonic() + 60
        while counts[target] < FRAMES_WANTED // 3 + 1 and time.monotonic() < deadline:
            fuzz()
    assert sum(counts.values()) >= FRAMES_WANTED, counts

    # every daemon is alive and answering, and no build record changed
    assert all(d.alive() for d in daemons.values())
    assert c.builds() == before
    pong = asyncio.run(net.call(runner.addr, {"type": "ping"}, "dispatcher", KEYS["dispatcher"], timeout=10,
                                to="runner:r1"))
    assert pong["type"] == "pong"
    assert asyncio.run(net.call(observer.addr, {"type": "poke"}, "observer", KEYS["observer"],
                                timeout=10, to="observer"))["type"] == "ok"
    # and they still work together: a new commit is built
    repo.commit("after the fuzz")
    after = c.wait_builds(lambda b: len(b) == 2 and finished(b), "a commit built after the fuzz")
    assert [b["status"] for b in after] == ["passed", "passed"]
    for d in daemons.values():
        assert "Traceback" not in d.log_path.read_text(errors="replace"), d.log()


# ---------------------------------------------------------------- slow loris

class Loris:
    """``count`` connections per address, each sending one byte a second of a
    frame that never ends, reconnecting whenever a daemon drops one."""

    def __init__(self, targets: dict[str, int], interval: float = 1.0):
        self.targets, self.interval = targets, interval
        self.stop = threading.Event()
        self.open = 0
        self.dropped = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)

    async def main(self) -> None:
        await asyncio.gather(*(self.one(addr) for addr, n in self.targets.items() for _ in range(n)))

    async def one(self, addr: str) -> None:
        payload = struct.pack(">I", 200) + b'{"type":"auth","role":"reader","mac":"' + b"0" * 200
        host, port = net.parse_addr(addr)
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(self.interval)
                continue
            self.open += 1
            try:
                for byte in payload:
                    if self.stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(self.interval)
                    # reading what the daemon sends (its hello, then an error) notices a drop
                    try:
                        await asyncio.wait_for(reader.read(4096), 0.001)
                    except asyncio.TimeoutError:
                        pass
                    if reader.at_eof():
                        self.dropped += 1
                        break
            except OSError:
                self.dropped += 1
            finally:
                self.open -= 1
                writer.close()

    def __enter__(self) -> "Loris":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.slow
def test_slow_loris_connections_do_not_stop_a_commit_from_being_built(cluster, repo):
    c = cluster(extra={"net": {"read_timeout": 3.0}})
    c.dispatcher()
    runner = c.runner("r1")
    with Loris({c.disp.addr: 120, runner.addr: 60}) as loris:
        c.wait("the slow connections to open", lambda: loris.open >= 170, timeout=20)
        c.observer(repo)
        builds = c.wait_builds(finished, "a commit built while 180 connections trickle", timeout=60)
        assert [b["status"] for b in builds] == ["passed"]
        assert "building" in c.log(builds[0]["id"])
        # the daemons drop the trickling connections at their read timeout rather than wait forever
        c.wait("the daemons to drop slow connections", lambda: loris.dropped >= 100, timeout=20)
    assert c.disp.alive() and runner.alive()
