"""The transport: a live server that answers bad input with an error and keeps
serving, the handshake, exactly one reply per request (the table's), and
clients that hold the peer to the same table. What the messages mean is in
test_protocol.py."""

import asyncio
import json
import logging
import os
import struct
import time

import pytest

from ci import blocking, net, protocol

from test_protocol import ANSWERS, example

SHA = "0123456789abcdef0123456789abcdef01234567"
COMMIT = example("commit")


def test_parse_addr():
    assert net.parse_addr("127.0.0.1:8888") == ("127.0.0.1", 8888)
    assert net.parse_addr(":9") == ("127.0.0.1", 9)
    assert net.parse_addr("host", 7) == ("host", 7)
    assert net.parse_addr("[::1]:7") == ("::1", 7)
    for bad in ("host:x", "host:0", "host:65536", "host"):
        with pytest.raises(ValueError):
            net.parse_addr(bad)


# ---------------------------------------------------------------- live server

class Table:
    """A handler that answers every request with the table's example answer
    and remembers who asked."""

    def __init__(self):
        self.roles: list[str] = []

    async def __call__(self, conn, msg):
        self.roles.append(conn.role)
        frames = [dict(f) for f in ANSWERS[msg["type"]]]
        if not protocol.is_stream(msg["type"]):
            return frames[0]
        for frame in frames:
            await conn.send(frame)
        return None


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def start(handler=None, secret="", limits=net.Limits(read_timeout=1.0, max_frame=4096)):
    server = await net.serve(handler or Table(), "127.0.0.1", 0, secret=secret, limits=limits)
    return server, server.sockets[0].getsockname()[1]


