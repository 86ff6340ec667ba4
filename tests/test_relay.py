"""The relay attack (issue 11, item 1), against the real daemons.

Whoever holds a runner's secret registers a runner "evil" whose address is a
relay: a real byte-forwarding proxy in this process. When the dispatcher
dials evil, the relay connects to the real runner "victim" and forwards
bytes both ways; the dispatcher's proof travels to the victim, and right
after it the relay sends a `run` of its own. Under protocol v1 the victim
took the relayed MAC for the dispatcher's and ran the command. Now the MAC
names its target (runner:evil) and both nonces, so the victim refuses it;
and a relay that does not rename the victim's hello is refused by the
dispatcher itself, before it sends any proof.

Both with one shared secret (`tinyci up`) and with per-runner credentials;
and the same relay between a tool and the daemon it did not mean to reach."""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
import threading
from pathlib import Path

import pytest
import yaml

from ci import net, protocol

from conftest import tinyci, wait_until

pytestmark = pytest.mark.slow

SHA = "0123456789abcdef0123456789abcdef01234567"


def frame(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, dict]:
    header = await reader.readexactly(4)
    body = await reader.readexactly(struct.unpack(">I", header)[0])
    return header + body, json.loads(body)


class Relay:
    """Listens on loopback; each connection it gets, it forwards to ``target``.
    ``rename``: the identity to put in the target's hello (as a relay that
    wants the dialler to go on would), None to forward it untouched.
    ``inject``: a request sent to the target right after the dialler's first
    frame (its auth), riding on whatever that auth achieved. Runs its own
    event loop in a thread; records what the target answered."""

    def __init__(self, target: str, inject: dict, rename: str | None = None):
        self.target = net.parse_addr(target)
        self.inject, self.rename = inject, rename
        self.connections = 0
        self.answers: list[dict] = []           # frames from the target after its hello
        self.injected = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "Relay":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.on_connect, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        async def close() -> None:
            self.server.close()
            # end the relayed connections here, while the loop runs: a coroutine left
            # for the garbage collector would close its writer on a closed loop
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        t_reader, t_writer = await asyncio.open_connection(*self.target)
        try:
            await asyncio.wait_for(asyncio.gather(self.downstream(t_reader, writer),
                                                  self.upstream(reader, t_writer)), 15)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            t_writer.close()

    async def downstream(self, t_reader, writer) -> None:
        """Target -> dialler: its hello (renamed, or not), then every frame as is."""
        raw, hello = await read_frame(t_reader)
        if self.rename:
            raw = frame({**hello, "name": self.rename})
        writer.write(raw)
        while True:
            raw, msg = await read_frame(t_reader)
            self.answers.append(msg)
            writer.write(raw)

    async def upstream(self, reader, t_writer) -> None:
        """Dialler -> target: every frame as is, and the injected request after the first."""
        first = True
        while True:
            raw, _ = await read_frame(reader)
            t_writer.write(raw)
            if first:
                t_writer.write(frame(self.inject))
                self.injected += 1
                first = False


def register(disp: str, name: str, key: str, port: int) -> dict:
    """Register a runner ``name`` at ``port`` with ``key``, as its holder would."""
    return asyncio.run(net.call(disp, {"type": "register", "name": name, "host": "127.0.0.1", "port": port,
                                       "labels": ["relay"], "slots": 1}, protocol.RUNNER, key, id=name, timeout=10))


def nothing_ran(victim, pwned: Path) -> None:
    assert not pwned.exists(), "the relayed run ran on the victim"
    log = victim.log(100_000)
    assert "build 999" not in log and "running" not in log, log
    outbox = Path(victim.args[victim.args.index("--workdir") + 1])
    assert not list(outbox.rglob("*.log")) and not (outbox / "checkouts").exists()


def keys_for(setup: str, tmp_path: Path) -> tuple[dict, dict, dict]:
    """(dispatcher's auth section, the victim's, the secrets by holder)."""
    if setup == "shared":
        shared = secrets.token_hex(16)
        return {"secret": shared}, {"secret": shared}, dict.fromkeys(["evil", "victim", "observer", "operator"],
                                                                      shared)
    keys = {who: secrets.token_hex(16) for who in ("evil", "victim", "observer", "operator", "reader")}
    dispatcher = {"runners": {"evil": keys["evil"], "victim": keys["victim"]},
                  **{f"{role}_secret": keys[role] for role in ("observer", "operator", "reader")}}
    return dispatcher, {"runner_secret": keys["victim"]}, keys


