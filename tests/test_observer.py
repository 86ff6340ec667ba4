"""The observer: the plan over real git repositories, the saved position, and
the daemon as a real process against a small fake dispatcher."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from ci import gitops, gitwatch, net, observer, protocol
from ci.config import ObserverConfig
from ci.daemon import StartupError

from conftest import free_port
from daemons import Daemon, WaitTimeout, child_env, wait_until

GIT = ["git", "-c", "user.name=Ada Lovelace", "-c", "user.email=ada@example.com",
       "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
WAIT = 15.0      # bound on every wait; generous because CI machines are noisy


# ---------------------------------------------------------------- git helpers

def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    commit(path, "initial")
    return path


def commit(repo: Path, message: str) -> str:
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def commits(repo: Path, n: int, prefix: str = "change") -> list[str]:
    return [commit(repo, f"{prefix} {i}") for i in range(n)]


def read(repo: Path, saved: dict, **kw) -> tuple[gitwatch.ScanPlan, list[gitwatch.Commit]]:
    return gitwatch.Clone(repo, **kw).read(saved)


# ---------------------------------------------------------------- the plan

def test_first_seen_branch_reports_only_its_head(tmp_path):
    repo = make_repo(tmp_path / "repo")
    commits(repo, 3)
    head = commit(repo, "Fix the parser\n\nLonger explanation.")
    plan, found = read(repo, {})
    assert plan.report == [("main", head)]
    assert found == [gitwatch.Commit("main", head, "Ada Lovelace <ada@example.com>", "Fix the parser",
                                     int(git(repo, "log", "-1", "--format=%ct")),
                                     message="Fix the parser\n\nLonger explanation.\n")]


def test_a_commit_is_read_with_its_file_and_anything_else_is_named(tmp_path):
    """A commit is read without asking git for its type first; an annotated tag is read as its
    commit; a sha that is a tree, short, or not in the clone at all is a GitReadError saying which."""
    repo = make_repo(tmp_path / "repo")
    (repo / ".ci.yaml").write_text("steps: ['true']\n")
    git(repo, "add", ".ci.yaml")
    head = commit(repo, "Add the build file")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    with gitops.RepoReader(repo) as reader:
        facts = reader.commit(head, ".ci.yaml")
        assert (facts.sha, facts.message, facts.file, facts.file_kind) == \
            (head, "Add the build file\n", b"steps: ['true']\n", "blob")
        with pytest.raises(gitops.GitReadError, match=f"{tree} is a tree, not a commit"):
            reader.commit(tree, ".ci.yaml")
        with pytest.raises(gitops.GitReadError, match="0{40}"):
            reader.commit("0" * 40, ".ci.yaml")
        with pytest.raises(gitops.GitReadError, match="'abcd' is not a full commit sha"):
            reader.commit("abcd", ".ci.yaml")
        assert reader.commit(head, ".ci.yaml") == facts        # the reader is still in step after them
    # an annotated tag, as a remote-tracking ref fetched with a wide refspec may name: its commit
    git(repo, "tag", "-a", "-m", "release", "v1")
    tag = git(repo, "rev-parse", "v1")
    with gitops.RepoReader(repo) as reader:
        tagged = reader.commit(tag, ".ci.yaml")
    assert (tagged.sha, tagged.message, tagged.file) == (tag, facts.message, facts.file)


def test_new_commits_are_reported_oldest_first(tmp_path):
    repo = make_repo(tmp_path / "repo")
    saved = git(repo, "rev-parse", "HEAD")
    new = commits(repo, 4)
    plan, found = read(repo, {"main": saved})
    assert plan.report == [("main", sha) for sha in new]
    assert [c.subject for c in found] == ["change 0", "change 1", "change 2", "change 3"]
    assert plan.forced == [] and plan.dropped == []


def test_merged_history_puts_parents_before_children(tmp_path):
    repo = make_repo(tmp_path / "repo")
    saved = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "topic")
    side = commits(repo, 2, "side")
    git(repo, "checkout", "-q", "main")
    mainline = commit(repo, "mainline")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge topic", "topic")
    merge = git(repo, "rev-parse", "HEAD")
    plan, _ = read(repo, {"main": saved}, patterns=["main"])
    order = [sha for _, sha in plan.report]
    assert sorted(order) == sorted([*side, mainline, merge])
    assert order.index(side[0]) < order.index(side[1]) < order.index(merge)
    assert order[-1] == merge


def test_force_push_reports_only_the_new_head(tmp_path):
    repo = make_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "HEAD")
    old = commits(repo, 3, "old")
    git(repo, "reset", "-q", "--hard", base)
    rewritten = commits(repo, 2, "rewritten")
    plan, found = read(repo, {"main": old[-1]})
    assert plan.report == [("main", rewritten[-1])]
    assert plan.forced == [("main", old[-1], rewritten[-1])]
    assert [c.subject for c in found] == ["rewritten 1"]


def test_saved_commit_missing_from_the_clone_counts_as_force_push(tmp_path):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    plan, _ = read(repo, {"main": "0" * 40})
    assert plan.report == [("main", head)]
    assert plan.forced == [("main", "0" * 40, head)]


def test_deleted_branch_is_dropped(tmp_path):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "branch", "feature")
    plan, _ = read(repo, {"main": head, "feature": head})
    assert plan.report == [] and plan.dropped == []
    git(repo, "branch", "-D", "feature")
    plan, _ = read(repo, {"main": head, "feature": head})
    assert plan.dropped == [("feature", head)]
    assert plan.report == []


def test_branch_patterns_filter_what_is_watched(tmp_path):
    repo = make_repo(tmp_path / "repo")
    for name in ("release/1.0", "feature/x", "mainly"):
        git(repo, "branch", name)
    plan, _ = read(repo, {}, patterns=["main", "release/*"])
    assert [branch for branch, _ in plan.report] == ["main", "release/1.0"]


def test_remote_mode_watches_remote_branches_without_prefix(tmp_path):
    upstream = make_repo(tmp_path / "upstream")
    git(upstream, "branch", "dev")
    clone = tmp_path / "clone"
    subprocess.run([*GIT, "clone", "-q", str(upstream), str(clone)], check=True, timeout=30)
    plan, _ = read(clone, {}, remote="origin")
    assert [branch for branch, _ in plan.report] == ["dev", "main"]     # no "HEAD"
    assert gitwatch.Clone(clone, remote="origin").remote_url() == str(upstream)


def test_long_subject_is_cut_to_the_protocol_limit(tmp_path):
    repo = make_repo(tmp_path / "repo")
    commit(repo, "x" * 5000)
    _, found = read(repo, {})
    assert len(found[0].subject) == 4096
    protocol.validate({"type": "commit", "repo": str(repo), "branch": "main", "sha": found[0].sha,
                  "author": found[0].author, "subject": found[0].subject, "time": found[0].time},
                 protocol.OBSERVER)


def test_branches_take_turns_each_still_oldest_first():
    report = [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"), ("c", "5"), ("c", "6")]
    assert gitwatch.interleave(report) == [("a", "1"), ("b", "4"), ("c", "5"), ("a", "2"), ("c", "6"), ("a", "3")]
    assert gitwatch.interleave([]) == []


def test_commits_are_read_within_a_budget_and_each_ci_yaml_once(tmp_path):
    repo = make_repo(tmp_path / "repo")
    saved = git(repo, "rev-parse", "HEAD")
    (repo / ".ci.yaml").write_text("steps: [make]\njobs: {unit: {labels: [linux]}}\n")
    git(repo, "add", ".ci.yaml")
    new = [commit(repo, "add .ci.yaml"), *commits(repo, 3)]
    clone = gitwatch.Clone(repo)
    plan = clone.plan({"main": saved})
    assert plan.report == [("main", sha) for sha in new]
    first = clone.describe(plan.report, budget=0)       # a spent budget still reads one
    assert [c.sha for c in first] == new[:1]
    before = gitwatch._checked.cache_info()
    rest = clone.describe(plan.report[1:])
    assert [c.sha for c in rest] == new[1:]
    assert all(c.jobs == [{"name": "unit", "labels": ["linux"]}] for c in first + rest)
    # the same file at every commit: read once, however many commits share it
    assert gitwatch._checked.cache_info().misses == before.misses


def test_when_is_decided_with_the_paths_changed_against_the_first_parent(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / ".ci.yaml").write_text("steps: [make]\njobs:\n  test:\n    when: {paths: ['src/*']}\n"
                                   "  lint:\n    needs: [test]\n    when: {branches: [main]}\n")
    (repo / "src").mkdir()
    (repo / "src" / "app.py").write_text("x = 1\n")
    git(repo, "add", ".")
    saved = commit(repo, "code")
    (repo / "README").write_text("docs\n")
    git(repo, "add", "README")
    docs = commit(repo, "docs only")
    found = {c.sha: c.jobs for c in read(repo, {"main": git(repo, "rev-parse", "HEAD~2")})[1]}
    assert found[saved] == [{"name": "test", "labels": []}, {"name": "lint", "labels": [], "needs": ["test"]}]
    assert found[docs] == [{"name": "test", "labels": [], "skip": "no changed path matches when.paths (src/*)"},
                           {"name": "lint", "labels": [], "needs": ["test"]}]
    git(repo, "checkout", "-q", "-b", "feature")
    head = commit(repo, "on a branch")
    jobs = read(repo, {"main": docs, "feature": docs})[1][0].jobs
    assert (head, jobs[1]["skip"]) == (head, "branch feature is not among when.branches (main)")


# ---------------------------------------------------------------- the saved position

def test_state_file_round_trip_and_corruption(tmp_path, caplog):
    repo = tmp_path / "repo"
    state = observer.StateFile(tmp_path / "state", repo)
    state.lock()
    try:
        assert state.load() == {}
        state.save({"main": "a" * 40})
        assert state.load() == {"main": "a" * 40}
        assert json.loads(state.path.read_text()) == {"repo": str(repo), "branches": {"main": "a" * 40}}
        state.path.write_text('{"repo": "x", "branches": {"main": ')
        with caplog.at_level(logging.WARNING, logger="ci.observer"):
            assert state.load() == {}
        assert str(state.path) in caplog.text
        state.save({"main": "b" * 40})        # a fresh start overwrites cleanly
        assert state.load() == {"main": "b" * 40}
    finally:
        state.unlock()


def test_two_observers_cannot_share_a_state_file(tmp_path):
    first = observer.StateFile(tmp_path / "state", tmp_path / "repo")
    second = observer.StateFile(tmp_path / "state", tmp_path / "repo")
    first.lock()
    try:
        with pytest.raises(StartupError, match="already watching"):
            second.lock()
    finally:
        first.unlock()


def test_dispatcher_replies_busy_is_retried_and_refusal_is_skipped(tmp_path):
    """In-process: 'busy' means try again; any other error means move past that commit."""
    repo = make_repo(tmp_path / "repo")
    start = git(repo, "rev-parse", "HEAD")
    rejected, accepted = commits(repo, 2)
    seen: list[str] = []

    async def handler(conn, msg):
        seen.append(msg["sha"])
        if len(seen) <= 2:
            return protocol.error("busy", "queue full")
        if msg["sha"] == rejected:
            return protocol.error("bad_repo", "not a repository we build")
        return protocol.ok(build=len(seen), builds=[len(seen)], duplicate=False)

    async def scenario():
        server = await net.serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = ObserverConfig(repo=str(repo), dispatcher=f"127.0.0.1:{port}", state_dir=str(tmp_path / "s"))
        setup = observer.check(cfg)
        state = observer.StateFile(tmp_path / "s", setup.repo)
        state.save({"main": start})
        client = net.Client("127.0.0.1", port, protocol.OBSERVER)
        obs = observer.Observer(setup, state, client)
        try:
            await asyncio.wait_for(obs.scan(), WAIT)
        finally:
            await client.close()
            server.close()
        return obs

    obs = asyncio.run(scenario())
    assert seen == [rejected, rejected, rejected, accepted]
    assert obs.branches == {"main": accepted}
    assert observer.StateFile(tmp_path / "s", repo).load() == {"main": accepted}


# ---------------------------------------------------------------- the real daemon

class FakeDispatcher:
    """Records `commit` frames and answers ok {build, builds, duplicate}, on its own loop thread."""

    def __init__(self, port: int = 0, delay: float = 0.0):
        self.port, self.delay = port, delay
        self.received: list[dict] = []
        self._lock = threading.Lock()
        self._server = None
        self._writers: set = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _handle(self, conn, msg):
        self._writers.add(conn.writer)
        if msg["type"] != "commit":
            return protocol.error("unsupported", msg["type"])
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            duplicate = any(m["sha"] == msg["sha"] for m in self.received)
            self.received.append(msg)
            build = len(self.received)
        return protocol.ok(build=build, builds=[build], duplicate=duplicate)

    def start(self) -> "FakeDispatcher":
        self._server = asyncio.run_coroutine_threadsafe(
            net.serve(self._handle, "127.0.0.1", self.port, name="fake-dispatcher"), self._loop).result(WAIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def shas(self) -> list[str]:
        with self._lock:
            return [m["sha"] for m in self.received]

    def wait_for(self, shas: list[str], timeout: float = WAIT) -> list[str]:
        def got_all() -> list[str] | None:
            got = self.shas()
            return got if all(sha in got for sha in shas) else None
        return wait_until(got_all, timeout, f"the fake dispatcher to receive {[s[:12] for s in shas]}",
                          every=0.02, details=lambda: f"got {[s[:12] for s in self.shas()]}")

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # end open connections here, not in a garbage collector later: closing
        # the transports lets each connection task finish on its own
        for writer in self._writers:
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=WAIT)
            for task in pending:
                task.cancel()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()


class Observer:
    """One observer process (tests/daemons.py's Daemon) and what these tests ask of it."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.proc = daemon.proc

    @property
    def port(self) -> int:
        return self.daemon.port

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")

    def wait_log(self, text: str) -> None:
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, WAIT,
                   f"the observer to log {text!r}", details=self.log)
        assert text in self.log(), f"observer exited early; its log:\n{self.log()}"

    def poke(self, branch: str = "main") -> dict:
        return asyncio.run(net.call(f"127.0.0.1:{self.port}", {"type": "poke", "branch": branch},
                                    role=protocol.OPERATOR, timeout=WAIT, to=protocol.OBSERVER_ID))