async def raw_session(port, role="observer", secret=""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = net.Connection(reader, writer, net.Limits(read_timeout=2.0), "server")
    greeting = net.Greeting("server", role, secret, id="r1" if role == "runner" else "")
    await conn.send(greeting.auth(await conn.recv()))
    return conn, await conn.recv()


def test_handshake_then_requests_and_errors_keep_the_connection_usable():
    async def body():
        server, port = await start()
        conn, welcome = await raw_session(port)
        assert welcome == {"type": "ok", "role": "observer", "mac": ""}      # no secret: no proof
        for bad, code in [(b"{oops", "bad_frame"), (b"\xff", "bad_frame"), (b"[]", "bad_message"),
                          (json.dumps({"type": "nope"}).encode(), "unknown_type"),
                          (json.dumps({**COMMIT, "sha": "zz"}).encode(), "bad_field"),
                          (json.dumps({"type": "auth", "role": "reader", "id": "", "nonce": "ab" * 16,
                                       "to": "dispatcher", "mac": ""}).encode(), "bad_message")]:
            conn.writer.write(struct.pack(">I", len(bad)) + bad)
            reply = await conn.recv()
            assert (reply["type"], reply["code"]) == ("error", code)
        await conn.send(dict(COMMIT))
        assert await conn.recv() == ANSWERS["commit"][0]
        await conn.close()
        server.close()
    run(body())


def test_oversized_frame_is_refused_and_connection_closed_but_server_serves_others():
    async def body():
        server, port = await start()
        conn, _ = await raw_session(port)
        conn.writer.write(struct.pack(">I", 10_000_000))
        reply = await conn.recv()
        assert reply["code"] == "frame_too_large"
        assert await conn.reader.read() == b""          # closed
        other = net.Client("127.0.0.1", port, "reader")
        assert await other.request({"type": "status"}) == ANSWERS["status"][0]
        await other.close()
        server.close()
    run(body())


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_silent_and_half_frame_peers_are_dropped_without_blocking_others():
    async def body():
        server, port = await start()
        silent = await asyncio.open_connection("127.0.0.1", port)
        half, _ = await raw_session(port)
        half.writer.write(struct.pack(">I", 100) + b"{")   # and then nothing
        client = net.Client("127.0.0.1", port, "reader")
        assert await client.request({"type": "status"}) == ANSWERS["status"][0]
        # both are dropped after the read timeout (1 s here)
        assert await asyncio.wait_for(half.reader.read(), 5) == b""     # closed, no frame
        await silent[0].read()                                # hello, then EOF
        assert silent[0].at_eof()
        await client.close()
        server.close()
    run(body())


def test_wrong_secret_fails_authentication_without_detail():
    async def body():
        table = Table()
        server, port = await start(table, secret="s3cret")
        conn, reply = await raw_session(port, secret="wrong")
        assert reply == {"type": "error", "code": "auth_failed", "message": "authentication failed"}
        good = net.Client("127.0.0.1", port, "reader", secret="s3cret")
        await good.request({"type": "status"})
        assert table.roles == ["reader"]
        bad = net.Client("127.0.0.1", port, "reader", secret="")
        with pytest.raises(net.PeerAuthFailed, match="authentication failed"):
            await bad.request({"type": "status"})
        await good.close()
        server.close()
    run(body())


def test_client_reports_refused_and_reconnects_when_the_server_is_back():
    async def body():
        server, port = await start()
        server.close()
        await server.wait_closed()
        client = net.Client("127.0.0.1", port, "reader", limits=net.Limits(connect_timeout=2))
        with pytest.raises(net.PeerRefused, match=f"127.0.0.1:{port}"):
            await client.request({"type": "status"})
        server = await net.serve(Table(), "127.0.0.1", port)
        assert await client.request({"type": "status"}) == ANSWERS["status"][0]
        await client.close()
        server.close()
    run(body())


def test_error_reply_raises_remote_error_with_its_declared_extras():
    async def handler(conn, msg):
        return protocol.error("offset", "log of build 1 has 3 bytes, not 9", expected=3)

    async def body():
        server = await net.serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(protocol.RemoteError) as err:
            await net.call(f"127.0.0.1:{port}", example("log"), "runner", id="r1")
        assert (err.value.code, err.value.reply["expected"]) == ("offset", 3)
        server.close()
    run(body())


def test_a_stream_yields_its_frames_up_to_its_end():
    async def body():
        server, port = await start()
        client = net.Client("127.0.0.1", port, "reader")
        for kind in ("read_log", "watch"):
            assert [f async for f in client.stream(example(kind))] == ANSWERS[kind]
        assert [f async for f in client.stream({"type": "status"})] == ANSWERS["status"]    # one frame
        assert await client.request({"type": "status"}) == ANSWERS["status"][0]            # still in step
        with pytest.raises(ValueError, match="stream"):
            await client.request(example("read_log"))
        await client.close()
        server.close()
    run(body())


def test_blocking_request_speaks_the_same_protocol():
    """`tinyci notify` uses the blocking client: same handshake, errors and replies."""
    async def body():
        server, port = await start(secret="s3cret")
        addr = f"127.0.0.1:{port}"
        reply = await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", "s3cret")
        assert reply == {"type": "ok"}
        with pytest.raises(net.PeerAuthFailed):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", "wrong")
        with pytest.raises(protocol.RemoteError) as err:       # not for this role: an error reply
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "ping"}, "observer", "s3cret")
        assert err.value.code == "forbidden"
        server.close()
        await server.wait_closed()
        with pytest.raises(net.PeerRefused):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", "s3cret")
    run(body())


def test_a_reply_too_big_for_a_frame_is_answered_with_an_error_and_the_connection_kept():
    async def handler(conn, msg):
        size = 10_000 if msg["build"] == 1 else 1
        return protocol.ok(build={"subject": "x" * size})

    async def body():
        server = await net.serve(handler, "127.0.0.1", 0, limits=net.Limits(max_frame=4096))
        client = net.Client("127.0.0.1", server.sockets[0].getsockname()[1], "reader")
        with pytest.raises(protocol.RemoteError) as err:
            await client.request({"type": "build", "build": 1})
        assert err.value.code == "too_large" and "4096" in err.value.message
        assert (await client.request({"type": "build", "build": 2}))["build"] == {"subject": "x"}  # same connection
        await client.close()
        server.close()
    run(body())


# ---------------------------------------------------------------- exactly one reply, the table's

async def exchange(port, requests, role="reader"):
    """Pipeline ``requests`` on one connection, then read one frame per request."""
    conn, _ = await raw_session(port, role)
    for msg in requests:
        await conn.send(msg)
    replies = [await conn.recv() for _ in requests]
    await conn.close()
    return replies


