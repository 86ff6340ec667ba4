"""Who may hold a server's connections (ci/gate.py): the bookkeeping on its
own, then a live server over real sockets that keeps answering clients with a
secret while sockets that prove nothing crowd in, and refuses a large frame
before authentication at its length prefix."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from ci import gate, net, protocol

from test_net import Table, run
from test_protocol import ANSWERS

SECRET = "s3cret"


# ---------------------------------------------------------------- the bookkeeping

class Dropped(list):
    def drop(self, name: str):
        return lambda: self.append(name)


def test_a_full_house_of_handshakes_drops_the_oldest_of_the_busiest_address():
    dropped = Dropped()
    g = gate.Gate(net.Limits(max_handshakes=3, max_per_peer=10))
    a1, _ = g.admit("10.0.0.1", dropped.drop("a1"))
    b1, _ = g.admit("10.0.0.2", dropped.drop("b1"))
    a2, _ = g.admit("10.0.0.1", dropped.drop("a2"))
    b2, why = g.admit("10.0.0.2", dropped.drop("b2"))       # 10.0.0.1 holds the most: its oldest goes
    assert b2 is not None and why == "" and dropped == ["a1"]
    g.release(a1)                                            # its connection task ends later: no effect
    assert list(g.handshakes) == [b1, a2, b2] and g.per_peer == {"10.0.0.1": 1, "10.0.0.2": 2}
    assert g.authenticated(b1) and g.open == 1 and list(g.handshakes) == [a2, b2]
    g.release(b1)
    g.release(b1)
    assert g.open == 0 and g.per_peer == {"10.0.0.1": 1, "10.0.0.2": 1}


def test_one_address_makes_room_from_its_own_handshakes_or_is_refused():
    dropped = Dropped()
    g = gate.Gate(net.Limits(max_handshakes=10, max_per_peer=2, max_connections=5), "dispatcher")
    first, _ = g.admit("10.0.0.1", dropped.drop("first"))
    second, _ = g.admit("10.0.0.1", dropped.drop("second"))
    third, _ = g.admit("10.0.0.1", dropped.drop("third"))
    assert third is not None and dropped == ["first"]
    assert g.authenticated(second) and g.authenticated(third)
    refused, why = g.admit("10.0.0.1", dropped.drop("fourth"))    # nothing left to drop
    assert refused is None and why == "10.0.0.1 has 2 connections open to dispatcher"
    assert g.admit("10.0.0.2", dropped.drop("other"))[0] is not None
    assert not g.authenticated(first)                    # dropped before it finished its handshake


def test_authenticated_places_are_their_own_budget():
    g = gate.Gate(net.Limits(max_handshakes=10, max_per_peer=10, max_connections=1), "runner")
    one, _ = g.admit("10.0.0.1", lambda: None)
    two, _ = g.admit("10.0.0.2", lambda: None)
    assert g.authenticated(one) and not g.authenticated(two)    # the last place went to the first
    assert g.admit("10.0.0.3", lambda: None) == (None, "runner has 1 connections open")
    g.release(one)
    assert g.admit("10.0.0.3", lambda: None)[0] is not None


# ---------------------------------------------------------------- a live server

async def serve(limits: net.Limits):
    server = await net.serve(Table(), "127.0.0.1", 0, secret=SECRET, limits=limits)
    return server, server.sockets[0].getsockname()[1]


async def silent(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections, one after the other, that read the hello and then say nothing."""
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        assert b'"hello"' in await reader.readexactly(length)
        conns.append((reader, writer))
    return conns


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection without another frame."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:         # reset, or our own write found it closed
        return True


async def status(port: int) -> dict:
    client = net.Client("127.0.0.1", port, "reader", SECRET, net.Limits(connect_timeout=5, read_timeout=5))
    try:
        return await client.request({"type": "status"})
    finally:
        await client.close()


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_silent_sockets_from_one_address_do_not_keep_out_a_client_with_a_secret():
    async def body():
        # 30 places for connections, and 40 sockets that never authenticate, all from 127.0.0.1
        server, port = await serve(net.Limits(read_timeout=30, max_connections=30))
        crowd = await silent(port, 40)
        assert await status(port) == ANSWERS["status"][0]
        # past the handshake budget, the oldest silent sockets make way, one for each newcomer
        small, small_port = await serve(net.Limits(read_timeout=30, max_handshakes=8, max_per_peer=16))
        crowd2 = await silent(small_port, 30)
        started = time.monotonic()
        assert await status(small_port) == ANSWERS["status"][0]
        assert time.monotonic() - started < 5
        for reader, _ in crowd2[:23]:       # 22 made way for the newer ones, one for the client
            assert await closed(reader)
        for reader, _ in crowd2[23:]:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.1)
        for _, writer in crowd + crowd2:
            writer.close()
        server.close()
        small.close()
    run(body())


def test_a_large_frame_before_authentication_is_refused_at_its_length():
    async def body():
        server, port = await serve(net.Limits())
        (reader, writer), = await silent(port, 1)
        writer.write(struct.pack(">I", 1 << 20))    # within max_frame, but nobody has authenticated
        (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 5))
        reply = protocol.decode(await reader.readexactly(length))
        assert (reply["code"], reply["message"]) == ("frame_too_large",
                                                     "frame of 1048576 bytes exceeds the limit of 4096")
        assert await closed(reader)         # without reading the body
        # once authenticated, a client may send frames up to max_frame
        client = net.Client("127.0.0.1", port, "runner", SECRET, id="r1")
        big = {"type": "log", "build": 1, "attempt": 1, "offset": 0, "data": "x" * 60_000}
        assert await client.request(big) == ANSWERS["log"][0]
        await client.close()
        writer.close()
        server.close()
    run(body())


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_the_whole_handshake_must_end_within_the_read_timeout():
    async def body():
        server, port = await serve(net.Limits(read_timeout=2.0))
        (reader, writer), = await silent(port, 1)
        nc = net.nonce()
        frame = protocol.encode({"type": "auth", "role": "reader", "id": "", "nonce": nc, "to": "dispatcher",
                                 "mac": net.client_mac(SECRET, "x" * 32, nc, "reader", "", "dispatcher")})
        # each read in time on its own (the length by 1.5 s, the body 1.5 s after it),
        # but the handshake as a whole takes 3 s: dropped at 2 s, never answered (not even
        # with auth_failed, as this MAC of another nonce would be)
        for pause, part in [(0.5, frame[:1]), (0.5, frame[1:2]), (0.5, frame[2:3]), (0.75, frame[3:4]),
                            (0.75, frame[4:20]), (0, frame[20:])]:
            writer.write(part)
            await asyncio.sleep(pause)
        assert await closed(reader)
        writer.close()
        server.close()
    run(body())
