"""The dispatcher's handlers fed messages directly: no sockets, no daemons.

Each test builds a Dispatcher over a Store in tmp_path, with clocks it
moves by hand (the wall clock ``now``, the monotonic ``mono``) and runners
that answer in memory, then calls
``dispatcher.handle(conn, msg)`` and asserts the reply and what was stored.
Every message is first checked against the protocol table, as the server
would."""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3

import pytest

from ci import config, net, protocol, settings
from ci.dispatcher import Dispatcher
from ci.models import Status
from ci.store import Store
from conftest import Repo

SHA = "a" * 40
SHA2 = "b" * 40


def scenario(test):
    """Run an async test in a loop of its own, bounded in time."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))
    return run


class Conn:
    """What a handler sees of a connection: the peer's role, id (a runner's name) and
    address, its limits, and what a stream sends."""

    def __init__(self, role: str, peer: str = "127.0.0.1:40000", id: str = ""):
        self.role, self.peer, self.id, self.sent = role, peer, id, []
        self.limits = net.Limits()

    async def send(self, msg: dict) -> None:
        self.sent.append(msg)

    def give_back(self, data, last: bool = False) -> None:
        self.given_back = getattr(self, "given_back", 0) + 1      # a lent chunk's write is over

    async def send_file(self, msg: dict, file, offset: int, count: int, timeout: float | None = None) -> None:
        self.sent.append({**msg, "data": os.pread(file.fileno(), count, offset)})


class MemoryRunner:
    """A runner's end of the dispatcher's link (``keptlink.KeptLink``), in memory:
    keeps what it is sent; `run` and `cancel` get ok, `ping` a pong with what
    it runs. ``down``: the exception every request raises instead (a runner
    gone); a timeout moves the harness's monotonic clock by the request's
    timeout, as waiting for it would. ``frozen``: no request is ever
    answered; ``held``: the answers to posted requests wait there until the
    test releases them (``release``)."""

    def __init__(self, host: str, port: int, elapse=lambda seconds: None):
        self.host, self.port, self.got, self.running = host, port, [], set()
        self.down: Exception | None = None
        self.frozen = False
        self.held: list | None = None   # a list: posted requests wait in it, unanswered
        self.before: list = []          # callables run before the next requests, one each
        self.elapse = elapse
        self.exchanges: list[asyncio.Task] = []
        self.connected = True
        self.dropped: list[str] = []

    async def request(self, msg: dict, timeout: float | None = None) -> dict:
        if self.before:
            self.before.pop(0)()
        if self.frozen:
            await asyncio.Event().wait()
        if isinstance(self.down, net.PeerTimeout):
            self.elapse(timeout or 10.0)
        if self.down is not None:
            raise self.down
        self.got.append(msg)
        if msg["type"] == "run":
            self.running.add((msg["build"], msg["attempt"]))
        if msg["type"] == "ping":
            return {"type": "pong", "running": [list(lease) for lease in sorted(self.running)]}
        return {"type": "ok"}

    async def connect(self) -> None:
        pass

    def post(self, msg: dict, on_reply) -> None:
        """As ``keptlink.KeptLink.post``: the answer (or the failure) comes by callback."""
        if self.frozen:
            return
        if self.held is not None:
            self.held.append((msg, on_reply))
            return

        async def exchange() -> None:
            try:
                reply = await self.request(msg)
            except Exception as exc:
                on_reply(None, exc)
            else:
                on_reply(reply, None)
        self.exchanges.append(asyncio.ensure_future(exchange()))

    async def release(self) -> None:
        """Answer the held requests now."""
        held, self.held = self.held or [], None
        for msg, on_reply in held:
            self.post(msg, on_reply)
        await asyncio.gather(*self.exchanges)

    def drop(self, exc: Exception) -> None:
        self.dropped.append(str(exc))

    def abandon(self, exc: Exception) -> None:
        self.drop(exc)

    async def close(self) -> None:
        pass

    def sent(self, kind: str) -> list[dict]:
        return [m for m in self.got if m["type"] == kind]


class Harness:
    def __init__(self, tmp_path, **dispatcher):
        cfg = config.load(None, env={}, overrides={"dispatcher": {"data_dir": str(tmp_path / "data"),
                                                                  **dispatcher}})
        self.store = Store(tmp_path / "data")
        self.now = 1000.0           # the wall clock: what people read
        self.mono = 50.0            # the monotonic clock: every rule and deadline
        self.runners: dict[str, MemoryRunner] = {}
        self.d = Dispatcher(settings.resolve(cfg), self.store, clock=lambda: self.now, dial=self._dial,
                            monotonic=lambda: self.mono)
        self.d.recover()

    def _dial(self, runner) -> MemoryRunner:
        return self.runners.setdefault(runner.name, self.runner(runner.name))

    def runner(self, name: str) -> MemoryRunner:
        """The in-memory runner the dispatcher reaches as ``name`` (made now if it has not dialled it yet)."""
        if name not in self.runners:
            self.runners[name] = MemoryRunner("127.0.0.1", 9000, elapse=self._elapse)
        return self.runners[name]

    def _elapse(self, seconds: float) -> None:
        self.mono += seconds

    async def call(self, msg: dict, role: str = protocol.OPERATOR, id: str = "") -> dict:
        protocol.validate(msg, role)
        reply = await self.d.handle(Conn(role, id=id), msg)
        return protocol.check_reply(msg["type"], reply)     # the reply the table allows, as net.serve checks

    async def stream(self, msg: dict, role: str = protocol.READER, id: str = "") -> list[dict]:
        conn = Conn(role, id=id)
        protocol.validate(msg, role)
        reply = await self.d.handle(conn, msg)
        assert reply is None or (reply["type"] == "error" and not conn.sent)    # a refusal is the one frame
        frames = conn.sent if reply is None else [reply]
        answers = protocol.Answers(msg["type"])
        for frame in frames:
            answers.check(frame)
        return frames

    async def settle(self) -> None:
        """Wait until the hand-outs and sends the last call started are done."""
        for _ in range(50):
            pending = [task for task in self.d.tasks if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending, timeout=10)
        raise AssertionError("the dispatcher's tasks never settled")

    async def commit(self, sha: str = SHA, repo: str = "/repo", branch: str = "main", **extra) -> dict:
        msg = {"type": "commit", "repo": repo, "branch": branch, "sha": sha, "author": "Ada",
               "subject": extra.pop("subject", "a change"), "time": 1.0, **extra}
        return await self.call(msg, protocol.OBSERVER)

    async def register(self, name: str = "r1", labels: tuple = (), slots: int = 1) -> dict:
        reply = await self.call({"type": "register", "name": name, "host": "127.0.0.1", "port": 9000,
                                 "labels": list(labels), "slots": slots}, protocol.RUNNER, id=name)
        await self.settle()
        return reply

    async def log(self, build: int, offset: int, data: str, attempt: int = 1, runner: str = "r1") -> dict:
        return await self.call({"type": "log", "build": build, "attempt": attempt, "offset": offset,
                                "data": data}, protocol.RUNNER, id=runner)

    async def result(self, build: int, attempt: int = 1, status: str = "passed", runner: str = "r1",
                     **extra) -> dict:
        return await self.call({"type": "result", "build": build, "attempt": attempt, "status": status,
                                "exit_code": 0 if status == "passed" else 1, "steps": 1, "duration": 0.5,
                                **extra}, protocol.RUNNER, id=runner)

    def build(self, build_id: int):
        return self.store.get(build_id)

    def text(self, build_id: int) -> str:
        return self.d.logs.path(build_id).read_text() if self.d.logs.path(build_id).exists() else ""

    async def status(self) -> dict:
        return await self.call({"type": "status"}, protocol.READER)

    async def tick(self) -> None:
        """One tick of the heartbeat at the monotonic clock's time, and the answers it gets."""
        self.d.links.beat.tick(self.mono)
        for _ in range(3):      # a failed ping is sent again at once, on a task of the dispatcher's
            await asyncio.gather(*(task for runner in self.runners.values() for task in runner.exchanges))
            await self.settle()

    async def ping(self, name: str = "r1", ticks: int = 20) -> None:
        """Heartbeat ticks one interval apart on the monotonic clock, as the
        heartbeat loop makes them, until runner ``name`` has no ping out: it
        answered, or it is lost."""
        for _ in range(ticks):
            await self.tick()
            if name not in self.d.links.beat.out:
                return
            self.mono += self.d.config.dispatcher.heartbeat_interval
        raise AssertionError(f"runner {name} still has a ping out after {ticks} ticks")

    def state(self, name: str = "r1") -> str:
        return self.d.sched.runners[name].state.value