def buggy(bug):
    """A handler that answers `build` with ``bug`` and everything else from the table."""
    table = Table()

    async def handler(conn, msg):
        if msg["type"] == "build":
            return bug(conn) if callable(bug) else bug
        return await table(conn, msg)
    return handler


@pytest.mark.parametrize("bug, words", [
    (None, "its handler returned no reply"),
    ({"type": "pong", "running": []}, "'build' is answered by ok or error, not str \"pong\""),
    ({"type": "ok"}, "build reply ok: missing field 'build'"),
    ({"type": "ok", "build": []}, "build reply ok.build: expected object"),
    ({"type": "ok", "build": {}, "extra": 1}, "build reply ok: unknown field 'extra'"),
    ({"type": "error", "code": "x"}, "build reply error: missing field 'message'"),
    ("ok", "not str \"ok\""),
])
def test_a_handler_bug_gets_exactly_one_internal_error_and_the_connection_stays_usable(bug, words, caplog):
    async def body():
        server, port = await start(buggy(bug))
        replies = await exchange(port, [{"type": "build", "build": 1}, {"type": "status"}])
        server.close()
        return replies

    with caplog.at_level(logging.ERROR, logger="ci.net"):
        bad, after = run(body())
    assert (bad["type"], bad["code"]) == ("error", "internal")
    assert bad["message"].startswith("server failed to answer 'build': ") and words in bad["message"]
    assert after == ANSWERS["status"][0]          # the next reply is the next request's: exactly one each
    assert any("bug" in r.message and "'build'" in r.message and words in r.message for r in caplog.records)


def test_a_stream_handler_answers_on_the_connection_and_may_return_an_error():
    async def handler(conn, msg):
        if msg["type"] == "read_log" and msg["build"] == 1:
            return None                                  # a bug: sent nothing
        if msg["type"] == "read_log" and msg["build"] == 2:
            return protocol.ok()                         # a bug: streams send their own frames
        if msg["type"] == "read_log":
            return protocol.error("not_found", "no build 3")
        return await Table()(conn, msg)

    async def body():
        server, port = await start(handler)
        replies = await exchange(port, [{"type": "read_log", "build": b} for b in (1, 2, 3)] + [{"type": "status"}])
        client = net.Client("127.0.0.1", port, "reader")
        assert [f async for f in client.stream(example("watch"))] == ANSWERS["watch"]
        await client.close()
        server.close()
        return replies

    none, ok, not_found, status = run(body())
    assert (none["code"], ok["code"]) == ("internal", "internal")
    assert "returned no reply" in none["message"] and "sends its frames itself" in ok["message"]
    assert not_found["code"] == "not_found"
    assert status == ANSWERS["status"][0]


# ---------------------------------------------------------------- clients check replies

