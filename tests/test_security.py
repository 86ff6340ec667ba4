"""Who may connect and what they may do: per-role secrets, the loopback-only
default, TLS and mutual TLS, the repository allow-list, and secrets kept out of
logs, tool output and error messages."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from typing import Callable

import pytest
import trustme
import yaml

from ci import blocking, daemon, net, protocol, tls, up
from ci.config import ConfigError, load
from ci.settings import resolve

from ci.models import Status
from conftest import Repo, child_env, finished, tinyci
from daemons import Daemon
from test_dispatcher import Harness, codes, scenario


ROLES = ("runner", "observer", "operator", "reader")       # the dispatcher proves itself with runners' keys
SHA = "0123456789abcdef0123456789abcdef01234567"
COMMIT = {"type": "commit", "repo": "/allowed/repo", "branch": "main", "sha": SHA, "author": "A <a@x>",
          "subject": "s", "time": 1.5}


def role_secrets() -> dict[str, str]:
    return {role: f"{role}-{secrets.token_hex(12)}" for role in ROLES}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def forged(role: str, secret: str, id: str = "", to: str = "dispatcher", **fields) -> Callable[[dict], dict]:
    """An ``auth`` for a server's hello, its MAC made with ``secret``, then ``fields`` laid over it."""
    def make(hello: dict) -> dict:
        nc = net.nonce()
        mac = net.client_mac(secret, hello["nonce"], nc, role, id, to)
        return {"role": role, "id": id, "nonce": nc, "to": to, "mac": mac, **fields}
    return make


async def raw_auth(addr: str, auth: Callable[[dict], dict], tls_ctx=None) -> tuple[dict, bytes]:
    """Send one hand-made ``auth`` frame (``auth(hello)``); return the reply and whatever follows it before EOF."""
    host, port = net.parse_addr(addr)
    reader, writer = await asyncio.open_connection(host, port, ssl=tls_ctx,
                                                   server_hostname=host if tls_ctx else None)
    conn = net.Connection(reader, writer, net.Limits(read_timeout=5), addr)
    hello = await conn.recv()
    await conn.send({"type": "auth", **auth(hello)})
    reply = await conn.recv()
    rest = await asyncio.wait_for(reader.read(), 5)
    await conn.close()
    return reply, rest


async def ask(addr: str, role: str, secret: str, msg: dict, tls_ctx=None, timeout: float = 5, id: str = "",
              to: str = "dispatcher") -> dict:
    host, port = net.parse_addr(addr)
    client = net.Client(host, port, role, secret, net.Limits(connect_timeout=5, read_timeout=timeout), tls_ctx,
                        id=id, to=to)
    try:
        return await client.request(msg)
    finally:
        await client.close()


# ---------------------------------------------------------------- configuration

def test_role_secret_falls_back_to_the_shared_one_and_files_win(tmp_path):
    secret_file = tmp_path / "runner.secret"
    secret_file.write_text("from-file\n")
    config = load(None, env={"TINYCI_AUTH_SECRET": "shared", "TINYCI_AUTH_READER_SECRET": "r",
                             "TINYCI_AUTH_RUNNER_SECRET": "ignored",
                             "TINYCI_AUTH_RUNNER_SECRET_FILE": str(secret_file)})
    assert resolve(config).secrets == {"runner": "from-file", "observer": "shared",
                                       "operator": "shared", "reader": "r"}
    assert resolve(load(None, env={})).secrets == dict.fromkeys(ROLES, "")


def test_a_secret_never_appears_in_a_configuration_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("auth:\n  operator_secret: 918273645\n")       # YAML makes it an int
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert "auth.operator_secret" in str(err.value) and "918273645" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env={"TINYCI_AUTH_READER_SECRET_FILE": str(tmp_path / "absent")}))
    assert "auth.reader_secret_file" in str(err.value) and "absent" in str(err.value)


def test_is_loopback():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert daemon.is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "ci.example.com"):
        assert not daemon.is_loopback(host), host


def test_repo_field_can_never_be_taken_for_a_git_option():
    for repo in ("-uevil", "--upload-pack=touch x", "/a\nb", ""):
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.validate({**COMMIT, "repo": repo}, protocol.OBSERVER)
        assert err.value.code == "bad_field" and "commit.repo" in err.value.message
    assert protocol.validate({**COMMIT, "repo": "https://example.com/x.git"}, protocol.OBSERVER)