@pytest.fixture
def make(tmp_path):
    made: list[Harness] = []

    def build(**dispatcher) -> Harness:
        h = Harness(tmp_path, **dispatcher)
        made.append(h)
        return h

    yield build
    for h in made:
        h.store.close()


def codes(reply: dict) -> tuple:
    return reply["type"], reply.get("code")


# ---------------------------------------------------------------- commits

@scenario
async def test_a_commit_becomes_one_queued_build_per_job(make):
    h = make()
    reply = await h.commit(jobs=[{"name": "lint", "labels": []}, {"name": "gpu", "labels": ["cuda"]}])
    assert reply == {"type": "ok", "build": 1, "builds": [1, 2], "duplicate": False}
    builds = [h.build(1), h.build(2)]
    assert [(b.job, b.labels, b.status, b.reason) for b in builds] == [
        ("lint", (), Status.QUEUED, "commit"), ("gpu", ("cuda",), Status.QUEUED, "commit")]
    assert (await h.status())["queue"] == [1, 2]


@scenario
async def test_a_commit_reported_again_is_a_duplicate(make):
    h = make()
    first = await h.commit()
    again = await h.commit()
    assert again == {**first, "duplicate": True}
    assert [b.id for b in h.store.recent(10)] == [1]


@scenario
async def test_a_skip_marker_records_one_skipped_build_never_queued(make):
    h = make()
    reply = await h.commit(subject="docs", message="docs\n\nnothing to test [CI Skip]",
                           jobs=[{"name": "a", "labels": []}, {"name": "b", "labels": []}])
    assert reply["builds"] == [1]
    assert h.build(1).status is Status.SKIPPED and h.build(1).finished_at == h.now
    assert "skipped: the commit message says [ci skip]" in h.text(1)
    assert (await h.status())["queue"] == []


@scenario
async def test_a_broken_ci_yaml_is_one_error_build_whose_log_says_why(make):
    h = make()
    await h.register()
    reply = await h.commit(config_error=".ci.yaml line 3: steps[2].run must be a non-empty string")
    await h.settle()
    build = h.build(reply["build"])
    assert (build.status, build.runner) == (Status.ERROR, None)
    assert "=== build error: .ci.yaml line 3: steps[2].run must be a non-empty string ===" in h.text(build.id)
    assert "r1" not in h.runners             # nothing was ever sent to it


@scenario
async def test_a_repository_not_in_dispatcher_repos_is_refused(make):
    h = make(repos=["/allowed"])
    reply = await h.commit(repo="/elsewhere")
    assert codes(reply) == ("error", "forbidden_repo") and "/elsewhere" in reply["message"]
    assert h.store.recent(10) == []
    assert (await h.commit(repo="/allowed"))["builds"] == [1]


@scenario
async def test_supersede_cancels_the_queued_builds_of_that_branch_only(make):
    h = make(supersede=["feat*"])
    await h.commit(sha="1" * 40, branch="feat")
    await h.commit(sha="2" * 40, branch="main")
    await h.commit(sha="3" * 40, branch="feat")
    assert [h.build(n).status for n in (1, 2, 3)] == [Status.CANCELLED, Status.QUEUED, Status.QUEUED]
    assert "superseded by build 3, a newer commit (333333333333) of feat" in h.text(1)


# ---------------------------------------------------------------- runners, logs, results

@scenario
async def test_register_hands_out_the_queued_build_and_records_the_runner(make):
    h = make(heartbeat_interval=2.0)
    await h.commit()
    reply = await h.register("r1")
    assert reply == {"type": "ok", "heartbeat_interval": 2.0}
    assert [(r.name, r.port) for r in h.store.runners()] == [("r1", 9000)]
    run = h.runners["r1"].sent("run")
    assert [(m["build"], m["attempt"], m["sha"], m["repo"]) for m in run] == [(1, 1, SHA, "/repo")]
    build = h.build(1)
    assert (build.status, build.runner, build.attempt) == (Status.RUNNING, "r1", 1)
    assert h.text(1).startswith("=== attempt 1 on r1 (127.0.0.1:9000)")
    assert build.log_base == len(h.text(1).encode())


@scenario
async def test_log_frames_follow_the_offset_rule(make):
    h = make()
    await h.commit()
    await h.register()
    assert await h.log(1, 0, "hello\n") == {"type": "ok", "offset": 6}
    gap = await h.log(1, 10, "later\n")
    assert codes(gap) == ("error", "offset") and gap["expected"] == 6
    assert await h.log(1, 3, "lo\nworld\n") == {"type": "ok", "offset": 12}     # the overlap is skipped
    assert await h.log(1, 6, "world\n") == {"type": "ok", "offset": 12}         # all of it held already
    assert codes(await h.log(1, 12, "x", attempt=2)) == ("error", "stale")
    assert codes(await h.log(99, 0, "x")) == ("error", "stale")
    assert h.text(1).endswith("===\nhello\nworld\n")


@scenario
async def test_a_result_needs_the_whole_log_and_the_current_attempt(make):
    h = make()
    await h.commit()
    await h.register()
    await h.log(1, 0, "ran\n")
    short = await h.result(1, log_size=10)
    assert codes(short) == ("error", "offset") and short["expected"] == 4
    assert codes(await h.result(1, attempt=2)) == ("error", "stale")
    assert await h.result(1, log_size=4) == {"type": "ok"}
    build = h.build(1)
    assert (build.status, build.exit_code, build.finished_at) == (Status.PASSED, 0, h.now)
    assert h.text(1).endswith("ran\n=== passed (exit 0) in 0.50s on r1 ===\n")
    assert codes(await h.result(1, log_size=4)) == ("error", "stale")      # once only