class Liar:
    """A server that does the handshake, then answers every request with the
    next of ``frames`` (a list per request), whatever was asked."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.connections = 0

    async def on_connect(self, reader, writer):
        self.connections += 1
        conn = net.Connection(reader, writer, net.Limits(), "client")
        await conn.send({"type": "hello", "version": protocol.PROTOCOL_VERSION, "nonce": net.nonce(),
                         "name": protocol.DISPATCHER_ID})
        auth = await conn.recv_raw()
        await conn.send({"type": "ok", "role": auth["role"], "mac": ""})     # no secret: an empty proof
        try:
            while self.answers:
                await conn.recv_raw(idle=5)
                for frame in self.answers.pop(0):
                    await conn.send(frame)
        except (ConnectionError, net.PeerError):
            pass
        await conn.close()

    async def start(self):
        self.server = await asyncio.start_server(self.on_connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]


def test_a_client_refuses_a_reply_the_table_does_not_allow_and_reconnects():
    async def body():
        liar = Liar([[{"type": "ok"}],                                   # log: no offset
                     [{"type": "pong", "running": []}],                  # log answered by a pong
                     [{"type": "ok", "offset": 3}]])                     # right at last
        port = await liar.start()
        client = net.Client("127.0.0.1", port, "runner")
        with pytest.raises(protocol.ProtocolError) as err:
            await client.request(example("log"))
        assert (err.value.code, err.value.message) == ("missing_field", "log reply ok: missing field 'offset'")
        with pytest.raises(protocol.ProtocolError) as err:
            await client.request(example("log"))
        assert err.value.code == "bad_reply"
        assert (await client.request(example("log")))["offset"] == 3
        assert liar.connections == 3        # each refused reply dropped the connection
        await client.close()
        liar.server.close()
    run(body())


def test_a_client_stream_refuses_frames_out_of_order():
    async def body():
        liar = Liar([[{"type": "event", "event": "build", "build": {}}]])       # an event before the snapshot
        port = await liar.start()
        client = net.Client("127.0.0.1", port, "reader")
        with pytest.raises(protocol.ProtocolError) as err:
            async for _ in client.stream(example("watch")):
                pass
        assert err.value.code == "bad_reply"
        await client.close()
        liar.server.close()
    run(body())


def test_the_blocking_client_refuses_a_reply_the_table_does_not_allow():
    async def body():
        liar = Liar([[{"type": "ok", "surprise": 1}]])
        port = await liar.start()
        with pytest.raises(net.PeerError, match="unknown field 'surprise'"):
            await asyncio.to_thread(blocking.request_blocking, f"127.0.0.1:{port}", {"type": "poke"}, "observer")
        liar.server.close()
    run(body())


def test_a_plain_host_is_dialled_as_bytes_and_any_other_as_text_for_the_idna_codec():
    # bytes skip the codec (some 8 ms of a tool's start); what it would refuse or encode stays text
    assert blocking._dialable("127.0.0.1") == b"127.0.0.1"
    assert blocking._dialable("::1") == b"::1"
    assert blocking._dialable("ci.example.") == b"ci.example."
    assert blocking._dialable("bücher.example") == "bücher.example"
    assert blocking._dialable("a" * 64 + ".example") == "a" * 64 + ".example"
    assert blocking._dialable("a..example") == "a..example"


def test_a_host_name_the_resolver_refuses_is_a_peer_error():
    # a runner registers any text as its host; dialling it must fail as a peer, not as a bug
    with pytest.raises(net.PeerError, match="not a valid host name"):
        asyncio.run(net.call("a" * 300 + ".example:1", {"type": "status"}, "reader"))
    with pytest.raises(net.PeerError, match="not a valid host name"):
        blocking.request_blocking("a" * 300 + ".example:1", {"type": "poke"}, "operator", to="observer")


# ---------------------------------------------------------------- bulk frames (raw bytes after the JSON)

class Bulk:
    """A server that takes an artifact's bytes and gives them back with fetch_artifact."""

    def __init__(self):
        self.got = b""

    async def __call__(self, conn, msg):
        if msg["type"] == "artifact":
            self.got += msg["data"]
            return protocol.ok(offset=len(self.got))
        if msg["type"] == "fetch_artifact":
            offset = msg.get("offset", 0)
            data = self.got[offset:offset + conn.limits.max_bulk]
            return protocol.ok(data=data, offset=offset, size=len(self.got), eof=offset + len(data) >= len(self.got))
        return dict(ANSWERS[msg["type"]][0])


BULK_LIMITS = net.Limits(read_timeout=2.0, max_frame=4096, max_bulk=64 * 1024)
ARTIFACT = {"type": "artifact", "build": 1, "attempt": 1, "path": "a.bin", "offset": 0, "eof": False}


def bulk_header(**fields) -> bytes:
    body = json.dumps({**ARTIFACT, **fields}).encode()
    return struct.pack(">I", len(body)) + body


def test_bulk_frames_carry_bytes_as_they_are_both_ways():
    async def body():
        handler = Bulk()
        server, port = await start(handler, limits=BULK_LIMITS)
        blob = bytes(range(256)) * 700            # every byte value, over two bulk frames
        client = net.Client("127.0.0.1", port, "runner", limits=BULK_LIMITS, id="r1")
        for offset in range(0, len(blob), BULK_LIMITS.max_bulk):
            piece = blob[offset:offset + BULK_LIMITS.max_bulk]
            assert (await client.request({**ARTIFACT, "data": piece}))["offset"] == offset + len(piece)
        assert handler.got == blob
        reader = net.Client("127.0.0.1", port, "reader", limits=BULK_LIMITS)
        got, offset = b"", 0
        while True:
            reply = await reader.request({"type": "fetch_artifact", "build": 1, "path": "a.bin", "offset": offset})
            assert isinstance(reply["data"], bytes) and len(reply["data"]) <= BULK_LIMITS.max_bulk
            got += reply["data"]
            offset += len(reply["data"])
            if reply["eof"]:
                break
        assert got == blob
        await client.close()
        await reader.close()
        server.close()
    run(body())