@pytest.fixture
def spawn(tmp_path):
    started: list[Daemon] = []

    def start(*args: str, ready: bool = True) -> Observer:
        daemon = Daemon("observer", ["--port", "0", *args], tmp_path, tmp_path / f"observer-{len(started)}.log",
                        child_env(), wait_ready=ready)
        started.append(daemon)
        return Observer(daemon)

    yield start
    for daemon in started:
        if daemon.alive():
            daemon.stop(WAIT)


@pytest.fixture
def dispatcher():
    fakes: list[FakeDispatcher] = []

    def make(**kw) -> FakeDispatcher:
        fakes.append(FakeDispatcher(**kw))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


def test_commits_after_start_are_reported_oldest_first(tmp_path, spawn, dispatcher):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    fake = dispatcher().start()
    obs = spawn("--repo", str(repo), "--dispatcher", fake.addr, "--interval", "0.1",
                "--state", str(tmp_path / "state"))
    assert fake.wait_for([head]) == [head]
    first = fake.received[0]
    assert first == {"type": "commit", "repo": str(repo), "branch": "main", "sha": head,
                     "author": "Ada Lovelace <ada@example.com>", "subject": "initial",
                     "time": first["time"], "message": "initial\n"}
    new = commits(repo, 5)
    assert fake.wait_for(new) == [head, *new]
    obs.proc.send_signal(signal.SIGTERM)
    assert obs.proc.wait(WAIT) == 0