TESTS = {"passed": 3, "failed": 0, "errors": 0, "skipped": 0, "failures": []}


@scenario
async def test_a_result_the_database_cannot_take_changes_nothing_and_its_retry_lands(make):
    """The report and the ended build are one transaction, the result's first
    write: when it fails (the database locked by another process here; a full
    disk alike), the lease is still held, nothing is in the log, and the
    runner's retry is accepted."""
    h = make()
    await h.commit()
    await h.register()
    await h.log(1, 0, "ran\n")
    h.store.db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(h.store.path)
    other.execute("BEGIN IMMEDIATE")
    try:
        refused = await h.result(1, log_size=4, tests=TESTS)
    finally:
        other.rollback()
        other.close()
    assert codes(refused) == ("error", "busy")
    assert (h.build(1).status, h.store.test_counts([1])) == (Status.RUNNING, {})
    assert h.d.sched.is_current(1, 1) and "=== passed" not in h.text(1)
    assert await h.result(1, log_size=4, tests=TESTS) == {"type": "ok"}
    assert h.build(1).status is Status.PASSED and h.store.test_counts([1])[1]["passed"] == 3
    assert h.text(1).endswith("ran\n=== passed (exit 0) in 0.50s on r1 ===\n")


@scenario
async def test_the_results_of_one_turn_share_one_transaction_and_each_lands(make):
    h = make()
    for i in (1, 2, 3):
        await h.commit(sha=f"{i}" * 40)
        await h.register(f"r{i}")
    group = h.d.deliveries.group
    before = group.commits
    replies = await asyncio.gather(*(h.result(i, runner=f"r{i}", tests=TESTS) for i in (1, 2, 3)))
    assert replies == [{"type": "ok"}] * 3
    assert group.commits == before + 1
    for i in (1, 2, 3):
        assert h.build(i).status is Status.PASSED and h.store.test_counts([i])[i]["passed"] == 3
        assert h.text(i).endswith(f"=== passed (exit 0) in 0.50s on r{i} ===\n")
    assert not h.d.sched.builds


@scenario
async def test_the_results_of_a_turn_the_database_cannot_take_change_nothing_and_their_retries_land(make):
    h = make()
    for i in (1, 2):
        await h.commit(sha=f"{i}" * 40)
        await h.register(f"r{i}")
    h.store.db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(h.store.path)
    other.execute("BEGIN IMMEDIATE")
    try:
        refused = await asyncio.gather(*(h.result(i, runner=f"r{i}") for i in (1, 2)))
    finally:
        other.rollback()
        other.close()
    assert [codes(r) for r in refused] == [("error", "busy")] * 2
    for i in (1, 2):
        assert h.build(i).status is Status.RUNNING and h.d.sched.is_current(i, 1) and "=== passed" not in h.text(i)
    assert await asyncio.gather(*(h.result(i, runner=f"r{i}") for i in (1, 2))) == [{"type": "ok"}] * 2
    assert [h.build(i).status for i in (1, 2)] == [Status.PASSED] * 2


@scenario
async def test_a_result_sent_again_goes_on_alone_when_the_firsts_handler_is_cancelled(make):
    h = make()
    await h.commit()
    await h.register()
    first, again = asyncio.ensure_future(h.result(1)), asyncio.ensure_future(h.result(1))
    await asyncio.sleep(0)          # both in: the first waits for the commit, the second on the first
    first.cancel()                  # its handler cancelled before the commit (the daemon stopping)
    assert await again == {"type": "ok"}
    with pytest.raises(asyncio.CancelledError):
        await first
    assert h.build(1).status is Status.PASSED and h.text(1).count("=== passed") == 1


@scenario
async def test_a_cancel_between_a_result_and_its_commit_wins(make):
    """A result waits for its turn's commit; a cancel that comes in that
    moment is seen by the write, which then keeps the build cancelled."""
    h = make()
    await h.commit()
    await h.register()
    sent = asyncio.ensure_future(h.result(1))
    await asyncio.sleep(0)      # the result is in, waiting for the commit
    assert h.d.deliveries.group.pending((1, 1)) is not None
    assert await h.call({"type": "cancel", "build": 1}) == {"type": "ok", "builds": [1]}
    assert await sent == {"type": "ok"}
    assert h.build(1).status is Status.CANCELLED and 1 not in h.d.sched.builds
    assert h.text(1).endswith("=== cancelled (the runner reported passed as it stopped) ===\n")


@scenario
async def test_a_result_sent_again_while_the_first_waits_for_its_commit_gets_the_first_ones_answer(make):
    h = make()
    await h.commit()
    await h.register()
    first, again, third = await asyncio.gather(h.result(1), h.result(1), h.result(1))
    assert first == again == third == {"type": "ok"}
    assert h.build(1).status is Status.PASSED and h.text(1).count("=== passed") == 1
    assert codes(await h.result(1)) == ("error", "stale")       # once it is in: the attempt is over


@scenario
async def test_a_lost_runner_queues_its_build_again_with_the_next_attempt(make):
    h = make(heartbeat_interval=0.1, heartbeat_misses=3)
    await h.commit()
    await h.register("r1")
    h.runners["r1"].frozen = True
    await h.ping("r1")          # each interval without a pong is a miss, until the third
    assert h.build(1).status is Status.QUEUED
    assert "runner r1 lost: 3 pings in a row unanswered" in h.text(1)
    await h.register("r2")
    assert (h.build(1).runner, h.build(1).attempt) == ("r2", 2)
    assert codes(await h.log(1, 0, "old attempt\n", attempt=1)) == ("error", "stale")
    assert await h.log(1, 0, "second\n", attempt=2, runner="r2") == {"type": "ok", "offset": 7}


@scenario
async def test_a_cancel_confirmed_by_a_pong_ends_the_attempts_unfinished_upload(make):
    """The runner's pong that no longer lists a cancelled build ends that attempt
    with no other change (an otherwise empty plan): a chunk that was on its way
    when the cancel went out left an unfinished upload, which goes with it."""
    h = make()
    await h.register()
    await h.commit()
    await h.settle()
    await h.ping("r1")                          # the run acknowledged; a pong reports it
    assert await h.call({"type": "cancel", "build": 1}) == {"type": "ok", "builds": [1]}
    await h.settle()
    chunk = {"type": "artifact", "build": 1, "attempt": 1, "path": "dist/a.bin", "offset": 0, "data": b"x" * 1000,
             "eof": False}
    assert codes(await h.call(chunk, protocol.RUNNER, id="r1")) == ("ok", None)     # the lease holds until it stops
    assert 1 in h.d.artifacts.partial
    h.runners["r1"].running.clear()             # the runner stopped it
    h.mono += h.d.config.dispatcher.heartbeat_interval
    await h.ping("r1")
    assert 1 not in h.d.sched.builds and 1 not in h.d.artifacts.partial
    assert not h.d.artifacts.directory(1, SHA).joinpath("dist/a.bin").exists()


@scenario
async def test_a_runner_found_dead_has_its_kept_connection_closed_at_once(make):
    h = make(heartbeat_interval=0.1, heartbeat_misses=2)
    runner = h.runner("r1")
    await h.register("r1")
    runner.frozen = True
    await h.ping("r1")
    assert h.state("r1") == "dead" and runner.dropped == ["runner r1 is dead"]