class LogChunks:
    """A server answering read_log with the chunks it is given (bytes: bulk frames), then end;
    with ``stall``, the last chunk's header promises more bytes than ever come."""

    def __init__(self, chunks, stall=False):
        self.chunks, self.stall = chunks, stall

    async def __call__(self, conn, msg):
        offset = msg.get("offset", 0)
        for data in self.chunks:
            if self.stall and data is self.chunks[-1]:
                body = json.dumps({"type": "chunk", "offset": offset, "bytes": len(data) + 10}).encode()
                conn.writer.write(struct.pack(">I", len(body)) + body + data)
                await asyncio.sleep(30)         # cancelled when the server closes
            await conn.send({"type": "chunk", "offset": offset, "data": data})
            offset += len(data)
        await conn.send({"type": "end", "status": "passed", "offset": offset})


def test_the_blocking_stream_carries_bulk_frames_of_any_size_in_order():
    """`tinyci log` reads with BlockingLink: its kept buffer is reused for frames large
    and small, and never takes a byte of the next frame."""
    async def body():
        chunks = [bytes(range(256)) * 256, b"x", b"", bytes(range(255, -1, -1)) * 100, b"tail\n"]
        server, port = await start(LogChunks(chunks), secret="s3cret", limits=BULK_LIMITS)

        def read() -> list:
            link = blocking.BlockingLink(f"127.0.0.1:{port}", "reader", "s3cret", BULK_LIMITS)
            try:
                return list(link.stream({"type": "read_log", "build": 1, "binary": True}))
            finally:
                link.close()
        frames = await asyncio.to_thread(read)
        assert [f["data"] for f in frames[:-1]] == chunks
        assert all(type(f["data"]) is bytes for f in frames[:-1])
        assert frames[-1] == {"type": "end", "status": "passed", "offset": sum(map(len, chunks))}
        with pytest.raises(net.PeerAuthFailed):
            await asyncio.to_thread(blocking.BlockingLink, f"127.0.0.1:{port}", "reader", "wrong", BULK_LIMITS)
        server.close()
    run(body())


def test_the_blocking_stream_gives_up_on_a_peer_stalled_mid_frame_within_read_timeout():
    async def body():
        limits = net.Limits(read_timeout=0.5, max_frame=4096, max_bulk=64 * 1024)
        server, port = await start(LogChunks([b"first", b"never whole"], stall=True), limits=limits)
        got = []

        def read() -> float:
            link = blocking.BlockingLink(f"127.0.0.1:{port}", "reader", "", limits)
            started = time.monotonic()
            try:
                with pytest.raises(net.PeerTimeout, match="did not answer in time"):
                    for frame in link.stream({"type": "read_log", "build": 1, "binary": True}, idle=20.0):
                        got.append(frame["data"])
            finally:
                link.close()
            return time.monotonic() - started
        waited = await asyncio.to_thread(read)
        assert got == [b"first"]
        assert waited < 10.0        # the frame's read_timeout ended it, not the idle wait for a frame
        server.close()
    run(body())


@pytest.mark.parametrize("count", [-1, "12", 1.5, True, None])
def test_a_bulk_frame_with_a_malformed_count_closes_the_connection(count):
    async def body():
        server, port = await start(Bulk(), limits=BULK_LIMITS)
        conn, _ = await raw_session(port, "runner")
        conn.writer.write(bulk_header(bytes=count) + b"xxxx")
        reply = await conn.recv()
        assert (reply["type"], reply["code"]) == ("error", "bad_frame") and "count of bytes" in reply["message"]
        assert await conn.reader.read() == b""          # closed: where the next frame starts is unknown
        server.close()
    run(body())


