"""The dispatcher's kept link to a runner (``keptlink.KeptLink``), against a real
server on loopback: overlapping requests answered in order, by callback or
awaited; a peer out of step, gone or silent fails what waits and the next
request connects anew; the same under TLS."""

import asyncio

import pytest

from ci import keptlink, net, protocol

RUNNER = protocol.runner_identity("r1")


class Runner:
    """A runner's server in miniature: ``ping`` answered with a pong whose
    ``running`` counts the requests so far, ``run`` with ok; ``bad`` makes it
    send, before its next answer, a frame the table does not allow there;
    ``hold`` makes it sit on its requests until set; ``gone`` drops the
    connection at the next request, unanswered."""

    def __init__(self):
        self.seen: list[str] = []
        self.bad = False
        self.hold: asyncio.Event | None = None
        self.gone = False

    async def __call__(self, conn, msg):
        self.seen.append(msg["type"])
        if self.hold is not None:
            await self.hold.wait()
        if self.gone:       # its process died: the connection goes, unanswered
            conn.writer.transport.abort()
            raise ConnectionError("gone")
        if self.bad:        # a runner out of step: a frame of its own before the answer
            self.bad = False
            await conn.send({"type": "ok"} if msg["type"] == "ping" else {"type": "pong", "running": []})
        if msg["type"] == "ping":
            return {"type": "pong", "running": [[len(self.seen), 1]]}
        return {"type": "ok"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def serve(handler, **kw):
    server = await net.serve(handler, "127.0.0.1", 0, roles=frozenset({protocol.DISPATCHER}), name="runner r1",
                             identity=RUNNER, limits=net.Limits(read_timeout=2.0), **kw)
    return server, server.sockets[0].getsockname()[1]


def link(port: int, **kw) -> keptlink.KeptLink:
    return keptlink.KeptLink("127.0.0.1", port, protocol.DISPATCHER, limits=net.Limits(read_timeout=2.0), to=RUNNER,
                         **kw)


async def posted(link: keptlink.KeptLink, msgs: list[dict]) -> list:
    """Post every message at once; each one's (reply, exception), in the order they went."""
    await link.connect()
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in msgs]
    for msg, future in zip(msgs, futures):
        link.post(msg, lambda reply, exc, future=future: future.set_result((reply, exc)))
    return await asyncio.gather(*futures)


def test_overlapping_requests_get_their_own_replies_in_order():
    async def body():
        server, port = await serve(Runner())
        a = link(port)
        answers = await posted(a, [{"type": "ping"}, {"type": "run", **RUN}, {"type": "ping"}])
        assert answers == [({"type": "pong", "running": [[1, 1]]}, None), ({"type": "ok"}, None),
                           ({"type": "pong", "running": [[3, 1]]}, None)]
        replies = await asyncio.gather(a.request({"type": "ping"}), a.request({"type": "cancel", "build": 1,
                                                                                "attempt": 1}))
        assert replies == [{"type": "pong", "running": [[4, 1]]}, {"type": "ok"}]
        await a.close()
        server.close()
    run(body())


RUN = {"build": 1, "attempt": 1, "repo": "/r", "sha": "0" * 40, "branch": "main", "steps": ["true"], "timeout": 60,
       "env": {}}


def test_a_pong_the_same_bytes_as_the_last_is_the_last_reply_and_any_other_is_checked_anew():
    """An idle runner's pong is the same bytes every time: handed on as the last
    one (no decoding); a different one is decoded, and a bad one still fails."""
    pongs = [{"type": "pong", "running": []}, {"type": "pong", "running": []}, {"type": "pong", "running": [[7, 2]]},
             {"type": "pong", "running": [[7, 2]]}, {"type": "pong", "running": "7"}]

    async def answer(conn, msg):
        if msg["type"] != "ping":
            return {"type": "ok"}
        pong = pongs.pop(0)
        if isinstance(pong["running"], str):        # not one the table allows: written past the server's check
            conn.writer.write(protocol.encode_parts(pong)[0])
            await conn.writer.drain()
            conn.writer.transport.close()
            raise ConnectionError("gone")
        return pong

    async def body():
        server, port = await serve(answer)
        a = link(port)
        answers = await posted(a, [{"type": "ping"}, {"type": "ping"}, {"type": "run", **RUN},
                                   {"type": "run", **RUN}, {"type": "ping"}, {"type": "ping"}])
        (p1, _), (p2, _), (ok1, _), (ok2, _), (p3, _), (p4, _) = answers
        assert p1 == p2 == {"type": "pong", "running": []} and p2 is p1
        assert ok1 == ok2 == {"type": "ok"} and ok2 is not ok1         # a reply to a request with fields: its own
        assert p3 == p4 == {"type": "pong", "running": [[7, 2]]} and p3 is not p1 and p4 is p3
        (reply, exc), = await posted(a, [{"type": "ping"}])
        assert reply is None and isinstance(exc, protocol.ProtocolError) and "running" in exc.message
        await a.close()
        server.close()
    run(body())