def test_up_keeps_its_secret_owner_only_and_reuses_it(tmp_path):
    path = tmp_path / "data" / "secret"
    first = up.local_secret(path)
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    assert up.local_secret(path) == first                   # same daemons, same secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600       # and no longer readable by others


# ---------------------------------------------------------------- handshake, in process

async def echo(conn, msg):
    # the table's reply to status (naming the role the server saw) and to poke
    if msg["type"] == "status":
        return protocol.ok(runners=[{"role": conn.role}], builds=[], pipelines=[], queue=[])
    return protocol.ok()


def test_each_role_proves_itself_with_its_own_secret():
    keys = {"reader": "r-secret", "operator": "o-secret"}

    async def body():
        server = await net.serve(echo, "127.0.0.1", 0, secrets=keys, secret="shared")
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        assert (await ask(addr, "reader", "r-secret", {"type": "status"}))["runners"][0]["role"] == "reader"
        assert await ask(addr, "observer", "shared", {"type": "poke"}) == {"type": "ok"}
        for role, secret in [("operator", "r-secret"), ("reader", "shared"), ("operator", "")]:
            with pytest.raises(net.PeerAuthFailed, match="authentication failed"):
                await ask(addr, role, secret, {"type": "status"})
        # a missing, malformed, non-ASCII or wrong MAC, or an unknown role: the same answer, then close
        for auth in [lambda hello: {"role": "reader"}, forged("reader", "r-secret", mac=7),
                     forged("reader", "r-secret", mac="é" * 64), forged("reader", "wrong"),
                     forged("root", "r-secret")]:
            reply, rest = await raw_auth(addr, auth)
            assert reply == {"type": "error", "code": "auth_failed", "message": "authentication failed"}, auth
            assert rest == b""
        server.close()
    run(body())


# ---------------------------------------------------------------- leases belong to identities, in process

class Silent:
    """A runner's address that does not answer as that runner: nothing listens (refused), or it never answers."""

    def __init__(self, runner, hang: bool = False):
        self.host, self.port, self.hang = runner.host, runner.port, hang

    async def request(self, msg: dict, timeout: float | None = None) -> dict:
        if self.hang:
            await asyncio.sleep(3600)
        raise net.PeerRefused(f"nothing listens on {self.host}:{self.port} (connection refused)")

    async def close(self) -> None:
        pass

    def drop(self, exc: Exception) -> None:
        pass

    def abandon(self, exc: Exception) -> None:
        pass


def test_log_result_and_artifact_come_only_from_the_runner_holding_the_build(tmp_path):
    # a build on r2 that read the shared runner secret connects as runner r2 and reports on r1's build
    @scenario
    async def body():
        h = Harness(tmp_path)
        await h.commit()
        await h.register("r1")
        await h.register("r2")
        assert h.build(1).runner == "r1" and h.build(1).status is Status.RUNNING
        forged = await h.result(1, runner="r2", log_size=0)
        assert forged == {"type": "error", "code": "not_yours", "message": "build 1 is not held by runner 'r2'"}
        assert codes(await h.log(1, 0, "=== passed ===\n", runner="r2")) == ("error", "not_yours")
        artifact = {"type": "artifact", "build": 1, "attempt": 1, "path": "a.txt", "offset": 0, "data": b"x",
                    "eof": True}
        assert codes(await h.call(artifact, protocol.RUNNER, id="r2")) == ("error", "not_yours")
        assert (h.build(1).status, h.text(1).count("passed")) == (Status.RUNNING, 0)      # unchanged
        # nor may a connection register under another name than the one it proved
        taken = await h.call({"type": "register", "name": "r1", "host": "127.0.0.1", "port": 9100, "labels": [],
                              "slots": 1}, protocol.RUNNER, id="r2")
        assert codes(taken) == ("error", "not_yours")
        # the holder's own frames still go through; an old attempt still hears "stale", to stop it
        assert await h.log(1, 0, "ran\n") == {"type": "ok", "offset": 4}
        assert await h.result(1, status="failed", log_size=4) == {"type": "ok"}
        assert h.build(1).status is Status.FAILED
        assert codes(await h.result(1, runner="r2")) == ("error", "stale")
        h.store.close()
    body()