def test_a_bulk_frame_over_the_limit_closes_the_connection_but_the_server_serves_others():
    async def body():
        server, port = await start(Bulk(), limits=BULK_LIMITS)
        conn, _ = await raw_session(port, "runner")
        conn.writer.write(bulk_header(bytes=BULK_LIMITS.max_bulk + 1))
        reply = await conn.recv()
        assert reply["code"] == "frame_too_large" and "exceeds the limit of 65536" in reply["message"]
        assert await conn.reader.read() == b""
        other = net.Client("127.0.0.1", port, "runner", limits=BULK_LIMITS, id="r1")
        assert await other.request({**ARTIFACT, "data": b"ok"}) == {"type": "ok", "offset": 2}
        await other.close()
        server.close()
    run(body())


def test_no_bulk_frame_before_the_handshake_is_done():
    async def body():
        server, port = await start(Bulk(), limits=BULK_LIMITS)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = net.Connection(reader, writer, net.Limits(read_timeout=2.0), "server")
        await conn.recv()                                   # hello
        auth = json.dumps({"type": "auth", "role": "reader", "id": "", "nonce": "ab" * 16, "to": "dispatcher",
                           "mac": "", "bytes": 10}).encode()
        writer.write(struct.pack(">I", len(auth)) + auth + b"x" * 10)
        reply = await conn.recv()
        assert reply["code"] == "frame_too_large" and "before the handshake" in reply["message"]
        assert await reader.read() == b""
        server.close()
    run(body())


def test_a_truncated_bulk_frame_ends_the_connection_and_the_server_goes_on():
    async def body():
        server, port = await start(Bulk(), limits=BULK_LIMITS)
        conn, _ = await raw_session(port, "runner")
        conn.writer.write(bulk_header(bytes=1000) + b"only this much")
        conn.writer.write_eof()
        assert await conn.reader.read() == b""               # dropped, nothing stored, no reply
        other = net.Client("127.0.0.1", port, "runner", limits=BULK_LIMITS, id="r1")
        assert await other.request({**ARTIFACT, "data": b"next"}) == {"type": "ok", "offset": 4}
        await other.close()
        server.close()
    run(body())


@pytest.mark.parametrize("header, code", [
    ({"type": "result", "build": 1, "attempt": 1, "status": "passed", "exit_code": 0, "steps": 1,
      "duration": 1.0, "bytes": 3}, "unknown_field"),           # a result carries no bytes
    ({**ARTIFACT, "data": "eA==", "bytes": 3}, "bad_message"),  # data twice
    ({**ARTIFACT, "data": "eA=="}, "bad_field"),                # an artifact's data is bytes, never text
])
def test_bytes_where_the_table_has_none_are_refused_and_the_connection_stays_in_step(header, code):
    async def body():
        server, port = await start(Bulk(), limits=BULK_LIMITS)
        conn, _ = await raw_session(port, "runner")
        frame = json.dumps(header).encode()
        conn.writer.write(struct.pack(">I", len(frame)) + frame + (b"abc" if "bytes" in header else b""))
        reply = await conn.recv()
        assert (reply["type"], reply["code"]) == ("error", code)
        await conn.send({**ARTIFACT, "data": b"fine"})          # the next frame is read where it starts
        assert await conn.recv() == {"type": "ok", "offset": 4}
        await conn.close()
        server.close()
    run(body())


def test_a_sender_refuses_bytes_over_its_bulk_limit_and_writes_nothing():
    async def body():
        handler = Bulk()
        server, port = await start(handler, limits=BULK_LIMITS)
        client = net.Client("127.0.0.1", port, "runner", limits=BULK_LIMITS, id="r1")
        with pytest.raises(protocol.ProtocolError, match="net.max_bulk is 65536"):
            await client.request({**ARTIFACT, "data": b"x" * (BULK_LIMITS.max_bulk + 1)})
        assert await client.request({**ARTIFACT, "data": b"y"}) == {"type": "ok", "offset": 1}
        assert handler.got == b"y"
        await client.close()
        server.close()
    run(body())


class FileServer:
    """Answers read_artifact with the bytes of ``path`` sent by Connection.send_file;
    ``short`` announces that many bytes more than the file holds."""

    def __init__(self, path, short=0):
        self.path, self.short = path, short

    async def __call__(self, conn, msg):
        with open(self.path, "rb", buffering=0) as file:
            size = file.seek(0, 2) + self.short
            await conn.send(protocol.ok(size=size))
            offset = msg.get("offset", 0)
            while offset < size:
                count = min(conn.limits.max_bulk, size - offset)
                await conn.send_file({"type": "chunk", "offset": offset}, file, offset, count)
                offset += count
            await conn.send({"type": "end", "offset": offset})