def test_poke_wakes_the_observer_at_once(tmp_path, spawn, dispatcher):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    fake = dispatcher().start()
    obs = spawn("--repo", str(repo), "--dispatcher", fake.addr, "--interval", "30",
                "--state", str(tmp_path / "state"))
    fake.wait_for([head])
    new = commit(repo, "poked")
    assert obs.poke()["type"] == "ok"
    # the interval is 30 s, longer than this bound: only the poke can have woken it
    assert fake.wait_for([new], timeout=10) == [head, new]


def test_nothing_is_lost_while_the_dispatcher_is_down(tmp_path, spawn, dispatcher):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    port = free_port()
    obs = spawn("--repo", str(repo), "--dispatcher", f"127.0.0.1:{port}", "--interval", "0.1",
                "--state", str(tmp_path / "state"))
    obs.wait_log(f"dispatcher 127.0.0.1:{port} is unreachable")
    new = commits(repo, 3)
    obs.poke()                      # still served during the outage
    fake = dispatcher(port=port).start()
    got = fake.wait_for([head, *new])
    assert got[:4] == [head, *new]
    assert obs.log().count("is unreachable") == 1    # one warning per outage, not per retry
    assert "reachable again" in obs.log()


def test_unreadable_clone_is_retried_not_fatal(tmp_path, spawn, dispatcher):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    fake = dispatcher().start()
    obs = spawn("--repo", str(repo), "--dispatcher", fake.addr, "--interval", "0.1",
                "--state", str(tmp_path / "state"))
    fake.wait_for([head])
    (repo / ".git").rename(tmp_path / "git-away")        # as if mid-way through being replaced
    obs.wait_log(f"{repo} is not a git repository (any more); trying again next scan")
    (tmp_path / "git-away").rename(repo / ".git")
    new = commits(repo, 2)
    assert fake.wait_for(new) == [head, *new]
    assert obs.proc.poll() is None