@scenario
async def test_a_runner_that_moved_has_its_old_connection_closed(make):
    h = make()
    old = h.runner("r1")
    await h.register("r1")
    record = h.d.sched.runners["r1"]
    assert h.d.links.link(record) is old
    record.port = 9100              # registered again from another port
    h.d.links.link(record)
    assert old.dropped == ["runner r1 moved to 127.0.0.1:9100"]


# ---------------------------------------------------------------- cancel

@scenario
async def test_cancel_a_queued_build(make):
    h = make()
    await h.commit()
    reply = await h.call({"type": "cancel", "build": 1, "by": "ada@box"})
    assert reply == {"type": "ok", "builds": [1]}
    assert h.build(1).status is Status.CANCELLED
    assert "cancelled by ada@box (operator at 127.0.0.1:40000)" in h.text(1)
    assert (await h.status())["queue"] == []


@scenario
async def test_cancel_a_running_build_keeps_the_runners_offsets_right(make):
    h = make()
    await h.commit()
    await h.register()
    await h.log(1, 0, "step one\n")
    assert await h.call({"type": "cancel", "build": 1}) == {"type": "ok", "builds": [1]}
    await h.settle()
    assert [(m["build"], m["attempt"]) for m in h.runners["r1"].sent("cancel")] == [(1, 1)]
    # the runner goes on counting its own bytes: the dispatcher's line does not shift them
    assert await h.log(1, 9, "killed\n") == {"type": "ok", "offset": 16}
    assert await h.result(1, status="failed", log_size=16) == {"type": "ok"}
    assert h.build(1).status is Status.CANCELLED
    text = h.text(1)
    assert "step one\n=== cancelled by operator at 127.0.0.1:40000" in text
    assert text.endswith("killed\n=== cancelled (the runner reported failed as it stopped) ===\n")


@scenario
async def test_cancel_a_finished_or_unknown_build_is_an_error(make):
    h = make()
    await h.commit(subject="[skip ci]")
    assert codes(await h.call({"type": "cancel", "build": 1})) == ("error", "finished")
    assert codes(await h.call({"type": "cancel", "build": 7})) == ("error", "not_found")


# ---------------------------------------------------------------- reads

@scenario
async def test_status_says_why_a_queued_build_waits(make):
    h = make()
    await h.commit(jobs=[{"name": "gpu", "labels": ["cuda"]}, {"name": "any", "labels": []}])
    waits = {b["job"]: b["waiting"] for b in (await h.status())["builds"]}
    assert waits == {"gpu": "no runner alive", "any": "no runner alive"}
    await h.register("r1", labels=("linux",))
    await h.commit(sha=SHA2)
    waits = {(b["sha"], b["job"]): b.get("waiting") for b in (await h.status())["builds"]}
    assert waits == {(SHA, "gpu"): "no runner with label cuda",
                     (SHA, "any"): None,                          # running on r1
                     (SHA2, ""): "runner r1 busy"}
    pipeline = next(p for p in (await h.status())["pipelines"] if p["sha"] == SHA)
    assert pipeline["status"] == "running" and [j["job"] for j in pipeline["jobs"]] == ["any", "gpu"]


@scenario
async def test_read_log_sends_the_log_in_chunks_then_the_end(make):
    h = make()
    await h.commit()
    await h.register()
    await h.log(1, 0, "héllo\n")
    await h.result(1)
    frames = await h.stream({"type": "read_log", "build": 1})
    text = "".join(f["data"] for f in frames if f["type"] == "chunk")
    assert text == h.text(1) and "héllo\n" in text
    assert frames[-1] == {"type": "end", "status": "passed", "offset": len(text.encode())}
    assert codes((await h.stream({"type": "read_log", "build": 5}))[0]) == ("error", "not_found")


@scenario
async def test_a_log_read_binary_comes_in_chunks_of_whole_characters(make):
    h = make()
    await h.commit()
    await h.register()
    # three-byte characters: 1024-byte frames (the size here) would cut some of them
    text = "€" * 2000 + "\n"
    await h.log(1, 0, text)
    await h.result(1)
    stored = h.d.logs.path(1).read_bytes()
    conn = Conn(protocol.READER)
    conn.limits = net.Limits(max_bulk=1024)
    request = {"type": "read_log", "build": 1, "binary": True, "timestamps": True}
    protocol.validate(request, protocol.READER)
    assert await h.d.handle(conn, request) is None
    chunks = [f for f in conn.sent if f["type"] == "chunk"]
    assert b"".join(c["data"] for c in chunks) == stored and len(chunks) > 3
    for chunk in chunks:
        chunk["data"].decode()      # none ends inside a character
        assert len(chunk["data"]) <= 1024 and chunk["times"]
    assert [c["offset"] for c in chunks] == [sum(len(c["data"]) for c in chunks[:i]) for i in range(len(chunks))]
    assert conn.sent[-1] == {"type": "end", "status": "passed", "offset": len(stored)}
    # from an offset, and from past the end
    frames = await h.stream({"type": "read_log", "build": 1, "binary": True, "offset": 1000})
    assert b"".join(f["data"] for f in frames if f["type"] == "chunk") == stored[1000:]
    frames = await h.stream({"type": "read_log", "build": 1, "binary": True, "offset": 10 ** 9})
    assert frames == [{"type": "end", "status": "passed", "offset": len(stored)}]


@scenario
async def test_watch_sends_a_snapshot_then_each_change(make):
    h = make()
    conn = Conn(protocol.READER)
    watch = asyncio.ensure_future(h.d.handle(conn, {"type": "watch"}))
    while not conn.sent:
        await asyncio.sleep(0)
    assert conn.sent[0]["type"] == "ok" and conn.sent[0]["builds"] == []
    await h.commit()
    while len(conn.sent) < 2:
        await asyncio.sleep(0)
    assert conn.sent[1]["event"] == "build" and conn.sent[1]["build"]["id"] == 1
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    assert not h.d.watchers.active


# ---------------------------------------------------------------- trigger and rebuild

@pytest.fixture
def two_repos(tmp_path):
    one, two = Repo(tmp_path / "one"), Repo(tmp_path / "two")
    shas = {"one": one.commit("first of one"), "two": two.commit("first of two")}
    shas["only-two"] = two.commit("only in two", {".ci.yaml": "jobs:\n  a: {steps: [echo a]}\n  b: {steps: [echo b]}\n"})
    return one, two, shas