async def read_stream(port, ssl=None, offset=0):
    client = net.Client("127.0.0.1", port, "reader", limits=BULK_LIMITS, ssl=ssl)
    got, chunks = b"", 0
    try:
        async for frame in client.stream({"type": "read_artifact", "build": 1, "path": "a.bin", "offset": offset}):
            if frame["type"] == "chunk":
                assert frame["offset"] == offset + len(got) and len(frame["data"]) <= BULK_LIMITS.max_bulk
                got += frame["data"]
                chunks += 1
    finally:
        await client.close()
    return got, chunks


def test_a_file_goes_out_as_bulk_frames_by_sendfile_plain_and_under_tls(tmp_path, pem):
    from ci import tls
    blob = bytes(range(256)) * 700 + b"tail"        # every byte value, over three bulk frames
    (tmp_path / "a.bin").write_bytes(blob)

    async def body():
        plain = await net.serve(FileServer(tmp_path / "a.bin"), "127.0.0.1", 0, limits=BULK_LIMITS)
        secure = await net.serve(FileServer(tmp_path / "a.bin"), "127.0.0.1", 0, limits=BULK_LIMITS,
                                 ssl=tls.server_context(cert=pem["cert"], key=pem["key"]))
        assert await read_stream(plain.sockets[0].getsockname()[1]) == (blob, 3)
        assert await read_stream(plain.sockets[0].getsockname()[1], offset=70_000) == (blob[70_000:], 2)
        # TLS cannot use sendfile: asyncio reads and writes the pieces instead, the same frames
        assert await read_stream(secure.sockets[0].getsockname()[1],
                                 ssl=tls.client_context(ca=pem["ca"])) == (blob, 3)
        plain.close()
        secure.close()
    run(body())


def test_a_file_shorter_than_its_frame_said_closes_the_connection(tmp_path, caplog):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)

    async def body():
        server = await net.serve(FileServer(tmp_path / "a.bin", short=10), "127.0.0.1", 0, limits=BULK_LIMITS)
        with pytest.raises(net.PeerError, match="closed the connection mid-frame"):
            await read_stream(server.sockets[0].getsockname()[1])
        server.close()
    with caplog.at_level(logging.DEBUG, logger="ci.net"):
        run(body())
    assert "ended 10 bytes early" in caplog.text and "Traceback" not in caplog.text


def test_big_bulk_frames_are_received_straight_into_their_buffer_and_the_stream_stays_in_step(caplog):
    """Frames of several MiB (most of each received by the socket into one buffer,
    not the stream's reader), each followed by a plain frame; a truncated one
    ends the connection at once, a stalled one within read_timeout."""
    limits = net.Limits(read_timeout=1.0, max_bulk=8 << 20)
    blob = os.urandom(6 << 20)

    async def body():
        handler = Bulk()
        server, port = await start(handler, limits=limits)
        conn, _ = await raw_session(port, "runner")
        conn.limits = limits
        for piece in (blob[:1], blob, blob[:3 << 20]):
            handler.got = b""
            await conn.send({**ARTIFACT, "data": piece})
            await conn.send({"type": "register", "name": "r1", "host": "h", "port": 1, "labels": [], "slots": 1})
            assert await conn.recv() == {"type": "ok", "offset": len(piece)} and handler.got == piece
            assert (await conn.recv())["type"] == "ok"
        await conn.close()
        # the reading side: a client gets big bulk frames back the same way
        reader = net.Client("127.0.0.1", port, "reader", limits=limits)
        handler.got = blob
        reply = await reader.request({"type": "fetch_artifact", "build": 1, "path": "a.bin", "offset": 0})
        assert reply["data"] == blob[:limits.max_bulk]
        await reader.close()

        truncated, _ = await raw_session(port, "runner")
        truncated.writer.write(bulk_header(bytes=5 << 20) + blob[:1 << 20])
        truncated.writer.write_eof()
        started = time.monotonic()
        assert await truncated.reader.read() == b""
        assert time.monotonic() - started < limits.read_timeout       # not the stall's bound: at once
        stalled, _ = await raw_session(port, "runner")
        stalled.writer.write(bulk_header(bytes=5 << 20) + blob[:1 << 20])
        started = time.monotonic()
        assert await stalled.reader.read() == b""                       # dropped after read_timeout
        assert time.monotonic() - started < 5 * limits.read_timeout
        server.close()

    with caplog.at_level(logging.DEBUG, logger="ci.net"):
        run(body())
    assert "closed the connection mid-frame" in caplog.text and "idle, closing" in caplog.text
    assert net._Sink.kind is not None          # the bytes took the direct way