@pytest.mark.parametrize("setup", ["shared", "per-runner"])
def test_a_relay_registered_as_a_runner_cannot_get_a_run_accepted_by_another(cluster, tmp_path, setup):
    dispatcher_auth, victim_auth, keys = keys_for(setup, tmp_path)
    c = cluster(extra={"auth": dispatcher_auth}, heartbeat_interval=0.3)
    c.dispatcher()
    # the victim holds only its own credential (per-runner), in a configuration of its own
    victim_config = tmp_path / "victim.yaml"
    victim_config.write_text(yaml.safe_dump({"auth": victim_auth}))
    victim = c.runner("victim", "--config", str(victim_config))
    c.wait("the victim registered", lambda: c.runner_state("victim") == "idle")
    pwned = tmp_path / "PWNED"
    run = {"type": "run", "build": 999, "attempt": 1, "repo": str(tmp_path), "sha": SHA, "branch": "main",
           "steps": [f"touch {pwned}"], "timeout": 5.0, "env": {}}

    # 1. a pure byte relay: the dispatcher sees the victim's own hello and stops there, proving nothing
    with Relay(victim.addr, run) as relay:
        register(c.disp.addr, "evil", keys["evil"], relay.port)
        c.wait("the dispatcher to give up on evil", lambda: c.runner_state("evil") == "dead")
        assert relay.connections >= 1 and relay.injected == 0
    assert f"runner evil: {relay.addr} is runner:victim, not runner:evil" in c.disp.log()

    # 2. a relay that renames the hello: the dispatcher's proof reaches the victim, with a run behind it
    with Relay(victim.addr, run, rename="runner:evil") as relay:
        register(c.disp.addr, "evil", keys["evil"], relay.port)
        c.wait("the dispatcher to give up on evil again", lambda: c.runner_state("evil") == "dead")
        assert relay.injected >= 1
        assert relay.answers[0] == {"type": "error", "code": "auth_failed", "message": "authentication failed"}
        assert len(relay.answers) == 1              # and then the victim closed: the run got no answer
    victim_log = victim.log(100_000)
    assert "authentication failed for 127.0.0.1:" in victim_log
    assert "(claimed role dispatcher, meant for runner:evil)" in victim_log
    assert f"runner evil: {relay.addr} refused our credentials as 'dispatcher'" in c.disp.log()

    # 3. the attacker's own proof, made with the key it holds, does not open the victim either
    #    (with one shared secret it would: that setup trusts every runner; see SECURITY.md)
    if setup == "per-runner":
        with pytest.raises(net.PeerAuthFailed, match="authentication failed"):
            asyncio.run(net.call(victim.addr, run, protocol.DISPATCHER, keys["evil"], to="runner:victim",
                                 timeout=10))
        with pytest.raises(net.PeerAuthFailed):      # nor can evil's key register as the victim
            register(c.disp.addr, "victim", keys["evil"], relay.port)

    nothing_ran(victim, pwned)
    # the victim itself is unharmed: still registered, still pinged
    assert c.runner_state("victim") == "idle" and victim.alive()


@pytest.mark.parametrize("setup", ["shared", "per-runner"])
def test_a_relay_cannot_take_a_tools_connection_to_another_daemon(cluster, repo, tmp_path, setup):
    dispatcher_auth, _, keys = keys_for(setup, tmp_path)
    c = cluster(extra={"auth": dispatcher_auth})
    c.dispatcher()
    commit = {"type": "commit", "repo": str(repo.path), "branch": "main", "sha": repo.head(), "author": "Eve",
              "subject": "relayed", "time": 1.0}
    # a git hook's `tinyci notify`, pointed at the relay as at its observer: the relay sends its
    # proof on to the dispatcher and a commit behind it (an observer's proof may report commits there)
    with Relay(c.disp.addr, commit, rename="observer") as relay:
        done = tinyci("notify", "--observer", relay.addr, "--config", str(c.config), "--branch", "main")
        assert done.returncode == 0 and "refused our credentials" in done.stderr, done.stderr
        assert relay.injected == 1 and relay.answers[0]["code"] == "auth_failed"
    assert "(claimed role observer, meant for observer)" in c.disp.log()
    # an operator poking "the observer" through it, with a trigger behind
    with Relay(c.disp.addr, {"type": "trigger", "branch": "main"}, rename="observer") as relay:
        with pytest.raises(net.PeerAuthFailed):
            asyncio.run(net.call(relay.addr, {"type": "poke"}, protocol.OPERATOR, keys["operator"],
                                 to=protocol.OBSERVER_ID, timeout=10))
        assert relay.injected == 1
    # the same without renaming: the tool sees whom it reached and sends no proof at all
    with Relay(c.disp.addr, commit) as relay:
        done = tinyci("notify", "--observer", relay.addr, "--config", str(c.config))
        assert f"{relay.addr} is dispatcher, not observer" in done.stderr, done.stderr
        assert relay.injected == 0
    wait_until(lambda: "meant for observer" in c.disp.log(), 10, "the dispatcher's log line")
    assert c.builds() == []         # no commit, no trigger: nothing was queued