@scenario
async def test_trigger_builds_in_the_repository_where_the_revision_is(make, two_repos):
    one, two, shas = two_repos
    h = make()
    assert codes(await h.call({"type": "trigger", "branch": "main"})) == ("error", "not_found")   # none known
    await h.commit(repo=str(one.path), sha=shas["one"])
    await h.commit(repo=str(two.path), sha=shas["two"])          # the newest build is in two

    reply = await h.call({"type": "trigger", "rev": shas["one"][:10]})
    build = h.build(reply["builds"][0])
    assert (build.repo, build.sha, build.reason, build.subject) == (str(one.path), shas["one"], "manual",
                                                                    "first of one")
    assert build.author == "Ada Tester" and build.branch == "main"      # the branch the commit is on

    # in both: ambiguous, until --repo says which
    both = await h.call({"type": "trigger", "branch": "main"})
    assert codes(both) == ("error", "ambiguous")
    assert str(one.path) in both["message"] and str(two.path) in both["message"] and "--repo" in both["message"]
    reply = await h.call({"type": "trigger", "branch": "main", "repo": str(two.path)})
    built = [h.build(n) for n in reply["builds"]]
    assert [(b.repo, b.sha, b.branch, b.job) for b in built] == [
        (str(two.path), shas["only-two"], "main", "a"), (str(two.path), shas["only-two"], "main", "b")]

    unknown = await h.call({"type": "trigger", "branch": "main", "repo": "/not/known"})
    assert codes(unknown) == ("error", "not_found") and "/not/known" in unknown["message"]
    missing = await h.call({"type": "trigger", "rev": "no-such-rev"})
    assert codes(missing) == ("error", "not_found") and "no-such-rev" in missing["message"]


@scenario
async def test_trigger_of_a_branch_takes_the_branch_not_a_tag_of_its_name(make, two_repos):
    # a tag named like a branch must not stand in for it (the branch's secrets go with its builds)
    one, _, shas = two_repos
    tagged = one.commit("not on main")
    one.git("reset", "-q", "--hard", shas["one"])
    one.git("tag", "main", tagged)
    h = make()
    await h.commit(repo=str(one.path), sha=shas["one"])
    reply = await h.call({"type": "trigger", "branch": "main"})
    build = h.build(reply["builds"][0])
    assert (build.sha, build.branch) == (shas["one"], "main")


@scenario
async def test_trigger_knows_the_configured_repositories_before_any_commit(make, two_repos):
    one, two, shas = two_repos
    h = make(repos=[str(one.path), str(two.path)])
    reply = await h.call({"type": "trigger", "rev": shas["two"]})
    assert h.build(reply["builds"][0]).repo == str(two.path)
    assert "=== manual ===" in h.text(reply["builds"][0])


@scenario
async def test_rebuild_queues_the_same_commit_and_job_again(make):
    h = make()
    await h.commit(jobs=[{"name": "gpu", "labels": ["cuda"]}])
    await h.call({"type": "cancel", "build": 1})
    reply = await h.call({"type": "rebuild", "build": 1})
    assert reply == {"type": "ok", "builds": [2]}
    old, new = h.build(1), h.build(2)
    assert (new.repo, new.sha, new.job, new.labels, new.status) == (old.repo, old.sha, "gpu", ("cuda",),
                                                                    Status.QUEUED)
    assert new.reason == "rebuild of 1" and "=== rebuild of 1 ===" in h.text(2)
    assert codes(await h.call({"type": "rebuild", "build": 9})) == ("error", "not_found")


@scenario
async def test_a_run_posted_on_a_kept_connection_found_dead_goes_once_more_on_a_fresh_one(make):
    """A `run` goes out on the runner's open kept connection with no task of its
    own; when that connection turns out dead (the runner restarted), the run is
    sent once more on a fresh connection, and the build runs there."""
    h = make()
    runner = h.runner("r1")
    await h.register("r1")

    def reset():
        raise net.PeerError("lost connection to 127.0.0.1:9000: connection reset")

    runner.before = [reset]
    await h.commit()
    await h.settle()
    assert len(runner.sent("run")) == 1 and not runner.before      # the first went nowhere
    assert (h.build(1).status, h.build(1).attempt, h.build(1).runner) == (Status.RUNNING, 1, "r1")
    await h.ping("r1")
    assert h.state("r1") == "busy" and (1, 1) in runner.running


@scenario
async def test_a_run_the_runner_never_answers_is_not_sent_again(make):
    """A timeout is not a dead connection: whether the run arrived is unknown,
    and the runner's next pong tells."""
    h = make()
    runner = h.runner("r1")
    await h.register("r1")
    runner.before = [lambda: setattr(runner, "down", net.PeerTimeout("no answer")),
                     lambda: setattr(runner, "down", None)]
    await h.commit()
    await h.settle()
    assert runner.sent("run") == [] and h.build(1).status is Status.RUNNING
    h.mono += h.d.config.dispatcher.heartbeat_interval
    await h.ping("r1")          # the runner does not list it: taken back, and handed out anew
    await h.settle()
    assert (h.build(1).status, h.build(1).attempt) == (Status.RUNNING, 2)
    assert [m["attempt"] for m in runner.sent("run")] == [2]


@scenario
async def test_a_run_that_cannot_be_made_does_not_stop_the_rest_of_its_batch(make, monkeypatch):
    h = make()
    runner = h.runner("r1")
    await h.commit(sha=SHA)
    await h.commit(sha=SHA2)
    fields = h.d.links.definition_fields

    def broken(build):
        if build.id == 1:
            raise PermissionError(13, "Permission denied", "artifacts")
        return fields(build)

    monkeypatch.setattr(h.d.links, "definition_fields", broken)
    await h.register("r1", slots=2)         # both handed out in one batch
    assert [m["build"] for m in runner.sent("run")] == [2]
    h.mono += h.d.config.dispatcher.heartbeat_interval
    await h.ping("r1")                      # its pong does not list build 1: taken back, an attempt lost
    assert h.build(1).attempt == 2 and h.build(2).status is Status.RUNNING


@scenario
async def test_a_run_to_a_runner_with_no_connection_yet_goes_by_a_task_that_connects_first(make):
    h = make()
    runner = h.runner("r1")
    runner.connected = False                # as a KeptLink before its first connect: posting would fail
    runner.post = lambda msg, on_reply: pytest.fail("posted without a connection")
    await h.register("r1")
    await h.commit()
    await h.settle()
    assert [m["build"] for m in runner.sent("run")] == [1] and h.build(1).status is Status.RUNNING
    assert h.d.sched.is_current(1, 1) and not h.d.links.beat.out


@scenario
async def test_a_run_whose_send_fails_by_a_bug_does_not_stop_the_rest_of_its_batch(make, monkeypatch):
    h = make()
    r1, r2 = h.runner("r1"), h.runner("r2")
    await h.register("r1")
    await h.register("r2")
    link = h.d.links.link

    def broken(runner):
        if runner.name == "r1":
            raise RuntimeError("a bug in dialling r1")
        return link(runner)

    monkeypatch.setattr(h.d.links, "link", broken)
    await h.commit(sha=SHA)
    await h.commit(sha=SHA2)    # both assigned, one batch: the first to r1, whose send fails
    await h.settle()
    assert r1.sent("run") == [] and [m["build"] for m in r2.sent("run")] == [2]


@scenario
async def test_a_run_whose_lease_went_while_its_connection_was_made_is_not_sent(make):
    """Connecting first takes time: a lease taken back meanwhile (the runner
    found lost, the build handed on) is not sent to the old runner after all."""
    h = make()
    runner = h.runner("r1")
    runner.connected = False
    await h.register("r1")

    async def slow_connect():
        h.d.links.beat.lost(h.d.sched.runners["r1"], net.PeerRefused("connection refused"))
    runner.connect = slow_connect
    await h.commit()
    await h.settle()
    assert runner.sent("run") == [] and h.state("r1") == "dead"
    assert (h.build(1).status, h.build(1).attempt) == (Status.QUEUED, 1) and not h.d.sched.is_current(1, 1)