def test_a_live_runners_name_cannot_be_taken_over_from_another_address(tmp_path):
    @scenario
    async def body():
        h = Harness(tmp_path)
        await h.commit()
        await h.register("r1")          # at 127.0.0.1:9000; answers pings
        register = {"type": "register", "name": "r1", "host": "127.0.0.1", "port": 9100, "labels": [], "slots": 1}
        taken = await h.call(register, protocol.RUNNER, id="r1")
        assert taken == {"type": "error", "code": "name_taken", "message": "runner name 'r1' is held by a live "
                         "runner at 127.0.0.1:9000; give this runner another name"}
        assert (h.build(1).runner, h.build(1).attempt, h.d.sched.runners["r1"].port) == ("r1", 1, 9000)
        # the same address re-registers as before (a restart in place)
        assert (await h.register("r1"))["type"] == "ok"
        h.store.close()
    body()


@pytest.mark.parametrize("hang", [False, True], ids=["refused", "silent"])
def test_a_runner_that_restarted_elsewhere_takes_its_name_back_at_once(tmp_path, hang):
    @scenario
    async def body():
        h = Harness(tmp_path, heartbeat_interval=0.2)
        await h.commit()
        await h.register("r1")
        dial = h.d.links.dial
        h.d.links.dial = lambda runner: Silent(runner, hang) if runner.port == 9000 else dial(runner)
        register = {"type": "register", "name": "r1", "host": "127.0.0.1", "port": 9100, "labels": [], "slots": 1}
        h.mono += 5                     # it restarted a while after it was given the build
        started = asyncio.get_running_loop().time()
        assert (await h.call(register, protocol.RUNNER, id="r1"))["type"] == "ok"
        assert asyncio.get_running_loop().time() - started < 2.0        # one ping, bounded by the interval
        await h.settle()
        # the newcomer is not running the old one's build: it was queued again and went to the new address
        assert (h.build(1).runner, h.build(1).attempt, h.d.sched.runners["r1"].port) == ("r1", 2, 9100)
        assert "runner r1 is not running it" in h.text(1)
        h.store.close()
    body()


