"""The wire protocol: framing, validation against the one table, the handshake,
and a live server that answers bad input with an error and keeps serving."""

import asyncio
import json
import struct

import pytest

from ci import net, protocol

SHA = "0123456789abcdef0123456789abcdef01234567"
COMMIT = {"type": "commit", "repo": "/r", "branch": "main", "sha": SHA, "author": "A <a@x>",
          "subject": "s", "time": 1.5}


def test_encode_decode_round_trip():
    frame = protocol.encode({"type": "ping"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert protocol.decode(frame[4:]) == {"type": "ping"}


@pytest.mark.parametrize("body, code", [
    (b"\xff\xfe", "bad_frame"),
    (b"{not json", "bad_frame"),
])
def test_decode_rejects_bad_payloads(body, code):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(body)
    assert err.value.code == code


@pytest.mark.parametrize("msg, code, words", [
    ([1, 2], "bad_message", "JSON object"),
    ({"kind": "x"}, "bad_message", "'type'"),
    ({"type": "launch"}, "unknown_type", "launch"),
    ({"type": "run"}, "forbidden", "run"),
    ({**COMMIT, "extra": 1}, "unknown_field", "extra"),
    ({**COMMIT, "sha": "xyz"}, "bad_field", "commit.sha"),
    ({**COMMIT, "sha": SHA.upper()}, "bad_field", "commit.sha"),
    ({**COMMIT, "branch": "a..b"}, "bad_field", "commit.branch"),
    ({**COMMIT, "branch": "-rf"}, "bad_field", "commit.branch"),
    ({**COMMIT, "time": True}, "bad_field", "commit.time"),
] + [({k: v for k, v in COMMIT.items() if k != name}, "missing_field", name)
     for name in ("repo", "branch", "sha", "author", "subject", "time")])
def test_validate_names_the_problem(msg, code, words):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.validate(msg, protocol.OBSERVER)
    assert err.value.code == code
    assert words in err.value.message


def test_validate_accepts_a_good_commit_and_roles_are_enforced():
    assert protocol.validate(dict(COMMIT), protocol.OBSERVER)["sha"] == SHA
    with pytest.raises(protocol.ProtocolError):
        protocol.validate(dict(COMMIT), protocol.READER)
    assert protocol.validate({"type": "status"}, protocol.OPERATOR)     # operators may read too


def test_parse_addr():
    assert net.parse_addr("127.0.0.1:8888") == ("127.0.0.1", 8888)
    assert net.parse_addr(":9") == ("127.0.0.1", 9)
    assert net.parse_addr("host", 7) == ("host", 7)
    with pytest.raises(ValueError):
        net.parse_addr("host:x")


# ---------------------------------------------------------------- live server

async def echo(conn, msg):
    return protocol.ok(got=msg["type"], role=conn.role)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def start(secret="", limits=net.Limits(read_timeout=1.0, max_frame=4096)):
    server = await net.serve(echo, "127.0.0.1", 0, secret=secret, limits=limits)
    return server, server.sockets[0].getsockname()[1]


async def raw_session(port, role="observer", secret=""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = net.Connection(reader, writer, net.Limits(read_timeout=2.0), "server")
    hello = await conn.recv()
    await conn.send({"type": "auth", "role": role, "mac": net.mac(secret, hello["nonce"], role)})
    return conn, await conn.recv()


def test_handshake_then_requests_and_errors_keep_the_connection_usable():
    async def body():
        server, port = await start()
        conn, welcome = await raw_session(port)
        assert welcome == {"type": "ok", "role": "observer"}
        for bad, code in [(b"{oops", "bad_frame"), (b"\xff", "bad_frame"), (b"[]", "bad_message"),
                          (json.dumps({"type": "nope"}).encode(), "unknown_type"),
                          (json.dumps({**COMMIT, "sha": "zz"}).encode(), "bad_field")]:
            conn.writer.write(struct.pack(">I", len(bad)) + bad)
            reply = await conn.recv()
            assert (reply["type"], reply["code"]) == ("error", code)
        await conn.send(dict(COMMIT))
        assert await conn.recv() == {"type": "ok", "got": "commit", "role": "observer"}
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
        assert (await other.request({"type": "status"}))["got"] == "status"
        await other.close()
        server.close()
    run(body())


def test_silent_and_half_frame_peers_are_dropped_without_blocking_others():
    async def body():
        server, port = await start()
        silent = await asyncio.open_connection("127.0.0.1", port)
        half, _ = await raw_session(port)
        half.writer.write(struct.pack(">I", 100) + b"{")   # and then nothing
        client = net.Client("127.0.0.1", port, "reader")
        assert (await client.request({"type": "status"}))["got"] == "status"
        # both are dropped after the read timeout (1 s here)
        assert await asyncio.wait_for(half.reader.read(), 5) == b""     # closed, no frame
        await silent[0].read()                                # hello, then EOF
        assert silent[0].at_eof()
        await client.close()
        server.close()
    run(body())


def test_wrong_secret_fails_authentication_without_detail():
    async def body():
        server, port = await start(secret="s3cret")
        conn, reply = await raw_session(port, secret="wrong")
        assert reply == {"type": "error", "code": "auth_failed", "message": "authentication failed"}
        good = net.Client("127.0.0.1", port, "reader", secret="s3cret")
        assert (await good.request({"type": "status"}))["role"] == "reader"
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
        server = await net.serve(echo, "127.0.0.1", port)
        assert (await client.request({"type": "status"}))["got"] == "status"
        await client.close()
        server.close()
    run(body())


def test_error_reply_raises_remote_error():
    async def handler(conn, msg):
        return protocol.error("stale", "build 1 attempt 1 is not current")

    async def body():
        server = await net.serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(protocol.RemoteError) as err:
            await net.call(f"127.0.0.1:{port}", {"type": "status"}, "reader")
        assert err.value.code == "stale"
        server.close()
    run(body())


def test_blocking_request_speaks_the_same_protocol():
    """`tinyci notify` uses the blocking client: same handshake, errors and replies."""
    async def body():
        server, port = await start(secret="s3cret")
        addr = f"127.0.0.1:{port}"
        reply = await asyncio.to_thread(net.request_blocking, addr, {"type": "poke"}, "observer", "s3cret")
        assert reply == {"type": "ok", "got": "poke", "role": "observer"}
        with pytest.raises(net.PeerAuthFailed):
            await asyncio.to_thread(net.request_blocking, addr, {"type": "poke"}, "observer", "wrong")
        with pytest.raises(protocol.RemoteError) as err:       # not for this role: an error reply
            await asyncio.to_thread(net.request_blocking, addr, {"type": "ping"}, "observer", "s3cret")
        assert err.value.code == "forbidden"
        server.close()
        await server.wait_closed()
        with pytest.raises(net.PeerRefused):
            await asyncio.to_thread(net.request_blocking, addr, {"type": "poke"}, "observer", "s3cret")
    run(body())


def test_a_reply_too_big_for_a_frame_is_answered_with_an_error_and_the_connection_kept():
    async def handler(conn, msg):
        return protocol.ok(data="x" * (10_000 if msg["type"] == "status" else 1))

    async def body():
        server = await net.serve(handler, "127.0.0.1", 0, limits=net.Limits(max_frame=4096))
        client = net.Client("127.0.0.1", server.sockets[0].getsockname()[1], "reader")
        with pytest.raises(protocol.RemoteError) as err:
            await client.request({"type": "status"})
        assert err.value.code == "too_large" and "4096" in err.value.message
        assert (await client.request({"type": "build", "build": 1}))["data"] == "x"   # same connection
        await client.close()
        server.close()
    run(body())