@scenario
async def test_runs_the_dispatchers_own_stop_fails_are_not_sent_again(make):
    h = make()
    runner = h.runner("r1")
    await h.register("r1")
    runner.held = []                        # the run goes out, its answer never comes
    await h.commit()
    await h.settle()
    assert [m["type"] for m, _ in runner.held] == ["run"]
    h.d.links.beat.stopped = True           # stopping: closing the connections fails what waits on them
    for _, on_reply in runner.held:
        on_reply(None, net.PeerError("the connection to 127.0.0.1:9000 was closed"))
    await h.settle()
    assert runner.sent("run") == [] and h.d.sched.is_current(1, 1)


# ---------------------------------------------------------------- liveness on the monotonic clock

@scenario
async def test_a_ping_that_timed_out_while_the_dispatcher_stood_still_is_not_a_miss(make):
    h = make(heartbeat_interval=1.0, heartbeat_misses=1)     # one counted miss would kill it
    await h.commit()
    await h.register("r1")
    runner = h.runners["r1"]

    def paused_then_timed_out():
        h.mono += 30                # the dispatcher was stopped for 30 s while its ping waited
        runner.down = net.PeerTimeout("no answer")

    runner.before = [paused_then_timed_out, lambda: setattr(runner, "down", None)]
    await h.ping("r1")              # not judged: pings again at once, and that one is answered
    assert h.state("r1") == "busy" and h.d.sched.runners["r1"].misses == 0
    assert (h.build(1).status, h.build(1).attempt) == (Status.RUNNING, 1)
    assert len(runner.sent("ping")) == 1


@scenario
async def test_a_late_pong_still_counts_on_the_same_connection(make):
    # a ping is not dropped when an interval passes: reconnecting each late runner
    # (a handshake in both processes) is what swamped a dispatcher with 500 of them
    h = make(heartbeat_interval=0.1, heartbeat_misses=3)
    await h.commit()
    await h.register("r1")
    runner, dial, dialled = h.runners["r1"], h.d.links.dial, []
    h.d.links.dial = lambda r: dialled.append(r.name) or dial(r)
    runner.held = []
    for _ in range(3):              # sent, then two intervals without its pong: two misses
        await h.tick()
        h.mono += 0.1
    assert len(runner.held) == 1 and h.d.sched.runners["r1"].misses == 2
    await runner.release()          # the pong, late
    assert h.state("r1") == "busy" and h.d.sched.runners["r1"].misses == 0
    assert dialled == [] and len(runner.sent("ping")) == 1
    assert (h.build(1).status, h.build(1).attempt) == (Status.RUNNING, 1)


@scenario
async def test_a_ping_out_longer_than_the_read_timeout_closes_its_connection(make):
    h = make(heartbeat_interval=1.0, heartbeat_misses=100)
    runner = h.runner("r1")
    await h.register("r1")
    runner.frozen = True
    for _ in range(11):             # the read timeout is 10 s: the twelfth tick finds it older
        await h.tick()
        assert runner.dropped == []
        h.mono += 1.0
    await h.tick()
    assert runner.dropped == ["127.0.0.1:9000 did not answer a ping within 10s"]
    assert h.d.sched.runners["r1"].misses == 11 and h.state("r1") == "idle"


@scenario
async def test_a_ping_closed_for_the_read_timeout_is_sent_again_at_once_not_counted_twice(make):
    # interval x misses over the read timeout: the closed connection's ping must not cost a miss of its own
    h = make(heartbeat_interval=5.0, heartbeat_misses=3)
    runner = h.runner("r1")
    await h.register("r1")
    runner.frozen = True
    await h.tick()                  # sent
    h.mono += 5
    await h.tick()                  # the first miss
    h.mono += 5.5
    runner.frozen = False           # it stood still for some 10 s, and is back
    await h.tick()                  # the second miss; its connection closed, a ping on a new one, answered
    assert runner.dropped == ["127.0.0.1:9000 did not answer a ping within 10s"]
    assert h.state("r1") == "idle" and h.d.sched.runners["r1"].misses == 0
    assert len(runner.sent("ping")) == 1


@scenario
async def test_a_loop_late_at_every_tick_still_finds_a_frozen_runner(make):
    h = make(heartbeat_interval=1.0, heartbeat_misses=2)
    h.runner("r1")
    await h.register("r1")
    h.runners["r1"].frozen = True
    await h.tick()
    for _ in range(4):              # every tick 2 s after the last: late, but only one in two is let off
        h.mono += 2.0
        await h.tick()
    assert h.state("r1") == "dead"


@scenario
async def test_a_tick_that_fails_for_one_runner_still_pings_the_others(make, caplog):
    h = make()
    for name in ("r1", "r2"):
        h.runner(name)
        await h.register(name)

    def broken(msg, on_reply):
        raise RuntimeError("a bug")
    h.runners["r1"].post = broken
    await h.tick()
    assert h.runners["r2"].sent("ping") and "the heartbeat of runner r1 failed" in caplog.text


@scenario
async def test_after_a_restart_a_known_runner_has_the_deadline_to_come_back(make):
    h = make(heartbeat_interval=1.0, heartbeat_misses=3)
    await h.commit()
    await h.register("r1")
    await h.commit(sha=SHA2)
    assert (h.build(1).status, h.build(2).status) == (Status.RUNNING, Status.QUEUED)
    # the dispatcher restarts over the same data; r1 still starts (its port refuses)
    h.store.close()                 # the first dispatcher stops: the data dir is one dispatcher's
    again = make(heartbeat_interval=1.0, heartbeat_misses=3)
    r1 = again.runner("r1")
    r1.down = net.PeerRefused("nothing listens on 127.0.0.1:9000 (connection refused)")
    await again.ping("r1")
    again.mono += 2.9
    await again.ping("r1")
    assert again.state("r1") == "busy" and again.build(1).attempt == 1
    assert r1.sent("run") == []                         # no new work before it answered
    r1.down, r1.running = None, {(1, 1)}                # back, still running build 1
    await again.ping("r1")
    assert (again.build(1).status, again.build(1).attempt) == (Status.RUNNING, 1)
    assert "taken back" not in again.text(1)


@scenario
async def test_after_a_restart_a_runner_not_back_in_time_is_lost(make):
    h = make(heartbeat_interval=1.0, heartbeat_misses=3)
    await h.commit()
    await h.register("r1")
    h.store.close()                 # the first dispatcher stops: the data dir is one dispatcher's
    again = make(heartbeat_interval=1.0, heartbeat_misses=3)
    r1 = again.runner("r1")
    r1.down = net.PeerRefused("nothing listens on 127.0.0.1:9000 (connection refused)")
    await again.ping("r1")
    assert again.state("r1") == "busy"
    again.mono += 3.1
    await again.ping("r1")
    assert again.state("r1") == "dead" and again.build(1).status is Status.QUEUED
    assert "runner r1 lost: nothing listens" in again.text(1)


