"""The handshake (protocol v2), without daemons: a server made with net.serve
in this process, hand-made frames, and fake servers that do not hold the key.

A MAC is good on one connection only: for its nonces, its role, its id and
the target the client meant to reach. Each case changes one of them and is
refused; and a server that cannot prove it holds the key is refused by the
client, in the async Client and the blocking one alike."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from ci import blocking, net, protocol

KEYS = {("runner", "r1"): "key-of-r1", ("runner", "r2"): "key-of-r2", ("reader", ""): "key-of-readers",
        ("operator", ""): "key-of-operators"}
REFUSED = {"type": "error", "code": "auth_failed", "message": "authentication failed"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


SEEN: list[tuple[str, str]] = []      # (role, id) of each request the server handled


async def serve(identity: str = "dispatcher", roles: frozenset = frozenset(protocol.ROLES)):
    async def handler(conn, msg):
        SEEN.append((conn.role, conn.id))
        return protocol.error("unsupported", "a test server")
    server = await net.serve(handler, "127.0.0.1", 0, keys=lambda role, id: KEYS.get((role, id)), roles=roles,
                             identity=identity, limits=net.Limits(read_timeout=5))
    return server, server.sockets[0].getsockname()[1]


async def connect(port: int) -> tuple[net.Connection, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = net.Connection(reader, writer, net.Limits(read_timeout=5), "server")
    return conn, await conn.recv()


def auth(hello: dict, role: str, key: str, id: str = "", to: str = "dispatcher", mac_over: dict | None = None) -> dict:
    """An auth frame for ``hello``; ``mac_over`` makes the MAC over other parts than those sent."""
    nc = net.nonce()
    parts = {"key": key, "ns": hello["nonce"], "nc": nc, "role": role, "id": id, "to": to, **(mac_over or {})}
    return {"type": "auth", "role": role, "id": id, "nonce": nc, "to": to,
            "mac": net.client_mac(parts["key"], parts["ns"], parts["nc"], parts["role"], parts["id"], parts["to"])}


async def answer(port: int, make) -> dict:
    """One connection: ``make(hello)`` gives the auth frame; returns the server's reply."""
    conn, hello = await connect(port)
    try:
        await conn.send(make(hello))
        return await conn.recv()
    finally:
        await conn.close()


def test_the_right_mac_is_accepted_and_the_server_proves_it_holds_the_key():
    async def body():
        server, port = await serve()
        conn, hello = await connect(port)
        assert hello["version"] == protocol.PROTOCOL_VERSION == 3 and hello["name"] == "dispatcher"
        frame = auth(hello, "runner", "key-of-r1", id="r1")
        await conn.send(frame)
        welcome = await conn.recv()
        assert welcome == {"type": "ok", "role": "runner", "mac": net.server_mac(
            "key-of-r1", hello["nonce"], frame["nonce"], "runner", "r1", "dispatcher")}
        SEEN.clear()
        await conn.send({"type": "log", "build": 1, "attempt": 1, "offset": 0, "data": ""})
        assert (await conn.recv())["code"] == "unsupported"
        assert SEEN == [("runner", "r1")]           # the handler sees who it is
        await conn.close()
        server.close()
    run(body())


@pytest.mark.parametrize("case", [
    "mac for another target", "another target", "mac for another server nonce", "mac for another client nonce",
    "mac for another role", "another role's key", "mac for another id", "another runner's key",
    "a runner without an id", "an id for a role that has none", "a runner nobody knows", "no mac",
])
def test_a_mac_made_for_anything_else_is_refused_with_one_answer(case, caplog):
    makers = {
        "mac for another target": lambda h: auth(h, "reader", "key-of-readers", mac_over={"to": "observer"}),
        "another target": lambda h: auth(h, "reader", "key-of-readers", to="runner:r1"),
        "mac for another server nonce": lambda h: auth(h, "reader", "key-of-readers", mac_over={"ns": net.nonce()}),
        "mac for another client nonce": lambda h: auth(h, "reader", "key-of-readers", mac_over={"nc": net.nonce()}),
        "mac for another role": lambda h: auth(h, "reader", "key-of-readers", mac_over={"role": "operator"}),
        "another role's key": lambda h: auth(h, "operator", "key-of-readers"),
        "mac for another id": lambda h: auth(h, "runner", "key-of-r2", id="r1", mac_over={"id": "r2"}),
        "another runner's key": lambda h: auth(h, "runner", "key-of-r2", id="r1"),
        "a runner without an id": lambda h: auth(h, "runner", "key-of-r1"),
        "an id for a role that has none": lambda h: auth(h, "reader", "key-of-readers", id="r1"),
        "a runner nobody knows": lambda h: auth(h, "runner", "key-of-r1", id="r9"),
        "no mac": lambda h: {**auth(h, "reader", "key-of-readers"), "mac": ""},
    }

    async def body():
        server, port = await serve()
        assert await answer(port, makers[case]) == REFUSED
        server.close()
    with caplog.at_level(logging.WARNING, logger="ci.net"):
        run(body())
    assert "authentication failed for 127.0.0.1:" in caplog.text