def test_fetch_mode_reports_the_remote_branches(tmp_path, spawn, dispatcher):
    upstream = make_repo(tmp_path / "upstream")
    clone = tmp_path / "clone"
    subprocess.run([*GIT, "clone", "-q", str(upstream), str(clone)], check=True, timeout=30)
    head = git(upstream, "rev-parse", "HEAD")
    config = tmp_path / "config.yaml"
    config.write_text("observer:\n  fetch: true\n")
    fake = dispatcher().start()
    spawn("--config", str(config), "--repo", str(clone), "--dispatcher", fake.addr, "--interval", "0.1",
          "--state", str(tmp_path / "state"))
    fake.wait_for([head])
    new = commits(upstream, 2)
    git(upstream, "branch", "topic")
    # branches take turns (gitwatch.interleave): topic's head may come before main's
    wait_until(lambda: any(m["branch"] == "topic" for m in fake.received)
               and len([m for m in fake.received if m["branch"] == "main"]) == 3, WAIT,
               "the topic branch and main's two new commits reported")
    assert [m["sha"] for m in fake.received if m["branch"] == "main"] == [head, *new]
    assert [(m["branch"], m["sha"]) for m in fake.received if m["branch"] != "main"] == [("topic", new[-1])]
    assert {m["repo"] for m in fake.received} == {str(upstream)}     # runners clone the remote itself


