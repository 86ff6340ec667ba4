"""Retention: builds made at chosen times in a real store (SQLite, log files,
artifacts on disk), swept with the time passed in; then real daemons, one
restarted forty days later (tests/timeshift.py moves its wall clock), and
`tinyci gc`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ci.artifacts import Artifacts
from ci.config import RetentionConfig
from ci.models import Status
from ci.retention import BATCH, Retention, choose
from ci.store import Store
from conftest import Cluster, Daemon, Repo, by_sha, finished, free_port, tinyci

DAY = 86400.0
NOW = 1_800_000_000.0


class History:
    """A data dir with builds finished at chosen times, each with a log and, if asked, an artifact."""

    def __init__(self, path: Path):
        self.store = Store(path)
        self.artifacts = Artifacts(self.store)
        self.logs = path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.count = 0

    def add(self, days_ago: float | None, branch: str = "main", job: str = "", status: Status = Status.PASSED,
            log: int = 1000, artifact: int = 0, sha: str | None = None) -> int:
        """A build that finished ``days_ago`` (None: still ``status`` queued or running)."""
        self.count += 1
        sha = sha or f"{self.count:040x}"
        build, _ = self.store.add_build(repo="/srv/app", branch=branch, sha=sha, job=job, now=NOW - 30 * DAY,
                                        reason="manual", subject="s" * 500)
        build.status = status
        build.finished_at = None if days_ago is None else NOW - days_ago * DAY
        self.store.save([build])
        (self.logs / f"{build.id}.log").write_bytes(b"x" * log)
        if artifact:
            self.artifacts.write(build.id, sha, "out/report.bin", 0, b"a" * artifact, True, 1 << 30)
        return build.id

    def ids(self) -> list[int]:
        return [b.id for b in reversed(self.store.recent(10**6))]

    def sweep(self, days: float = 0, per_branch: int = 0, dry_run: bool = False, active=()):
        retention = Retention(self.store, RetentionConfig(days=days, per_branch=per_branch),
                              clock=lambda: NOW, active=lambda: active)
        return asyncio.run(retention.sweep(dry_run))


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "data")
    yield h
    h.store.close()


def test_builds_older_than_days_go_but_never_the_newest_of_a_branch_and_job(history):
    # newest: the highest build number, the order every view shows builds in
    old = history.add(40)
    old_lint = history.add(40, job="lint")
    newer = history.add(35)                                 # also old, but the newest of main
    ancient_feature = history.add(400, branch="feature")
    recent = history.add(1, branch="feature")
    lonely = history.add(90, branch="stale")                # the only build of its branch: kept
    queued = history.add(None, status=Status.QUEUED)
    running = history.add(None, status=Status.RUNNING)
    held = history.add(50, branch="x", status=Status.CANCELLED)     # its runner has not stopped yet
    held_newer = history.add(1, branch="x")                 # (so it is not the newest of its branch)
    swept = history.sweep(days=30, active=[running, held])
    assert swept.builds == 2
    assert set(history.ids()) == {old_lint, newer, recent, lonely, queued, running, held, held_newer}
    assert not (history.logs / f"{old}.log").exists() and not (history.logs / f"{ancient_feature}.log").exists()
    assert (history.logs / f"{newer}.log").exists()
    assert history.store.get(old) is None
    # the newest of main is among the kept; a newer one makes it the one to go
    newest = history.add(0.5)
    assert history.sweep(days=30, active=[running, held]).builds == 1
    assert newer not in history.ids() and newest in history.ids()


def test_per_branch_keeps_the_newest_of_each_branch_and_job(history):
    main = [history.add(10 - i) for i in range(5)]
    lint = [history.add(10 - i, job="lint") for i in range(3)]
    other = [history.add(10 - i, branch="other") for i in range(2)]
    running = history.add(None, status=Status.RUNNING)
    assert history.sweep(per_branch=2).builds == 3 + 1
    assert history.ids() == [*main[3:], *lint[1:], *other, running]


def test_a_dry_run_says_exactly_what_the_sweep_then_deletes(history):
    doomed = [history.add(60, log=5000 + i, artifact=300) for i in range(3)]
    kept = history.add(1)
    (history.logs / f"{doomed[0]}.tail").write_bytes(b"t" * 700)          # a capped log's tail goes too
    dry = history.sweep(days=30, dry_run=True)
    assert (dry.builds, dry.log_bytes, dry.artifact_bytes) == (3, 15003 + 700, 900)
    assert history.ids() == [*doomed, kept]                               # nothing deleted
    real = history.sweep(days=30)
    assert (real.builds, real.log_bytes, real.artifact_bytes) == (dry.builds, dry.log_bytes, dry.artifact_bytes)
    assert history.ids() == [kept]
    assert list(history.logs.iterdir()) == [history.logs / f"{kept}.log"]
    assert not (history.store.dir / "artifacts").exists() or not any((history.store.dir / "artifacts").iterdir())
    assert history.artifacts.list(doomed[0]) == []


def test_a_commits_artifact_folder_stays_while_another_build_of_it_does(history):
    sha = "c" * 40
    old = history.add(60, artifact=10, sha=sha, job="a")
    new = history.add(59, artifact=10, sha=sha, job="b")
    history.add(58, job="a")                                 # makes `old` not the newest of job a
    history.sweep(days=30)
    folder = history.store.dir / "artifacts" / sha
    assert not (folder / str(old)).exists() and (folder / str(new) / "out" / "report.bin").exists()


def test_build_numbers_are_never_reused_after_a_sweep(history):
    for _ in range(3):
        history.add(60)
    last = history.add(1)
    history.store.db.execute("DELETE FROM builds WHERE id = ?", (last,))    # even the highest number gone
    history.sweep(days=30)
    assert history.add(1) == last + 1


def test_a_sweep_gives_the_space_back_to_the_disk(history):
    for _ in range(2 * BATCH + 50):                          # several batches
        history.add(60)
    history.add(1)
    history.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = history.store.path.stat().st_size
    swept = history.sweep(days=30)
    history.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert swept.builds == 2 * BATCH + 50 and swept.db_bytes > 0
    assert history.store.path.stat().st_size < before / 2
    assert history.store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_nothing_is_chosen_when_retention_is_off(history):
    history.add(1000)
    history.add(999)
    assert choose(history.store.path, RetentionConfig(), NOW) == []
    assert history.sweep().builds == 0


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_the_loop_keeps_answering_during_a_long_sweep(history):
    rows = [("/srv/app", "main", f"{i:040x}", "s" * 200, "", 0.0, "manual", "passed", "[]", NOW - 60 * DAY, "",
             NOW - 60 * DAY) for i in range(20_000)]
    with history.store.transaction():
        history.store.db.executemany(
            "INSERT INTO builds (repo, branch, sha, subject, author, commit_time, reason, status, labels, "
            "created_at, job, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    history.add(1)
    retention = Retention(history.store, RetentionConfig(days=30), clock=lambda: NOW)

    async def main():
        gaps, last = [], time.monotonic()

        async def tick():
            nonlocal last
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        swept = await retention.sweep()
        took = time.monotonic() - started
        ticker.cancel()
        return swept, took, max(gaps)

    swept, took, worst = asyncio.run(main())
    assert swept.builds == 20_000
    # every other task waits at most one batch (or one vacuum step), never the whole sweep
    assert worst < max(0.25, took / 10), (worst, took)


# ---------------------------------------------------------------- real daemons


def build_of(c: Cluster, sha: str) -> dict:
    return by_sha(c.builds())[sha]


@pytest.mark.slow
def test_tinyci_gc_keeps_per_branch_and_says_what_it_would_delete(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("initial", {"build.sh": "echo built\n"})
    with Cluster(tmp_path, sections={"retention": {"per_branch": 1}}) as c:
        c.dispatcher()
        c.runner("r1")
        c.observer(repo)
        shas = [repo.head()]
        c.wait_builds(lambda b: len(b) == 1 and finished(b), "the first build")
        for n in range(2):
            shas.append(repo.commit(f"change {n}"))
            c.wait_builds(lambda b, n=n: len(b) == n + 2 and finished(b), f"build {n + 2}")
        tool = ("--dispatcher", c.disp.addr, "--config", str(c.config))
        dry = tinyci("gc", "--dry-run", *tool)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith("a sweep would delete 2 finished build(s) beyond the newest 1 per branch and job")
        assert len(c.builds()) == 3
        ran = tinyci("gc", *tool)
        assert ran.returncode == 0 and ran.stdout.startswith("deleted 2 finished build(s)"), ran.stdout
        assert [b["sha"] for b in c.builds()] == [shas[2]]
        gone = tinyci("log", "1", *tool)
        assert gone.returncode == 1 and "no build 1" in gone.stderr
        assert sorted(p.name for p in (tmp_path / "dispatcher" / "logs").iterdir()) == ["3.log"]   # its times are in the database
        assert "gc by operator" in c.disp.log()


@pytest.mark.slow
def test_a_dispatcher_forty_days_later_sweeps_what_is_older_than_retention_days(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("initial", {"build.sh": "echo built\n"})
    with Cluster(tmp_path, sections={"retention": {"days": 30, "interval": 3600}}) as c:
        port = free_port()
        c.dispatcher(port=port)
        c.runner("r1")
        c.observer(repo)
        first = repo.head()
        c.wait_builds(lambda b: len(b) == 1 and finished(b), "the first build")
        second = repo.commit("second")
        c.wait_builds(lambda b: len(b) == 2 and finished(b), "the second build")
        repo.git("checkout", "-q", "-b", "feature")
        feature = repo.commit("on a branch")
        c.wait_builds(lambda b: len(b) == 3 and finished(b), "the feature build")

        c.disp.stop()
        later = Daemon("dispatcher", [str(40 * DAY), "dispatcher", "--config", str(c.config), "--port", str(port),
                                      "--data", str(tmp_path / "dispatcher")],
                       tmp_path, tmp_path / "logs" / "dispatcher-later.log", c.env, module="tests.timeshift")
        c.daemons.append(later)
        # its first sweep, at start: the old build of main goes; each branch keeps its newest
        c.wait("the sweep at start", lambda: first not in by_sha(c.builds()))
        assert set(by_sha(c.builds())) == {second, feature}
        assert "retention deleted 1 build(s)" in later.log()

        repo.git("checkout", "-q", "main")
        third = repo.commit("third, forty days on")
        c.wait("the third build", lambda: third in by_sha(c.builds()) and finished(c.builds()))
        tool = ("--dispatcher", later.addr, "--config", str(c.config))
        dry = tinyci("gc", "--dry-run", *tool)
        assert dry.stdout.startswith("a sweep would delete 1 finished build(s) older than 30 day(s)"), dry.stdout
        assert tinyci("gc", *tool).returncode == 0
        assert set(by_sha(c.builds())) == {feature, third}      # feature: old, but its branch's newest