def test_a_recorded_handshake_is_good_on_no_other_connection():
    async def body():
        server, port = await serve()
        first, hello = await connect(port)
        recorded = auth(hello, "operator", "key-of-operators")
        await first.send(recorded)
        assert (await first.recv())["type"] == "ok"
        # replayed as is on a new connection: the server's nonce differs, and so must the MAC
        assert await answer(port, lambda hello: recorded) == REFUSED
        await first.close()
        server.close()
    run(body())


def test_the_log_names_the_claim_and_where_it_was_meant_to_go(caplog):
    async def body():
        server, port = await serve("runner:r1", roles=frozenset({"dispatcher"}))
        await answer(port, lambda h: auth(h, "dispatcher", "key-of-r1", to="runner:evil"))
        await answer(port, lambda h: auth(h, "runner", "key-of-r1", id="r1", to="runner:r1"))
        server.close()
    with caplog.at_level(logging.WARNING, logger="ci.net"):
        run(body())
    assert "(claimed role dispatcher, meant for runner:evil)" in caplog.text
    assert "(claimed role runner as runner r1)" in caplog.text        # role runner is not served there


# ---------------------------------------------------------------- the client checks the server

class Impostor:
    """A server that greets as ``name`` and answers any auth with ``ok`` and a
    MAC made with ``key`` (not the real one): it cannot prove it holds the key."""

    def __init__(self, name: str = "dispatcher", key: str = "not-the-key", version: int = protocol.PROTOCOL_VERSION):
        self.name, self.key, self.version = name, key, version
        self.auths: list[dict] = []
        self.requests: list[dict] = []

    async def on_connect(self, reader, writer) -> None:
        conn = net.Connection(reader, writer, net.Limits(read_timeout=5), "client")
        ns = net.nonce()
        try:
            await conn.send({"type": "hello", "version": self.version, "nonce": ns, "name": self.name})
            got = await conn.recv_raw()
            self.auths.append(got)
            await conn.send({"type": "ok", "role": got["role"], "mac": net.server_mac(
                self.key, ns, got["nonce"], got["role"], got["id"], got["to"])})
            self.requests.append(await conn.recv_raw())
            await conn.send({"type": "ok"})
        except (ConnectionError, net.PeerError):
            pass
        await conn.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.on_connect, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


def test_a_server_without_the_key_is_refused_by_the_client_before_any_request():
    async def body():
        impostor = Impostor()
        addr = await impostor.start()
        with pytest.raises(net.PeerNotProven, match=f"{addr} could not prove it holds the operator secret "
                                                   r"\(not the daemon you meant to reach\?\)"):
            await net.call(addr, {"type": "trigger", "branch": "main"}, "operator", "key-of-operators")
        with pytest.raises(net.PeerNotProven, match="could not prove it holds the observer secret"):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", "s3cret")
        runner = Impostor(name="runner:r1")
        runner_addr = await runner.start()
        with pytest.raises(net.PeerNotProven, match="could not prove it holds the secret of runner r1"):
            await net.call(runner_addr, {"type": "ping"}, "dispatcher", "key-of-r1", to="runner:r1")
        with pytest.raises(net.PeerNotProven, match="could not prove it holds the secret of runner r1"):
            await net.call(addr, {"type": "register", "name": "r1", "host": "127.0.0.1", "port": 1, "labels": [],
                                  "slots": 1}, "runner", "key-of-r1", id="r1")
        assert len(impostor.auths) == 3 and impostor.requests == [] == runner.requests    # nothing was asked
        impostor.server.close()
        runner.server.close()
    run(body())