def test_stops_promptly_while_retrying(tmp_path, spawn):
    repo = make_repo(tmp_path / "repo")
    port = free_port()
    obs = spawn("--repo", str(repo), "--dispatcher", f"127.0.0.1:{port}", "--state", str(tmp_path / "state"))
    obs.wait_log("is unreachable")
    obs.proc.send_signal(signal.SIGTERM)
    assert obs.proc.wait(WAIT) == 0
    assert "Traceback" not in obs.log()


def test_sigkill_and_restart_loses_no_commit(tmp_path, spawn, dispatcher):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    fake = dispatcher(delay=0.1).start()
    args = ("--repo", str(repo), "--dispatcher", fake.addr, "--interval", "0.1", "--state", str(tmp_path / "state"))
    obs = spawn(*args)
    fake.wait_for([head])
    before = commits(repo, 5, "before")
    fake.wait_for(before[:2])
    obs.proc.send_signal(signal.SIGKILL)          # mid-batch: the rest are not reported yet
    obs.proc.wait(WAIT)
    after = commits(repo, 3, "after")
    spawn(*args)
    got = fake.wait_for([*before, *after])
    assert set(got) == {head, *before, *after}      # duplicates allowed, nothing missing
    firsts = sorted(set(got), key=got.index)
    assert firsts == [head, *before, *after]        # and each first seen oldest first


