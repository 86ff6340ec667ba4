"""The dispatcher's data dir over the months: upgrades that keep history (the
committed fixture, made by the release before schema versions), a database
from a newer tinyci or a damaged one refused before anything writes to it,
and one dispatcher per data dir. Real SQLite files on a real disk; the last
tests start real dispatchers."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from ci.store import SCHEMA_VERSION, Store, StoreError
from conftest import Cluster, Daemon, child_env

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "datadir-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def fixture_copy(target: Path) -> Path:
    """The fixture's data dir, its ci.db made from the SQL text kept in git (ci.sql:
    the old release's database as it dumped; a binary file would be opaque to review)."""
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("expected.json", "ci.sql", "ci.db*"))
    db = sqlite3.connect(target / "ci.db")
    try:
        db.executescript((FIXTURE / "ci.sql").read_text())
        db.execute("PRAGMA journal_mode=WAL")       # as the old dispatcher left it
    finally:
        db.close()
    for leftover in ("ci.db-wal", "ci.db-shm"):
        (target / leftover).unlink(missing_ok=True)
    return target


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pragma(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


def test_the_fixture_is_from_before_schema_versions(tmp_path):
    # what the upgrade tests start from: a database this test suite never changes
    data = fixture_copy(tmp_path / "data")
    assert pragma(data / "ci.db", "user_version") == 0 and pragma(data / "ci.db", "journal_mode") == "wal"
    assert "builds" in (FIXTURE / "ci.sql").read_text() and not (FIXTURE / "ci.db").exists()
    assert {b["status"] for b in EXPECTED["builds"]} == {"passed", "failed", "error", "cancelled", "skipped"}
    assert any(b["artifacts"] for b in EXPECTED["builds"])


def test_an_old_database_is_copied_then_migrated_in_place(tmp_path):
    data = fixture_copy(tmp_path / "data")
    before = digest(data / "ci.db")
    store = Store(data)
    try:
        assert [b.id for b in store.recent(100)][::-1] == [b["id"] for b in EXPECTED["builds"]]
        for build, expected in zip(store.recent(100)[::-1], EXPECTED["builds"]):
            assert (build.status.value, build.job, build.sha, build.reason) == \
                   (expected["status"], expected["job"], expected["sha"], expected["reason"])
        assert [r.name for r in store.runners()] == [r["name"] for r in EXPECTED["runners"]]
        # build numbers go on from where they were
        build, _ = store.add_build(repo="/r", branch="main", sha="a" * 40, now=1.0)
        assert build.id == EXPECTED["next_build"]
        # old builds need nothing; a new one keeps its needs (the needs migration)
        assert all(b.needs == () for b in store.recent(100))
        lint, _ = store.add_build(repo="/r", branch="main", sha="a" * 40, now=1.0, job="lint", needs=("t",))
        assert store.get(lint.id).needs == ("t",)
        assert [b.id for b in store.commit_builds("/r", "a" * 40)] == [build.id, lint.id]
    finally:
        store.close()
    backup = data / "ci.db.v0.bak"
    assert pragma(backup, "user_version") == 0 and pragma(backup, "journal_mode") == "delete"
    copy = sqlite3.connect(backup)
    assert copy.execute("SELECT count(*) FROM builds").fetchone()[0] == len(EXPECTED["builds"])
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copy.close()
    assert pragma(data / "ci.db", "user_version") == SCHEMA_VERSION
    assert pragma(data / "ci.db", "auto_vacuum") == 2          # incremental: retention gives space back
    assert digest(data / "ci.db") != before
    Store(data).close()                                     # current now: opened without another copy
    assert sorted(p.name for p in data.glob("ci.db.v*")) == ["ci.db.v0.bak"]


def test_a_new_database_is_made_at_the_current_version_without_a_copy(tmp_path):
    Store(tmp_path / "data").close()
    assert pragma(tmp_path / "data" / "ci.db", "user_version") == SCHEMA_VERSION
    assert pragma(tmp_path / "data" / "ci.db", "auto_vacuum") == 2
    assert not list((tmp_path / "data").glob("*.bak"))


def test_a_database_from_a_newer_tinyci_is_refused_untouched(tmp_path):
    data = fixture_copy(tmp_path / "data")
    db = sqlite3.connect(data / "ci.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = digest(data / "ci.db")
    with pytest.raises(StoreError) as err:
        Store(data)
    assert f"{data / 'ci.db'} was written by a newer tinyci (schema version {SCHEMA_VERSION + 1}" in str(err.value)
    assert digest(data / "ci.db") == before and not list(data.glob("*.bak"))
    Store(tmp_path / "other").close()           # the refusal let go of its lock: nothing is left held
    with pytest.raises(StoreError):
        Store(data)


def test_a_copy_that_cannot_be_saved_leaves_the_database_as_it_was(tmp_path):
    data = fixture_copy(tmp_path / "data")
    (data / "ci.db.v0.bak.tmp").mkdir()                     # where the copy is written: in the way
    before = digest(data / "ci.db")
    with pytest.raises(StoreError) as err:
        Store(data)
    assert "saving a copy of it as" in str(err.value) and "nothing was changed" in str(err.value)
    assert digest(data / "ci.db") == before and pragma(data / "ci.db", "user_version") == 0


def corrupt(path: Path, page: int) -> None:
    """Overwrite the head of one b-tree page with 0xff."""
    size = pragma(path, "page_size")
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * 64)


def test_a_damaged_database_is_refused_naming_the_last_good_copy(tmp_path):
    data = fixture_copy(tmp_path / "data")
    Store(data).close()                                     # the upgrade saved ci.db.v0.bak
    corrupt(data / "ci.db", 2)
    before = digest(data / "ci.db")
    with pytest.raises(StoreError) as err:
        Store(data)
    text = str(err.value)
    assert f"{data / 'ci.db'} is damaged and was not opened" in text
    assert f"restore the last good copy, {data / 'ci.db.v0.bak'}" in text
    assert digest(data / "ci.db") == before


def test_a_damaged_index_fails_the_quick_check(tmp_path):
    data = fixture_copy(tmp_path / "data")
    db = sqlite3.connect(data / "ci.db")
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'builds_sha'").fetchone()[0]
    db.close()
    corrupt(data / "ci.db", root)
    with pytest.raises(StoreError) as err:
        Store(data)
    assert "is damaged and was not opened" in str(err.value) and "no copy of it was saved here" in str(err.value)
    assert not list(data.glob("*.bak"))                     # never copied, never migrated


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ci.db").write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(StoreError) as err:
        Store(data)
    assert "is damaged and was not opened (file is not a database)" in str(err.value)


def test_one_store_per_data_dir(tmp_path):
    first = Store(tmp_path / "data")
    try:
        with pytest.raises(StoreError) as err:
            Store(tmp_path / "data")
        assert f"uses {tmp_path / 'data'}" in str(err.value) and "another dispatcher (pid" in str(err.value)
    finally:
        first.close()
    Store(tmp_path / "data").close()


# ---------------------------------------------------------------- real dispatchers

@pytest.mark.slow
def test_a_dispatcher_opens_the_fixture_with_its_whole_history(tmp_path):
    fixture_copy(tmp_path / "dispatcher")
    with Cluster(tmp_path) as c:
        c.dispatcher()
        status = c.status()
        shown = {b["id"]: b for b in status["builds"]}
        keys = ("status", "job", "sha", "branch", "subject", "reason", "exit_code", "attempt", "runner",
                "created_at", "started_at", "finished_at", "labels")
        for expected in EXPECTED["builds"]:
            build = shown[expected["id"]]
            assert {k: build[k] for k in keys} == {k: expected[k] for k in keys}
            assert c.log(expected["id"]) == expected["log"]
            assert c.request({"type": "artifacts", "build": expected["id"]})["artifacts"] == expected["artifacts"]
        with_artifact = next(b for b in EXPECTED["builds"] if b["artifacts"])
        fetched = c.request({"type": "fetch_artifact", "build": with_artifact["id"], "path": "out/report.txt"})
        stored = FIXTURE / "artifacts" / with_artifact["sha"] / str(with_artifact["id"]) / "out" / "report.txt"
        assert fetched["data"] == stored.read_bytes()
        assert [r["name"] for r in status["runners"]] == [r["name"] for r in EXPECTED["runners"]]
        reply = c.request({"type": "commit", "repo": "/elsewhere", "branch": "main", "sha": "b" * 40,
                           "author": "Ada", "subject": "after the upgrade", "time": 1.0}, role="observer")
        assert reply["build"] == EXPECTED["next_build"]
        assert "upgrading" in c.disp.log() and (tmp_path / "dispatcher" / "ci.db.v0.bak").exists()


@pytest.mark.slow
def test_a_second_dispatcher_on_the_same_data_dir_is_refused_naming_the_first(tmp_path):
    with Cluster(tmp_path) as c:
        first = c.dispatcher()
        second = Daemon("dispatcher", ["--config", str(c.config), "--port", "0", "--data",
                                       str(tmp_path / "dispatcher")],
                        tmp_path, tmp_path / "logs" / "second.log", child_env(), wait_ready=False)
        assert second.proc.wait(30) == 2
        assert f"another dispatcher (pid {first.pid}) uses {tmp_path / 'dispatcher'}" in second.log()
        assert "Traceback" not in second.log()
        assert first.alive() and c.status()["builds"] == []


def test_a_transaction_whose_commit_fails_is_rolled_back_not_left_open(tmp_path):
    # a COMMIT can fail (a full disk, with WAL, fails there); a deferred foreign key
    # makes SQLite fail it for real and keep the transaction open, as a full disk may
    store = Store(tmp_path / "data")
    try:
        store.db.execute("PRAGMA foreign_keys=ON")
        store.db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        store.db.execute("CREATE TABLE child (parent REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
        with pytest.raises(sqlite3.IntegrityError):
            with store.transaction():
                store.add_build(repo="/r", branch="main", sha="a" * 40, now=1.0)
                store.db.execute("INSERT INTO child VALUES (7)")
        assert not store.db.in_transaction
        assert store.recent(10) == []                  # nothing of it was kept
        with store.transaction():                       # and the next one works
            store.add_build(repo="/r", branch="main", sha="b" * 40, now=2.0)
        assert [b.sha for b in store.recent(10)] == ["b" * 40]
    finally:
        store.close()


def test_arrival_times_are_appended_a_row_at_a_time_and_read_back_in_order(tmp_path):
    store = Store(tmp_path / "data")
    try:
        one, _ = store.add_build(repo="/r", branch="main", sha="a" * 40, now=1.0)
        store.add_log_times({one.id: "0 1.000\n", 999: "0 9.000\n"})      # 999: no such build, skipped
        store.add_log_times({one.id: "18 2.500\n"})
        assert store.log_times(one.id) == "0 1.000\n18 2.500\n"
        assert store.log_times(999) == ""
        # appended rows, not one value rewritten (and copied) at each save as a build logs on
        assert store.db.execute("SELECT count(*) FROM log_times WHERE build = ?", (one.id,)).fetchone()[0] == 2
    finally:
        store.close()