# ---------------------------------------------------------------- TLS, in process

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA with a server and a client certificate, and a second, unrelated CA."""
    where = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {"ca": where / "ca.pem", "other_ca": where / "other.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other_ca"]))
    for name, issuer, names in [("server", ca, ["127.0.0.1", "localhost"]), ("client", ca, ["tinyci-tool"]),
                                ("rogue", other, ["127.0.0.1"])]:
        cert = issuer.issue_cert(*names)
        files[name] = where / f"{name}.pem"
        files[name + "_key"] = where / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(files[name]))
        cert.private_key_pem.write_to_path(str(files[name + "_key"]))
    return {k: str(v) for k, v in files.items()}


def test_tls_server_is_verified_and_mutual_tls_refuses_a_client_without_a_certificate(pki):
    plain_server = tls.server_context(cert=pki["server"], key=pki["server_key"])
    mutual_server = tls.server_context(cert=pki["server"], key=pki["server_key"], ca=pki["ca"])
    trusting = tls.client_context(ca=pki["ca"])
    with_cert = tls.client_context(cert=pki["client"], key=pki["client_key"], ca=pki["ca"])
    rogue_cert = tls.client_context(cert=pki["rogue"], key=pki["rogue_key"], ca=pki["ca"])
    distrusting = tls.client_context(ca=pki["other_ca"])

    async def body():
        plain = await net.serve(echo, "127.0.0.1", 0, ssl=plain_server)
        mutual = await net.serve(echo, "127.0.0.1", 0, ssl=mutual_server)
        p_addr = f"127.0.0.1:{plain.sockets[0].getsockname()[1]}"
        m_addr = f"127.0.0.1:{mutual.sockets[0].getsockname()[1]}"
        assert (await ask(p_addr, "reader", "", {"type": "status"}, trusting))["runners"][0]["role"] == "reader"
        with pytest.raises(net.PeerError):          # the server's certificate is not from our CA
            await ask(p_addr, "reader", "", {"type": "status"}, distrusting)
        # a tool's blocking link says it as the asyncio client does
        with pytest.raises(net.PeerError, match=r"^cannot connect to 127\.0\.0\.1:\d+: .*certificate verify failed"):
            await asyncio.to_thread(blocking.request_blocking, p_addr, {"type": "status"}, "reader", ssl=distrusting)
        with pytest.raises(net.PeerError):          # plain TCP to a TLS port gets nowhere
            await ask(p_addr, "reader", "", {"type": "status"}, timeout=0.5)
        assert (await ask(m_addr, "reader", "", {"type": "status"}, with_cert))["runners"][0]["role"] == "reader"
        for ctx in (trusting, rogue_cert):          # no client certificate, or one from another CA
            with pytest.raises(net.PeerError):
                await ask(m_addr, "reader", "", {"type": "status"}, ctx)
        plain.close()
        mutual.close()
    run(body())


def test_tls_errors_name_the_key(tmp_path, pki):
    with pytest.raises(tls.TLSError, match="tls.cert"):
        tls.server_context(cert=str(tmp_path / "absent.pem"))
    with pytest.raises(tls.TLSError, match="tls.key is set"):
        tls.server_context(key=pki["server_key"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(tls.TLSError, match="tls.ca"):
        tls.client_context(ca=str(tmp_path / "junk.pem"))


# ---------------------------------------------------------------- the real daemons

@pytest.mark.slow
def test_roles_are_separated_and_secrets_never_shown(cluster, repo, tmp_path):
    keys = role_secrets()
    c = cluster(steps=["env", "sh build.sh"], extra={"auth": {
        f"{role}_secret": keys[role] for role in ("runner", "observer", "operator", "reader")}})
    c.dispatcher()
    runner = c.runner("r1", "-v")
    c.observer(repo, "-v")
    builds = c.wait_builds(finished, "the first commit built with per-role secrets")
    assert [b["status"] for b in builds] == ["passed"]
    d_addr = c.disp.addr

    async def probes():
        # wrong or missing MAC: "authentication failed", nothing more, and the connection closes
        for auth in (forged("reader", "0" * 64), lambda hello: {"role": "reader"}):
            reply, rest = await raw_auth(d_addr, auth)
            assert reply == {"type": "error", "code": "auth_failed", "message": "authentication failed"}
            assert rest == b""
        # a reader reads but cannot trigger; its secret does not make it an operator
        assert (await ask(d_addr, "reader", keys["reader"], {"type": "status"}))["builds"]
        with pytest.raises(protocol.RemoteError) as err:
            await ask(d_addr, "reader", keys["reader"], {"type": "trigger", "branch": "main"})
        assert err.value.code == "forbidden"
        with pytest.raises(net.PeerAuthFailed):
            await ask(d_addr, "operator", keys["reader"], {"type": "trigger", "branch": "main"})
        # an observer secret cannot register a runner, neither claiming to be one nor as itself
        register = {"type": "register", "name": "evil", "host": "127.0.0.1", "port": 1, "labels": [],
                    "slots": 1}
        with pytest.raises(net.PeerAuthFailed):
            await ask(d_addr, "runner", keys["observer"], register)
        with pytest.raises(protocol.RemoteError) as err:
            await ask(d_addr, "observer", keys["observer"], register)
        assert err.value.code == "forbidden"
        # nobody is the dispatcher at the dispatcher
        with pytest.raises(net.PeerAuthFailed):
            await ask(d_addr, "dispatcher", keys["runner"], {"type": "status"})
        # only the dispatcher role, with the runner's key and meaning this runner, may talk to a runner
        run_msg = {"type": "run", "build": 99, "attempt": 1, "repo": str(repo.path), "sha": SHA,
                   "branch": "main", "steps": ["touch pwned"], "timeout": 5, "env": {}}
        for role in ("operator", "runner", "observer", "reader"):
            with pytest.raises(net.PeerAuthFailed):
                await ask(runner.addr, role, keys[role], run_msg, id="r1" if role == "runner" else "", to="runner:r1")
        with pytest.raises(net.PeerAuthFailed):
            await ask(runner.addr, "dispatcher", keys["operator"], run_msg, to="runner:r1")
        with pytest.raises(net.PeerNotProven, match="is runner:r1, not runner:r2"):     # not the one meant
            await ask(runner.addr, "dispatcher", keys["runner"], run_msg, to="runner:r2")
        pong = await ask(runner.addr, "dispatcher", keys["runner"], {"type": "ping"}, to="runner:r1")
        assert pong["type"] == "pong"
    run(probes())
    assert [b["id"] for b in c.builds()] == [builds[0]["id"]]         # nothing was queued by the probes

    # the tools: right secrets work, a wrong one is one line without any secret in it
    status = tinyci("status", "--config", str(c.config), "--dispatcher", d_addr)
    assert status.returncode == 0 and "r1" in status.stdout, status.stderr
    bad = tinyci("status", "--config", str(c.config), "--dispatcher", d_addr,
                 TINYCI_AUTH_READER_SECRET="not-the-secret")
    assert bad.returncode == 1 and "refused our credentials" in bad.stderr
    build_log = c.log(builds[0]["id"])
    assert "CI_BUILD=" in build_log            # the step printed its environment...
    for d in c.daemons:
        d.stop()
    shown = [status.stdout, status.stderr, bad.stdout, bad.stderr, build_log]
    shown += [p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")]
    shown += [p.read_text(errors="replace") for p in (tmp_path / "dispatcher" / "logs").glob("*.log")]
    assert "authentication failed" in "".join(shown)      # the probes were logged...
    for role, secret in keys.items():                       # ...and no secret was, anywhere
        assert not any(secret in text for text in shown), f"the {role} secret leaked"


# A build on runner r2 that read r2's own secret (builds run as the runner's user) and now
# tries to report on r1's build, as r2 and as r1. It prints what the dispatcher said.
ATTACK = """\
import asyncio, json, os
from ci import net, protocol      # the runner's PYTHONPATH reaches the step
target = json.load(open("target.json"))
key = open(target["secret_file"]).read().strip()
mine = int(os.environ["CI_BUILD"])
victim = [b for b in (1, 2) if b != mine][0]

