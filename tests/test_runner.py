"""The runner daemon, end to end: a real runner process driven over real
sockets by a test acting as the dispatcher, with a fake dispatcher (made with
net.serve) receiving its registrations, logs and results, and real git
repositories in tmp_path. What one piece does alone is tested beside it:
test_execution, test_checkout, test_procgroup, test_outbox, test_registration."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ci import daemon, net, protocol, settings
from ci.config import load
from ci.runner import Runner
from ci.workdir import host_stem

from conftest import Repo, free_port, pid_alive
from daemons import Daemon, child_env
from runner_support import SECRET, FakeDispatcher, read_pid, wait_until



# ---------------------------------------------------------------- helpers

@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, str]:
    repo = Repo(tmp_path / "repo")
    return repo.path, repo.commit("first", {"README": "a project without tests\n"})


def run_msg(build: int, repo: Path, sha: str, steps: list[str], timeout: float = 30,
            attempt: int = 1) -> dict:
    return {"type": "run", "build": build, "attempt": attempt, "repo": str(repo), "sha": sha,
            "branch": "main", "steps": steps, "timeout": timeout, "env": {"EXTRA": "from-run"}}


@dataclass
class RunnerProcess:
    daemon: Daemon
    name: str
    workdir: Path

    @property
    def proc(self) -> subprocess.Popen:
        return self.daemon.proc

    @property
    def port(self) -> int:
        return self.daemon.port

    def client(self, role: str = protocol.DISPATCHER, secret: str = SECRET) -> net.Client:
        return net.Client("127.0.0.1", self.port, role, secret, id=self.name if role == protocol.RUNNER else "",
                          to=protocol.runner_identity(self.name))

    def stderr(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")


class Runners:
    """Starts runner processes (tests/daemons.py's Daemon) and kills every one of them, by PID, at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.daemons: list[Daemon] = []
        config = tmp_path / "tinyci.yaml"
        config.write_text(f"auth:\n  secret: {SECRET}\nrunner:\n  kill_grace: 0.3\n")
        self.config = config

    async def start(self, dispatcher_port: int, *args: str, workdir: Path | None = None,
                    tag: str = "r", default_workdir: bool = False) -> RunnerProcess:
        """``default_workdir``: let the runner pick its own (relative to its cwd, tmp_path)."""
        workdir = workdir or self.tmp / f"work-{tag}"
        if not default_workdir:
            args = ("--workdir", str(workdir), *args)
        flags = ["--config", str(self.config), "--port", "0", "--dispatcher", f"127.0.0.1:{dispatcher_port}", *args]
        log = self.tmp / f"runner-{tag}-{len(self.daemons)}.err"
        # in a thread: the fake dispatcher answering its registration runs on this loop
        runner = await asyncio.to_thread(Daemon, "runner", flags, self.tmp, log, child_env())
        self.daemons.append(runner)
        name = runner.ready_line.partition(" as ")[2]
        if default_workdir:
            workdir = self.tmp / ".tinyci" / "runners" / name
        return RunnerProcess(runner, name, workdir)

    def close(self) -> None:
        for runner in self.daemons:
            runner.kill()
        for err in sorted(self.tmp.glob("runner-*.err")):
            print(f"---- {err.name}\n{err.read_text(errors='replace')}")   # shown when a test fails
        # builds write the pids of what they start to tmp_path/*.pid: none may outlive a failed test
        for pid_file in self.tmp.glob("*.pid"):
            pid = read_pid(pid_file)
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runners(tmp_path: Path):
    started = Runners(tmp_path)
    try:
        yield started
    finally:
        started.close()


# ---------------------------------------------------------------- tests

def test_passing_build_streams_its_log_and_leaves_no_process(project, runners, tmp_path):
    path, sha = project
    bg_pid = tmp_path / "bg.pid"

    async def scenario():
        fake = await FakeDispatcher().start()
        runner = await runners.start(fake.port, "--name", "r1")
        client = runner.client()
        try:
            reply = await client.request(run_msg(7, path, sha, [
                "echo hello-from-step",
                "echo build=$CI_BUILD commit=$CI_COMMIT branch=$CI_BRANCH ci=$CI extra=$EXTRA",
                "python -c \"print('héllo', 'wörld')\"",
                f"sleep 1000 & echo $! > {bg_pid}",     # exits at once, leaving a child behind
                "python -c \"print('é€😀' * 60000)\"",  # several log frames, cut between characters
            ]))
            assert reply["type"] == "ok"
            result = await fake.result(7)
            text = fake.log_text(7)
            assert result["status"] == "passed", text
            assert (result["exit_code"], result["steps"], result["attempt"]) == (0, 5, 1)
            assert "\n" + "é€😀" * 60000 + "\n" in text
            assert "$ echo hello-from-step\nhello-from-step\n[exit 0 after " in text
            assert f"build=7 commit={sha} branch=main ci=true extra=from-run" in text
            assert "héllo wörld" in text
            assert result["log_size"] == len(text.encode())
            pid = read_pid(bg_pid)
            assert pid and not pid_alive(pid), "a step's background process outlived the build"
            # accepted: the lease, the outbox entry and the local log are gone
            assert (await client.request({"type": "ping"}))["running"] == []
            await wait_until(lambda: not list((runner.workdir / "outbox").iterdir())
                             and not list((runner.workdir / "logs").iterdir()), "the outbox to empty")
            first = fake.registers[0]
            assert (first["name"], first["port"], first["slots"]) == ("r1", runner.port, 1)
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_builds_one_after_another_deliver_on_one_kept_connection(project, runners):
    path, sha = project

    async def scenario():
        fake = await FakeDispatcher().start()
        runner = await runners.start(fake.port, "--name", "r1")
        client = runner.client()
        try:
            for build in (1, 2, 3):
                await client.request(run_msg(build, path, sha, [f"echo build {build}"]))
                assert (await fake.result(build))["status"] == "passed"
            # not a connection (and a handshake in both processes) per build
            assert len(set(fake.result_peers)) == 1, fake.result_peers
            # the dispatcher restarted meanwhile: the kept connection is dead, a new one is made, quietly
            fake.drop_connections()
            await client.request(run_msg(4, path, sha, ["echo build 4"]))
            assert (await fake.result(4))["status"] == "passed"
            assert fake.result_peers[-1] not in fake.result_peers[:3]
            assert "cannot deliver" not in runner.stderr()
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_the_default_workdir_is_under_the_runners_own_directory(project, runners):
    path, sha = project

    async def scenario():
        fake = await FakeDispatcher().start()
        runner = await runners.start(fake.port, default_workdir=True)
        client = runner.client()
        try:
            await client.request(run_msg(3, path, sha, ["true"]))
            assert (await fake.result(3))["status"] == "passed", fake.log_text(3)
            assert (runner.workdir / "checkouts" / "0" / "README").exists()   # the default workdir
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_one_workdir_one_runner_and_names_checked(tmp_path):
    def make(**runner) -> Runner:
        config = load(None, env={}, overrides={"runner": {"port": 0, "workdir": str(tmp_path / "work"),
                                                          **runner}})
        return Runner(settings.resolve(config), asyncio.Event())

    async def scenario():
        first, second = make(name="one"), make(name="two")
        server = await first.start()
        try:
            with pytest.raises(daemon.StartupError, match=f"runner workdir {tmp_path / 'work'} is in use by "
                               r"another runner \(give each runner its own --workdir or --name\)"):
                await second.start()
        finally:
            server.close()
            await first.shutdown()
        server = await second.start()       # free again once the first let go
        server.close()
        await second.shutdown()

    asyncio.run(scenario())
    with pytest.raises(daemon.StartupError, match="runner.name 'no spaces' must be a name of 1-100"):
        make(name="no spaces")
    with pytest.raises(daemon.StartupError, match="runner.labels: 'a/b' must be a name of 1-100"):
        make(labels=["linux", "a/b"])
    with pytest.raises(daemon.StartupError, match="runner.dispatcher: "):
        make(dispatcher="nowhere")


def test_cancel_kills_a_running_build_and_busy_when_full(project, runners, tmp_path):
    path, sha = project
    pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]

    async def scenario():
        fake = await FakeDispatcher().start()
        runner = await runners.start(fake.port, "--slots", "2")
        client = runner.client()
        try:
            for build, pid_file in zip((20, 21), pid_files):
                step = f"sleep 1000 & echo $! > {pid_file}; wait"
                assert (await client.request(run_msg(build, path, sha, [step])))["type"] == "ok"
            await wait_until(lambda: all(read_pid(p) for p in pid_files), "both builds to start")
            with pytest.raises(protocol.RemoteError) as full:
                await client.request(run_msg(22, path, sha, ["true"]))
            assert full.value.code == "busy"
            with pytest.raises(protocol.RemoteError) as again:
                await client.request(run_msg(20, path, sha, ["true"], attempt=2))
            assert again.value.code == "busy"
            # a resent `run` for a lease it holds is acknowledged, not run twice
            assert (await client.request(run_msg(20, path, sha, ["true"])))["type"] == "ok"
            assert (await client.request({"type": "ping"}))["running"] == [[20, 1], [21, 1]]

            assert (await client.request({"type": "cancel", "build": 20}))["type"] == "ok"
            result = await fake.result(20)
            assert (result["status"], result["exit_code"]) == ("cancelled", -1), fake.log_text(20)
            assert not pid_alive(read_pid(pid_files[0]))
            assert pid_alive(read_pid(pid_files[1])), "cancel reached the wrong build"
            # the freed slot takes work again; cancelling an unknown build is fine
            await client.request(run_msg(22, path, sha, ["echo third"]))
            assert (await fake.result(22))["status"] == "passed"
            assert (await client.request({"type": "cancel", "build": 999}))["type"] == "ok"
            await client.request({"type": "cancel", "build": 21})
            assert (await fake.result(21))["status"] == "cancelled"
            assert not pid_alive(read_pid(pid_files[1]))
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_result_waits_in_the_outbox_across_a_crash(project, runners, tmp_path):
    path, sha = project
    workdir = tmp_path / "work-outbox"

    async def scenario():
        fake = await FakeDispatcher().start()
        fake.refuse_results = True
        first = await runners.start(fake.port, "--name", "crashy", workdir=workdir, tag="one")
        client = first.client()
        try:
            await client.request(run_msg(11, path, sha, ["echo outbox-step-output"]))
            entry = workdir / "outbox" / "11-1.json"
            await wait_until(lambda: entry.exists() and fake.result_tries, "a refused result")
            assert json.loads(entry.read_text())["status"] == "passed"
        finally:
            await client.close()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        fake.close()

        # restart with the dispatcher away (it hangs up at once): one line about it, however many retries
        port = free_port()
        tries = []

        def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tries.append(1)
            writer.close()

        away = await asyncio.start_server(hang_up, "127.0.0.1", port)
        second = await runners.start(port, "--name", "crashy", workdir=workdir, tag="two")
        await wait_until(lambda: "cannot register" in second.stderr(), "the outage to be logged")
        await wait_until(lambda: len(tries) >= 3, "the runner to try again")
        assert second.stderr().count("cannot register") == 1, second.stderr()
        assert f"127.0.0.1:{port}" in second.stderr()
        away.close()
        await away.wait_closed()

        # a fresh dispatcher that lost the log: the runner resends it, then the result
        fresh = FakeDispatcher()
        fresh.refuse_results = True         # from the first frame on, as in the first half
        await fresh.start(port)
        try:
            # an undelivered result is still a lease: the dispatcher must not take the build back
            await wait_until(lambda: fresh.registers, "the runner to register")
            assert fresh.registers[0]["running"] == [[11, 1]]
            fresh.refuse_results = False
            result = await fresh.result(11)
            assert result["status"] == "passed"
            assert "outbox-step-output" in fresh.log_text(11)
            entry, kept_log = workdir / "outbox" / "11-1.json", workdir / "logs" / "11-1.log"
            # the runner unlinks the entry, then the log, in a worker thread: wait for both
            await wait_until(lambda: not entry.exists() and not kept_log.exists(),
                             "the delivered result and its log to leave the outbox")
            assert not entry.exists() and not kept_log.exists()
        finally:
            fresh.close()

    asyncio.run(scenario())