def test_an_artifacts_bytes_are_lent_and_their_buffer_serves_the_next_only_once_given_back():
    """An artifact chunk's bytes come as a view of a buffer the connection
    reuses for the next one once the handler gives it back, each chunk's bytes
    its own; one kept by its handler is not reused, a view given back cannot
    be read again, the last chunk leaves no spare behind, and small chunks and
    a log's bytes are copies of their own, never lent."""
    limits = net.Limits(read_timeout=2.0, max_bulk=4 << 20)
    chunks = [os.urandom(3 << 20), os.urandom(3 << 20), os.urandom(2 << 20), os.urandom(100),
              os.urandom(3 << 19)]
    seen, kept = [], []

    async def handler(conn, msg):
        data = msg["data"]
        if not isinstance(data, memoryview):
            seen.append((msg["type"], type(data), bytes(data)))
            return protocol.ok(offset=msg["offset"] + len(data))
        size = len(data)
        seen.append(("lent", data.obj, bytes(data)))
        if msg["offset"] == len(chunks[0]):
            kept.append(data)           # still being written, say: not given back
        else:
            conn.give_back(data, last=msg["eof"])
            with pytest.raises(ValueError):
                bytes(data)             # released: a late reader fails rather than reads the next chunk
        seen.append(("spares", len(conn.spares)))
        return protocol.ok(offset=msg["offset"] + size)

    async def body():
        server, port = await start(handler, limits=limits)
        conn, _ = await raw_session(port, "runner")
        conn.limits = limits
        offset = 0
        for n, chunk in enumerate(chunks):
            await conn.send({**ARTIFACT, "offset": offset, "data": chunk, "eof": n == len(chunks) - 1})
            assert await conn.recv() == {"type": "ok", "offset": offset + len(chunk)}
            offset += len(chunk)
        await conn.send({"type": "log", "build": 1, "attempt": 1, "offset": 0, "data": chunks[2]})
        assert (await conn.recv())["offset"] == len(chunks[2])
        await conn.close()
        server.close()

    run(body())
    first, spares1, second, spares2, third, spares3, small, last, spares5, logged = seen
    assert [first[2], second[2], third[2], small[2], last[2]] == chunks and bytes(kept[0]) == chunks[1]
    assert spares1 == ("spares", 1) and second[1] is first[1]      # the first's buffer served the second
    assert spares2 == ("spares", 0) and third[1] is not first[1]   # the second's kept: the third's is new
    assert spares3 == ("spares", 1)
    assert small == ("artifact", bytes, chunks[3])                 # under LEND_MIN: a copy of its own
    assert last[1] is third[1] and spares5 == ("spares", 0)        # the spare served it, and none is kept
    assert logged == ("log", bytes, chunks[2])


def test_requests_written_ahead_are_all_answered_and_a_stalled_body_behind_them_still_times_out():
    """Frames already in when the server reads are taken without a timer; the
    frame behind them, its header in with them and its body stalled, still
    closes the connection within read_timeout, not idle_timeout."""
    limits = net.Limits(read_timeout=0.5, idle_timeout=60.0, max_frame=4096)

    async def body():
        server, port = await start(limits=limits)
        conn, _ = await raw_session(port)
        commit = protocol.encode_parts(dict(COMMIT))[0]
        stalled = protocol.encode_parts({**COMMIT, "sha": "b" * 40})[0]
        conn.writer.write(commit * 3 + stalled[:10])       # three whole requests, the fourth's header and a bit
        for _ in range(3):
            assert await conn.recv() == ANSWERS["commit"][0]
        started = time.monotonic()
        assert await conn.reader.read() == b""             # dropped: the fourth's body never came
        assert time.monotonic() - started < 10 * limits.read_timeout
        server.close()
    run(body())