def test_a_reply_the_table_does_not_allow_fails_its_request_and_what_waits_behind_it():
    async def body():
        runner = Runner()
        server, port = await serve(runner)
        a = link(port)
        runner.bad = True
        (first, e1), (second, e2) = await posted(a, [{"type": "ping"}, {"type": "ping"}])
        assert first is None and isinstance(e1, protocol.ProtocolError) and '"ok"' in e1.message
        assert second is None and isinstance(e2, net.PeerError) and "out of step" in str(e2)
        assert not a.connected
        assert (await a.request({"type": "ping"}))["type"] == "pong"     # a new connection
        # the failed request's caller finds the connection gone already: trying again at once makes a new one
        runner.bad = True
        seen = []
        await a.connect()
        done = asyncio.get_running_loop().create_future()
        a.post({"type": "ping"}, lambda reply, exc: seen.append(a.connected) or done.set_result(exc))
        assert isinstance(await done, protocol.ProtocolError) and seen == [False]
        await a.close()
        server.close()
    run(body())


def test_a_peer_gone_fails_what_waits_and_the_next_request_connects_anew():
    async def body():
        runner = Runner()
        server, port = await serve(runner)
        a = link(port)
        runner.gone = True
        [(reply, exc)] = await posted(a, [{"type": "ping"}])
        assert reply is None and isinstance(exc, net.PeerError) and "lost connection to" in str(exc)
        assert not a.connected
        runner.gone = False
        assert (await a.request({"type": "ping"}))["type"] == "pong"     # a new connection
        server.close()
        await server.wait_closed()
        a.drop(net.PeerError("closed by the test"))
        with pytest.raises(net.PeerRefused, match="connection refused"):
            await a.request({"type": "ping"})
    run(body())


def test_a_request_not_answered_in_time_closes_the_connection():
    async def body():
        runner = Runner()
        runner.hold = asyncio.Event()
        server, port = await serve(runner)
        a = link(port)
        with pytest.raises(net.PeerTimeout, match="did not answer 'ping' within 0.2s"):
            await a.request({"type": "ping"}, timeout=0.2)
        assert not a.connected
        runner.hold = None
        assert (await a.request({"type": "ping"}))["type"] == "pong"
        await a.close()
        server.close()
    run(body())


def test_an_error_reply_is_raised_by_request_and_handed_to_post():
    async def body():
        async def refuse(conn, msg):
            return protocol.error("busy", "no free slot")
        server, port = await serve(refuse)
        a = link(port)
        with pytest.raises(protocol.RemoteError, match="no free slot"):
            await a.request({"type": "run", **RUN})
        [(reply, exc)] = await posted(a, [{"type": "run", **RUN}])
        assert exc is None and reply == {"type": "error", "code": "busy", "message": "no free slot"}
        assert a.connected          # an error is an answer: the connection stays in step
        await a.close()
        server.close()
    run(body())


def test_post_needs_the_connection_and_a_frame_within_the_limit():
    async def body():
        server, port = await serve(Runner())
        a = link(port)
        with pytest.raises(net.PeerError, match="no connection to 127.0.0.1"):
            a.post({"type": "ping"}, lambda reply, exc: None)
        await a.connect()
        with pytest.raises(protocol.ProtocolError, match="refusing to send"):
            a.post({"type": "run", **RUN, "env": {"X": "y" * (2 << 20)}}, lambda reply, exc: None)
        assert (await a.request({"type": "ping"}))["type"] == "pong"      # nothing went out: still in step
        await a.close()
        server.close()
    run(body())


def test_the_link_works_the_same_under_tls(pem):
    from ci import tls

    async def body():
        server, port = await serve(Runner(), ssl=tls.server_context(cert=pem["cert"], key=pem["key"]))
        a = link(port, ssl=tls.client_context(ca=pem["ca"]))
        answers = await posted(a, [{"type": "ping"}, {"type": "ping"}])
        assert [reply["running"] for reply, _ in answers] == [[[1, 1]], [[2, 1]]]
        await a.close()
        server.close()
    run(body())