@scenario
async def test_a_ping_that_fails_otherwise_is_a_miss_too_one_interval_apart(make):
    h = make(heartbeat_interval=0.1, heartbeat_misses=3)
    await h.commit()
    await h.register("r1")
    h.runner("r1").down = net.PeerError("cannot connect to 127.0.0.1:9000: No route to host")
    start = h.mono
    await h.ping("r1")
    assert h.state("r1") == "dead" and h.build(1).status is Status.QUEUED
    assert "3 pings in a row unanswered (the last: cannot connect" in h.text(1)
    assert h.mono - start >= 0.3        # one miss a tick: the fourth tick counted the third


# ---------------------------------------------------------------- runner maintenance

@scenario
async def test_drain_lets_the_build_finish_and_hands_out_nothing_new_until_resume(make):
    h = make()
    await h.commit()
    await h.register("r1")
    reply = await h.call({"type": "drain", "name": "r1"})
    assert reply["runner"]["state"] == "draining" and reply["runner"]["running"] == [1]
    assert [r.draining for r in h.store.runners()] == [True]
    await h.commit(sha=SHA2)
    await h.settle()
    assert h.build(2).status is Status.QUEUED
    assert next(b for b in (await h.status())["builds"] if b["id"] == 2)["waiting"] == "runner r1 draining"
    assert await h.result(1) == {"type": "ok"}
    assert h.state("r1") == "drained" and h.build(2).status is Status.QUEUED
    await h.ping("r1")
    assert h.build(2).status is Status.QUEUED           # a pong does not undo a drain
    reply = await h.call({"type": "resume", "name": "r1"})
    await h.settle()
    assert reply["runner"]["state"] == "busy"
    assert (h.build(2).status, h.build(2).runner) == (Status.RUNNING, "r1")
    assert [r.draining for r in h.store.runners()] == [False]
    missing = await h.call({"type": "drain", "name": "nobody"})
    assert codes(missing) == ("error", "not_found") and "nobody" in missing["message"]


@scenario
async def test_a_drained_runner_stays_drained_across_a_dispatcher_restart(make):
    h = make()
    await h.register("r1")
    await h.call({"type": "drain", "name": "r1"})
    h.store.close()                 # the first dispatcher stops: the data dir is one dispatcher's
    again = make()
    again.runner("r1")
    await again.ping("r1")
    await again.commit()
    await again.settle()
    assert again.state("r1") == "drained" and again.build(1).status is Status.QUEUED


@scenario
async def test_forget_removes_a_dead_runner_and_refuses_a_live_one(make):
    h = make()
    await h.register("r1")
    await h.register("r2")
    alive = await h.call({"type": "forget", "name": "r1"})
    assert codes(alive) == ("error", "runner_alive") and "alive" in alive["message"]
    h.runner("r1").down = net.PeerRefused("nothing listens on 127.0.0.1:9000 (connection refused)")
    await h.ping("r1")
    assert h.state("r1") == "dead"
    assert await h.call({"type": "forget", "name": "r1"}) == {"type": "ok"}
    assert [r["name"] for r in (await h.status())["runners"]] == ["r2"]
    assert [r.name for r in h.store.runners()] == ["r2"]
    assert codes(await h.call({"type": "forget", "name": "r1"})) == ("error", "not_found")


# ---------------------------------------------------------------- a full disk, a log removed