def test_stale_log_reply_drops_the_build(project, runners, tmp_path):
    path, sha = project
    bg_pid = tmp_path / "bg.pid"

    async def scenario():
        fake = await FakeDispatcher().start()
        fake.stale_at[12] = "started"
        runner = await runners.start(fake.port)
        client = runner.client()
        try:
            step = f"sleep 1000 & echo $! > {bg_pid}; echo started; wait"
            await client.request(run_msg(12, path, sha, [step]))
            await wait_until(lambda: "is stale" in runner.stderr(), "the runner to drop the build")
            assert "build 12 attempt 1 is stale" in runner.stderr()
            pid = read_pid(bg_pid)
            await wait_until(lambda: not pid_alive(pid), "the dropped build's processes to die")
            assert (await client.request({"type": "ping"}))["running"] == []
            await wait_until(lambda: not (runner.workdir / "logs" / "12-1.log").exists(),
                             "the local log to be deleted")
            assert 12 not in fake.results and not fake.result_tries
            assert not list((runner.workdir / "outbox").glob("12-*"))
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_sigterm_stops_the_runner_and_its_builds(project, runners, tmp_path):
    path, sha = project
    bg_pid = tmp_path / "bg.pid"

    async def scenario():
        fake = await FakeDispatcher().start()
        runner = await runners.start(fake.port)
        client = runner.client()
        try:
            await client.request(run_msg(40, path, sha, [f"sleep 1000 & echo $! > {bg_pid}; wait"]))
            await wait_until(lambda: read_pid(bg_pid), "the build to start")
        finally:
            await client.close()
        pid = read_pid(bg_pid)
        os.kill(runner.proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(runner.proc.wait, 10) == 0, runner.stderr()
        assert not pid_alive(pid), "a build's process outlived the runner"
        # a build killed by the shutdown is lost, not reported: the dispatcher requeues it
        assert 40 not in fake.results and not list((runner.workdir / "outbox").iterdir())
        fake.close()

    asyncio.run(scenario())


def test_a_restarted_runner_ends_the_step_its_killed_predecessor_left_running(project, runners, tmp_path):
    path, sha = project
    bg_pid = tmp_path / "orphan.pid"
    workdir = tmp_path / "work-orphan"

    async def scenario():
        fake = await FakeDispatcher().start()
        first = await runners.start(fake.port, "--name", "orphaned", workdir=workdir, tag="one")
        client = first.client()
        try:
            await client.request(run_msg(41, path, sha, [f"sleep 1000 & echo $! > {bg_pid}; wait"]))
            await wait_until(lambda: read_pid(bg_pid), "the step to start")
        finally:
            await client.close()
        first.proc.send_signal(signal.SIGKILL)      # nothing of the runner runs any more
        first.proc.wait(10)
        orphan = read_pid(bg_pid)
        assert pid_alive(orphan)                    # its step outlived it, in its own group
        second = await runners.start(fake.port, "--name", "orphaned", workdir=workdir, tag="two")
        await wait_until(lambda: not pid_alive(orphan), "the orphaned step to be killed")
        assert "left running when this runner last stopped" in second.stderr()
        fake.close()

    asyncio.run(scenario())


def test_registration_and_authentication(project, runners):
    path, sha = project

    async def scenario():
        fake = await FakeDispatcher(heartbeat=0.1).start()
        runner = await runners.start(fake.port, "--labels", "linux, py3", "--slots", "2")
        try:
            assert runner.name == f"{host_stem()}-1"         # no --name: the host name and a number
            await wait_until(lambda: fake.registers, "the first registration")
            first = fake.registers[0]
            assert (first["name"], first["host"], first["port"]) == (runner.name, "127.0.0.1", runner.port)
            assert (first["labels"], first["slots"], first["running"]) == (["linux", "py3"], 2, [])
            # nobody pings it: it takes itself for forgotten and registers again
            await wait_until(lambda: len(fake.registers) >= 2, "a second registration")

            for role, secret in ((protocol.OPERATOR, SECRET), (protocol.RUNNER, SECRET), (protocol.DISPATCHER, "wrong")):
                intruder = runner.client(role, secret)
                try:
                    with pytest.raises(net.PeerError, match="authentication failed"):
                        await intruder.request(run_msg(30, path, sha, ["true"]))
                finally:
                    await intruder.close()
            client = runner.client()
            try:
                assert (await client.request({"type": "ping"}))["running"] == []
            finally:
                await client.close()
        finally:
            fake.close()

    asyncio.run(scenario())