def test_a_server_that_says_it_is_another_daemon_gets_no_proof_at_all():
    async def body():
        impostor = Impostor(name="runner:r2")
        addr = await impostor.start()
        with pytest.raises(net.PeerNotProven, match=f"{addr} is runner:r2, not runner:r1"):
            await net.call(addr, {"type": "ping"}, "dispatcher", "key-of-r1", to="runner:r1")
        with pytest.raises(net.PeerNotProven, match="is runner:r2, not observer"):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", "s3cret",
                                    to="observer")
        assert impostor.auths == []
        impostor.server.close()
    run(body())


def test_another_protocol_version_is_named():
    async def body():
        impostor = Impostor(version=1)
        addr = await impostor.start()
        with pytest.raises(net.PeerError, match="speaks tinyci protocol version 1, this is version 3"):
            await net.call(addr, {"type": "status"}, "reader")
        impostor.server.close()
    run(body())


def test_a_hello_that_cannot_be_read_is_said_the_same_by_both_clients():
    async def garbled(reader, writer):
        writer.write(struct.pack(">I", 5) + b"{oops")      # a frame, but not JSON
        await writer.drain()
        await reader.read()

    async def body():
        server = await asyncio.start_server(garbled, "127.0.0.1", 0)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        said = f"handshake with {addr} failed: frame is not valid JSON"
        with pytest.raises(net.PeerError, match=said):
            await net.call(addr, {"type": "status"}, "reader")
        with pytest.raises(net.PeerError, match=said):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", to="observer")
        server.close()
    run(body())


def test_a_server_that_refuses_the_connection_at_once_is_quoted():
    async def busy(reader, writer):
        writer.write(protocol.encode(protocol.error("busy", "dispatcher has 512 connections open")))
        await writer.drain()
        writer.close()

    async def body():
        server = await asyncio.start_server(busy, "127.0.0.1", 0)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(net.PeerError, match=f"{addr} refused the connection: busy: dispatcher has 512"):
            await net.call(addr, {"type": "status"}, "reader")
        with pytest.raises(net.PeerError, match="refused the connection: busy"):
            await asyncio.to_thread(blocking.request_blocking, addr, {"type": "poke"}, "observer", to="observer")
        server.close()
    run(body())


def test_with_no_secret_at_all_the_proofs_are_empty_and_it_works_as_before():
    async def body():
        server = await net.serve(lambda conn, msg: _ok(), "127.0.0.1", 0)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        assert await net.call(addr, {"type": "poke"}, "observer") == {"type": "ok"}
        # but a server without a secret cannot answer a client that has one
        with pytest.raises(net.PeerAuthFailed):
            await net.call(addr, {"type": "poke"}, "observer", "s3cret")
        server.close()
    run(body())


async def _ok() -> dict:
    return protocol.ok()


# ---------------------------------------------------------------- the parts of the MAC

def test_the_parts_joined_for_the_mac_cannot_hold_the_separator():
    hello = {"type": "hello", "version": 3, "nonce": "ab" * 16, "name": "dispatcher"}
    assert protocol.validate(hello, protocol.SERVER)
    for field, value in [("nonce", "ab\x00cd" * 4), ("nonce", "AB" * 16), ("nonce", "ab"), ("name", "runner:a\x00b"),
                         ("name", "runner:"), ("name", "operator")]:
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.validate({**hello, field: value}, protocol.SERVER)
        assert err.value.code == "bad_field" and f"hello.{field}" in err.value.message
    base = {"type": "auth", "role": "runner", "id": "r1", "nonce": "cd" * 16, "to": "runner:r1", "mac": ""}
    assert protocol.validate(base, protocol.RUNNER)
    for field, value in [("id", "r\x001"), ("to", "dispatcher\x00"), ("mac", "g" * 64), ("mac", "ab")]:
        with pytest.raises(protocol.ProtocolError):
            protocol.validate({**base, field: value}, protocol.RUNNER)
    # the two sides' MACs differ even over the same parts: one cannot be reflected as the other
    parts = ("k", "ab" * 16, "cd" * 16, "reader", "", "dispatcher")
    assert net.client_mac(*parts) != net.server_mac(*parts) and len(net.client_mac(*parts)) == 64
    assert net.client_mac("", *parts[1:]) == "" == net.server_mac("", *parts[1:])