class Disk:
    """statvfs of a disk whose free space the test sets."""

    def __init__(self, free: int):
        self.free = free

    def __call__(self, path: str):
        return type("statvfs", (), {"f_bavail": self.free // 4096, "f_frsize": 4096})()


def full_disk(h, free: int) -> Disk:
    disk = Disk(free)
    h.d.disk.statvfs = disk
    h.d.disk.look()
    return disk


@scenario
async def test_a_log_past_the_reserve_is_cut_and_its_result_recorded_with_a_note(make):
    h = make(min_free_bytes=1 << 20)
    disk = full_disk(h, 1 << 30)
    await h.register()
    await h.commit()
    await h.commit(sha=SHA2)
    await h.settle()
    assert codes(await h.log(1, 0, "first lines\n")) == ("ok", None)
    disk.free = (1 << 20) + 100                # the next frame would go past the reserve
    h.d.disk.look()
    refused = await h.log(1, 12, "x" * 4096)
    assert codes(refused) == ("error", "disk_full")
    assert "the dispatcher's disk is full" in refused["message"] and "send the result" in refused["message"]
    status = await h.status()
    assert [(c["name"], c["message"]) for c in status["conditions"]] == [("disk_full", "disk full (1.0 MB free)")]
    # the runner sends its result for the whole log; the dispatcher takes it, saying where the log stops
    assert codes(await h.result(1, log_size=12 + 4096 + 30)) == ("ok", None)
    text = h.text(1)
    assert text.index("first lines\n") < text.index("[log cut: the dispatcher's disk is full] (4126 bytes of output "
                                                      "were not stored)") < text.index("=== passed (exit 0)")
    assert h.build(1).status is Status.PASSED
    # the note moved the attempt's log base past it (the runner's count stays its own): saved too,
    # not only what the result's first write saved
    note_end = text.index("\n", text.index("[log cut:")) + 1
    assert h.build(1).log_base == len(text[:note_end].encode()) - len("first lines\n")
    await h.settle()
    assert h.build(2).status is Status.RUNNING and h.build(2).runner == "r1"     # its slot went to the next build
    disk.free = 1 << 30
    h.d.disk.look()
    assert (await h.status())["conditions"] == []
    assert codes(await h.log(2, 0, "room again\n")) == ("ok", None)


@scenario
async def test_an_incomplete_log_without_a_cut_is_still_asked_for(make):
    h = make()
    await h.register()
    await h.commit()
    await h.settle()
    await h.log(1, 0, "abc")
    reply = await h.result(1, log_size=10)
    assert codes(reply) == ("error", "offset") and reply["expected"] == 3


@scenario
async def test_an_artifact_that_does_not_fit_is_left_out_with_a_note(make):
    h = make(min_free_bytes=1 << 20)
    full_disk(h, (1 << 20) + 10)
    await h.register()
    await h.commit()
    await h.settle()
    reply = await h.call({"type": "artifact", "build": 1, "attempt": 1, "path": "dist/app.tar", "offset": 0,
                          "data": b"hello world", "eof": True}, protocol.RUNNER, id="r1")
    assert codes(reply) == ("error", "disk_full") and "artifact 'dist/app.tar' left out" in reply["message"]
    assert "[artifact dist/app.tar left out: the dispatcher's disk is full]" in h.text(1)
    assert h.d.artifacts.list(1) == []


@scenario
async def test_chunks_on_their_way_behind_a_refused_one_add_no_second_note(make):
    h = make(min_free_bytes=1 << 20)
    disk = full_disk(h, 1 << 30)
    await h.register()
    await h.commit()
    await h.settle()

    async def chunk(offset: int) -> dict:
        return await h.call({"type": "artifact", "build": 1, "attempt": 1, "path": "big.bin", "offset": offset,
                             "data": b"x" * 1000, "eof": False}, protocol.RUNNER, id="r1")
    assert (await chunk(0))["offset"] == 1000
    disk.free = (1 << 20) + 10
    h.d.disk.look()
    assert codes(await chunk(1000)) == ("error", "disk_full")
    assert codes(await chunk(2000)) == ("error", "disk_full")     # sent before the refusal came back
    assert h.text(1).count("[artifact big.bin left out") == 1
    assert not h.d.artifacts.directory(1, SHA).joinpath("big.bin").exists()    # what it had is given back


@scenario
async def test_a_removed_log_file_is_noted_and_the_attempt_goes_on(make):
    h = make()
    await h.register()
    await h.commit()
    await h.settle()
    assert (await h.log(1, 0, "one\ntwo\n"))["offset"] == 8
    h.d.logs.path(1).unlink()                       # an operator making room by hand
    reply = await h.log(1, 8, "three\n")
    assert reply == {"type": "ok", "offset": 14}   # the runner's count goes on where it was
    assert h.text(1) == "[log file was removed; continuing]\nthree\n"
    assert codes(await h.result(1, log_size=14)) == ("ok", None)
    assert h.build(1).status is Status.PASSED and "=== passed" in h.text(1)


@scenario
async def test_a_log_file_cut_short_is_noted_once(make):
    h = make()
    await h.register()
    await h.commit()
    await h.settle()
    await h.log(1, 0, "a" * 100)
    with open(h.d.logs.path(1), "r+b") as f:
        f.truncate(30)
    assert (await h.log(1, 100, "b" * 10))["offset"] == 110
    assert (await h.log(1, 110, "c"))["offset"] == 111
    text = h.text(1)
    assert text.count("[log file was cut short by") == 1 and text.endswith("b" * 10 + "c")
    db = sqlite3.connect(h.store.path)              # the moved base was saved: a restart counts the same
    try:
        assert db.execute("SELECT log_base FROM builds WHERE id = 1").fetchone()[0] == h.d.sched.builds[1].log_base
    finally:
        db.close()


# ---------------------------------------------------------------- needs

GRAPH_JOBS = [{"name": "test (python=3.10)", "labels": []}, {"name": "test (python=3.11)", "labels": []},
              {"name": "lint", "labels": [], "needs": ["test (python=3.10)", "test (python=3.11)"]},
              {"name": "docs", "labels": [], "skip": "no changed path matches when.paths (docs/*)"}]


@scenario
async def test_a_build_waits_outside_the_queue_until_its_needs_passed(make):
    h = make()
    assert (await h.commit(jobs=GRAPH_JOBS))["builds"] == [1, 2, 3, 4]
    assert h.build(4).status is Status.SKIPPED and "skipped: no changed path matches" in h.text(4)
    status = await h.status()
    lint = next(b for b in status["builds"] if b["id"] == 3)
    assert lint["waiting"] == "waiting for test (python=3.10), test (python=3.11) (needs)"
    assert status["queue"] == [1, 2, 3] and 3 not in h.d.sched.builds
    await h.register("r1", slots=2)
    assert [m["build"] for m in h.runner("r1").sent("run")] == [1, 2]      # lint is not handed out
    await h.result(1)
    assert 3 not in h.d.sched.builds and h.d.held.get(3).held == "test (python=3.11)"
    h.d.artifacts.write(2, SHA, "dist/b.whl", 0, b"wheel", True, 1 << 20, 1)
    await h.result(2)
    await h.settle()
    run = h.runner("r1").sent("run")[-1]
    assert run["build"] == 3 and run["job"] == "lint"
    assert run["inputs"] == [{"build": 2, "job": "test (python=3.11)", "path": "dist/b.whl"}]
    assert "=== the builds it needs passed: queued ===" in h.text(3)
    # the runner holding lint may fetch test's artifact; another runner may not
    fetched = await h.call({"type": "fetch_artifact", "build": 2, "path": "dist/b.whl"}, protocol.RUNNER, id="r1")
    assert fetched["data"] == b"wheel"
    refused = await h.call({"type": "fetch_artifact", "build": 2, "path": "dist/b.whl"}, protocol.RUNNER, id="r9")
    assert codes(refused) == ("error", "forbidden")
    streamed = await h.stream({"type": "read_artifact", "build": 2, "path": "dist/b.whl"}, protocol.RUNNER, id="r1")
    assert streamed == [{"type": "ok", "size": 5}, {"type": "chunk", "offset": 0, "data": b"wheel"},
                        {"type": "end", "offset": 5}]
    refused = await h.stream({"type": "read_artifact", "build": 2, "path": "dist/b.whl"}, protocol.RUNNER, id="r9")
    assert [codes(f) for f in refused] == [("error", "forbidden")]


@scenario
async def test_a_failed_need_skips_the_build_and_what_needed_it(make):
    h = make()
    jobs = GRAPH_JOBS[:3] + [{"name": "deploy", "labels": [], "needs": ["lint"]}]
    await h.commit(jobs=jobs)
    await h.register("r1", slots=2)
    await h.result(1, status="failed")
    assert h.build(3).status is Status.SKIPPED and h.build(3).finished_at == h.now
    assert h.build(4).status is Status.SKIPPED
    assert "=== skipped: needs test (python=3.10), which failed ===" in h.text(3)
    assert "=== skipped: needs lint, which was skipped ===" in h.text(4)
    assert not h.d.held.builds and [m["build"] for m in h.runner("r1").sent("run")] == [1, 2]


@scenario
async def test_cancelling_a_waiting_build_skips_what_needed_it(make):
    h = make()
    await h.commit(jobs=GRAPH_JOBS[:3] + [{"name": "deploy", "labels": [], "needs": ["lint"]}])
    assert (await h.call({"type": "cancel", "build": 3})) == {"type": "ok", "builds": [3]}
    assert h.build(3).status is Status.CANCELLED and h.build(4).status is Status.SKIPPED
    assert "needs lint, which was cancelled" in h.text(4)
    assert codes(await h.call({"type": "cancel", "build": 3})) == ("error", "finished")


@scenario
async def test_waiting_builds_are_held_again_after_a_restart(make):
    h = make()
    await h.commit(jobs=GRAPH_JOBS[:3])
    await h.commit(sha=SHA2, jobs=GRAPH_JOBS[:3])
    await h.commit(sha="c" * 40, jobs=GRAPH_JOBS[:3])
    assert sorted(h.d.held.builds) == [3, 6, 9]
    # what the stored builds say when the dispatcher stops (results stored, nothing released yet)
    ended = {1: Status.PASSED, 2: Status.PASSED, 4: Status.PASSED, 5: Status.FAILED}
    for build_id, status in ended.items():
        build = h.build(build_id)
        build.status = status
        h.store.save([build])
    h.store.close()
    again = make()
    assert 3 in again.d.sched.builds and again.build(3).status is Status.QUEUED     # its needs passed
    assert again.build(6).status is Status.SKIPPED                                  # one of them failed
    assert "=== skipped: needs test (python=3.11), which failed ===" in again.text(6)
    assert list(again.d.held.builds) == [9] and again.d.held.get(9).held == "test (python=3.10), test (python=3.11)"
    assert (await again.status())["queue"] == [3, 7, 8, 9]