def send(msg, id):
    try:
        asyncio.run(net.call(target["dispatcher"], msg, "runner", key, id=id, timeout=10))
        return "accepted"
    except protocol.RemoteError as exc:
        return exc.code
    except net.PeerAuthFailed:
        return "auth_failed"

result = {"type": "result", "build": victim, "attempt": 1, "status": "passed", "exit_code": 0, "steps": 1,
          "duration": 0.1}
print("forged result as r2:", send(result, "r2"))
print("forged log as r2:", send({"type": "log", "build": victim, "attempt": 1, "offset": 0,
                                 "data": "=== passed ===\\n"}, "r2"))
print("forged result as r1:", send(result, "r1"))
print("register as r1:", send({"type": "register", "name": "r1", "host": "127.0.0.1", "port": 9,
                               "labels": [], "slots": 1}, "r1"))
"""


@pytest.mark.slow
def test_a_build_holding_its_runners_secret_cannot_report_on_another_runners_build(cluster, repo, tmp_path):
    keys = {name: secrets.token_hex(16) for name in ("r1", "r2", "observer", "operator", "reader")}
    c = cluster(extra={"auth": {"runners": {"r1": keys["r1"], "r2": keys["r2"]},
                                **{f"{role}_secret": keys[role] for role in ("observer", "operator", "reader")}}})
    c.dispatcher()
    # each runner holds only its own credential, in a file, as SECURITY.md says to deploy them
    for name in ("r1", "r2"):
        (tmp_path / f"{name}.secret").write_text(keys[name] + "\n")
        (tmp_path / f"{name}.yaml").write_text(f"auth:\n  runner_secret_file: {tmp_path / f'{name}.secret'}\n")
    done = tmp_path / "victim-may-finish"
    ci_yaml = yaml.safe_dump({"jobs": {
        "victim": {"labels": ["one"], "steps": [f"while [ ! -f {done} ]; do sleep 0.1; done; echo failing; exit 1"]},
        "attacker": {"labels": ["two"], "steps": ["python attack.py"]}}})
    target = {"dispatcher": c.disp.addr, "secret_file": str(tmp_path / "r2.secret")}
    repo.commit("two jobs", {".ci.yaml": ci_yaml, "attack.py": ATTACK, "target.json": json.dumps(target)})
    c.runner("r1", "--labels", "one", "--config", str(tmp_path / "r1.yaml"))
    c.runner("r2", "--labels", "two", "--config", str(tmp_path / "r2.yaml"))
    c.observer(repo)
    by_job = lambda builds: {b["job"]: b for b in builds}        # noqa: E731
    builds = c.wait_builds(lambda b: by_job(b).get("attacker", {}).get("status") == "passed"
                           and by_job(b)["victim"]["status"] == "running", "the attacker's build to end")
    attack_log = c.log(by_job(builds)["attacker"]["id"])
    assert "forged result as r2: not_yours" in attack_log, attack_log
    assert "forged log as r2: not_yours" in attack_log
    assert "forged result as r1: auth_failed" in attack_log        # r2's secret does not make it r1
    assert "register as r1: auth_failed" in attack_log
    victim = by_job(builds)["victim"]
    assert victim["status"] == "running" and "=== passed" not in c.log(victim["id"])
    done.write_text("")
    builds = c.wait_builds(lambda b: by_job(b)["victim"]["status"] not in ("queued", "running"), "the victim's end")
    assert by_job(builds)["victim"]["status"] == "failed"         # its own result, not the forged one
    assert "refused result for build" in c.disp.log() and "the build is runner r1's" in c.disp.log()


@pytest.mark.slow
def test_a_live_runners_name_is_not_taken_over_and_a_restart_elsewhere_gets_it_back(cluster, repo, tmp_path):
    c = cluster(extra={"auth": {"secret": "one-for-all"}}, heartbeat_interval=0.5, heartbeat_misses=20)
    c.dispatcher()
    r1 = c.runner("r1")
    c.wait("r1 registered", lambda: c.runner_state("r1") == "idle")
    register = {"type": "register", "name": "r1", "host": "127.0.0.1", "port": 9, "labels": [], "slots": 1}
    with pytest.raises(protocol.RemoteError) as err:        # with the shared secret anyone may claim the name r1
        asyncio.run(net.call(c.disp.addr, register, "runner", "one-for-all", id="r1", timeout=10))
    assert err.value.code == "name_taken" and f"held by a live runner at {r1.addr}" in err.value.message
    assert [r["port"] for r in c.status()["runners"]] == [r1.port]
    # frozen (alive to the heartbeat for 20 missed intervals yet), and another r1 started elsewhere:
    # the old one misses the one ping its name's new claim sends, and the new one has the name at once
    os.kill(r1.pid, signal.SIGSTOP)
    try:
        again = c.runner("r1", "--workdir", str(tmp_path / "r1-again"))
        c.wait("r1 at its new address", lambda: [(r["port"], r["state"]) for r in c.status()["runners"]]
               == [(again.port, "idle")], timeout=5)
    finally:
        r1.kill()
    assert f"its old address {r1.addr} did not answer a ping" in c.disp.log()


@pytest.mark.slow
def test_without_secrets_daemons_refuse_non_loopback_addresses(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("initial")
    cases = {
        "dispatcher": ["--data", str(tmp_path / "d")],
        "runner": ["--workdir", str(tmp_path / "w")],
        "observer": ["--repo", str(repo.path), "--state", str(tmp_path / "o")],
    }
    for kind, args in cases.items():
        done = subprocess.run([sys.executable, "-m", f"ci.{kind}", "--host", "0.0.0.0", "--port", "0", *args],
                              capture_output=True, text=True, timeout=30, cwd=tmp_path, env=child_env())
        assert done.returncode == 2, (kind, done.stderr)
        assert "refusing to listen on 0.0.0.0" in done.stderr and "--insecure" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    # a secret for some roles only is not enough: the message names the open ones
    done = subprocess.run([sys.executable, "-m", "ci.dispatcher", "--host", "0.0.0.0", "--port", "0",
                           "--data", str(tmp_path / "d")], capture_output=True, text=True, timeout=30,
                          env=child_env(TINYCI_AUTH_READER_SECRET="r"))
    assert done.returncode == 2 and "role(s) observer, operator, runner have no secret" in done.stderr


def test_one_secret_set_and_the_others_open_stops_daemons_and_tools_naming_the_open_roles(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("initial")
    env = {"TINYCI_AUTH_READER_SECRET": "only-the-reader"}
    daemons = {     # on loopback, where no secret at all would be allowed
        "dispatcher": (["--data", str(tmp_path / "d")], "observer, operator, runner"),
        "runner": (["--workdir", str(tmp_path / "w")], "runner"),
        "observer": (["--repo", str(repo.path), "--state", str(tmp_path / "o")], "observer, operator"),
    }
    for kind, (args, open_roles) in daemons.items():
        done = subprocess.run([sys.executable, "-m", "ci", kind, "--port", "0", *args], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path, env=child_env(**env))
        assert done.returncode == 2 and done.stdout == "", (kind, done.stderr)
        assert done.stderr == (f"tinyci {kind}: configuration error: environment: auth.reader_secret is set, but "
                               f"role(s) {open_roles} have no secret: once any secret is set, every role must have "
                               f"one (auth.secret for all, or auth.<role>_secret for each)\n"), done.stderr
    trigger = tinyci("trigger", "main", cwd=tmp_path, **env)
    assert trigger.returncode == 2 and "role(s) operator have no secret" in trigger.stderr
    notify = tinyci("notify", cwd=tmp_path, **env)          # a hook never fails a commit, but says why
    assert notify.returncode == 0 and "role(s) observer have no secret" in notify.stderr
    # a tool that only reads needs only the reader's secret
    status = tinyci("status", "--dispatcher", "127.0.0.1:9", cwd=tmp_path, **env)
    assert status.returncode == 1 and "configuration error" not in status.stderr, status.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["secret", "insecure"])
def test_non_loopback_with_a_secret_or_insecure(tmp_path, how):
    # in a network namespace of its own: 0.0.0.0 there reaches nobody
    assert shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0, \
        "this test needs `unshare -rn` (util-linux, and user namespaces allowed) to listen on 0.0.0.0 safely"
    extra = ["--insecure"] if how == "insecure" else []
    env = child_env(TINYCI_AUTH_SECRET="s3cret-value") if how == "secret" else child_env()
    dispatcher = Daemon("dispatcher", ["--host", "0.0.0.0", "--port", "0", "--data", str(tmp_path / "d"), *extra],
                        tmp_path, tmp_path / "dispatcher.log", env, prefix=("unshare", "-rn"))
    assert dispatcher.host == "0.0.0.0"
    dispatcher.stop()
    err = dispatcher.log()
    if how == "insecure":
        assert "--insecure: listening on 0.0.0.0 with no secret" in err
        assert "anyone who can reach this port can" in err
    else:
        assert "--insecure" not in err and "s3cret-value" not in err


@pytest.mark.slow
def test_mutual_tls_cluster_builds_and_tools_need_a_certificate(cluster, repo, pki):
    c = cluster(extra={"tls": {"cert": pki["server"], "key": pki["server_key"], "ca": pki["ca"]},
                       "auth": {"secret": "tls-and-secret"}})
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    builds = c.wait_builds(finished, "a build over mutual TLS")
    assert [b["status"] for b in builds] == ["passed"]
    status = tinyci("status", "--json", "--config", str(c.config), "--dispatcher", c.disp.addr)
    assert status.returncode == 0, status.stderr
    no_cert = tls.client_context(ca=pki["ca"])
    with pytest.raises(net.PeerError):
        run(ask(c.disp.addr, "reader", "tls-and-secret", {"type": "status"}, no_cert))
    with pytest.raises(net.PeerError):             # nor plain TCP
        run(ask(c.disp.addr, "reader", "tls-and-secret", {"type": "status"}, timeout=0.5))


def test_commit_for_a_repository_not_in_the_allow_list_is_refused(cluster):
    c = cluster(repos=["/allowed/repo"])
    c.dispatcher()
    with pytest.raises(protocol.RemoteError) as err:
        c.request({**COMMIT, "repo": "/elsewhere/repo"}, role="observer")
    assert err.value.code == "forbidden_repo" and "/elsewhere/repo" in err.value.message
    assert c.builds() == []
    reply = c.request(dict(COMMIT), role="observer")
    assert reply["duplicate"] is False and [b["id"] for b in c.builds()] == [reply["build"]]


def test_tools_use_the_secret_up_left_in_the_current_directory(cluster, tmp_path):
    c = cluster()
    c.env["TINYCI_AUTH_SECRET"] = "made-by-up"
    c.dispatcher()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = tinyci("status", "--json", "--dispatcher", c.disp.addr, cwd=elsewhere)
    assert refused.returncode == 1 and "refused our credentials" in refused.stderr
    (tmp_path / ".tinyci").mkdir(exist_ok=True)
    (tmp_path / ".tinyci" / "secret").write_text("made-by-up\n")
    assert tinyci("status", "--json", "--dispatcher", c.disp.addr, cwd=tmp_path).returncode == 0