@pytest.mark.parametrize("case", ["not_git", "missing", "no_repo", "bad_dispatcher"])
def test_startup_errors_are_one_line_and_exit_2(tmp_path, spawn, case):
    plain = tmp_path / "plain"
    plain.mkdir()
    repo = make_repo(tmp_path / "repo")
    args, expected = {
        "not_git": (["--repo", str(plain)], f"{plain} is not a git repository"),
        "missing": (["--repo", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        "no_repo": ([], "no repository to watch"),
        "bad_dispatcher": (["--repo", str(repo), "--dispatcher", "localhost"], "'localhost'"),
    }[case]
    obs = spawn(*args, "--state", str(tmp_path / "state"), ready=False)
    assert obs.proc.wait(WAIT) == 2
    err = obs.log()
    assert len(err.splitlines()) == 1, err
    assert expected in err and err.startswith("tinyci observer: ")
    assert "Traceback" not in err


# ---------------------------------------------------------------- a fetch that hangs

def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _hang(pidfile: Path) -> list[str]:
    """A git command that never ends on its own: git starts a shell that becomes `sleep`
    (standing in for a fetch's ssh child) after writing its pid."""
    return ["-c", f"alias.hang=!echo $$ > '{pidfile}'; exec sleep 120", "hang"]


def _gone(pid: int) -> bool:
    try:
        return wait_until(lambda: not _alive(pid), WAIT, f"process {pid} to end", every=0.01)
    except WaitTimeout:
        return False


def test_a_git_command_cancelled_midway_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"

    async def body() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(gitops.run_cancellable(_hang(pidfile), tmp_path, timeout=120))
        deadline = loop.time() + WAIT
        while not (pidfile.exists() and pidfile.read_text().strip()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        pid = int(pidfile.read_text())
        started = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid, loop.time() - started

    pid, took = asyncio.run(asyncio.wait_for(body(), 2 * WAIT))
    assert took < 2.0               # the daemon stopping does not wait for git
    assert _gone(pid), f"git's child {pid} outlived the cancel"


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_a_git_command_that_does_not_answer_in_time_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    done = asyncio.run(gitops.run_cancellable(_hang(pidfile), tmp_path, timeout=0.5))
    assert done.status == -1 and done.err == "no answer after 0.5s" and not done.ok
    assert _gone(int(pidfile.read_text()))


def test_git_that_cannot_run_is_a_result_not_an_exception(tmp_path):
    done = asyncio.run(gitops.run_cancellable(["status"], tmp_path / "absent"))
    assert done.status == -1 and "no such directory" in done.err
