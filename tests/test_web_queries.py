"""The dispatcher's queries for the web page, without sockets: the history's
filters and keyset paging over a real SQLite store, a branch's status for
the badge, log windows of a log too big to read whole, and the counts."""

from __future__ import annotations

import pytest

from ci import protocol
from ci.logwindow import CHUNK, LogLines, Window
from ci.models import Status
from ci.store import Store
from test_dispatcher import Harness, scenario

SHAS = [f"{i:040x}" for i in range(1, 400)]


def seed(store: Store, rows: list[dict]) -> list[int]:
    ids = []
    with store.transaction():
        for row in rows:
            status = Status(row.pop("status", "passed"))
            build, _ = store.add_build(now=row.pop("now", 100.0), status=status, **{"repo": "/r", **row})
            ids.append(build.id)
    return ids


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


# ---------------------------------------------------------------- history

def test_history_pages_newest_first_by_keyset(store):
    ids = seed(store, [{"branch": "main", "sha": SHAS[i]} for i in range(25)])
    page, older, newer = store.history({}, limit=10)
    assert [b.id for b in page] == ids[::-1][:10] and older and not newer
    page2, older, newer = store.history({}, before=page[-1].id, limit=10)
    assert [b.id for b in page2] == ids[::-1][10:20] and older and newer
    page3, older, newer = store.history({}, before=page2[-1].id, limit=10)
    assert [b.id for b in page3] == ids[::-1][20:] and not older and newer
    back, older, newer = store.history({}, after=page2[0].id, limit=10)
    assert [b.id for b in back] == [b.id for b in page] and older and not newer
    # a build that arrives meanwhile does not shift an older page
    seed(store, [{"branch": "main", "sha": SHAS[30]}])
    again, _, _ = store.history({}, before=page[-1].id, limit=10)
    assert [b.id for b in again] == [b.id for b in page2]


def test_history_filters_each_and_together(store):
    seed(store, [
        {"branch": "main", "sha": "ab" + "0" * 38, "author": "Ada Tester <ada@example.com>", "job": "test"},
        {"branch": "main", "sha": "ab" + "1" * 38, "author": "Bob <bob@example.com>", "job": "lint",
         "status": "failed"},
        {"branch": "dev", "sha": "cd" + "0" * 38, "author": "Ada Tester <ada@example.com>", "job": "test",
         "status": "failed"},
        {"branch": "dev", "sha": "ab" + "2" * 38, "author": "100%_real", "job": "", "status": "error"},
    ])

    def ids(**filters) -> list[str]:
        return [b.sha[:3] for b in store.history(filters)[0]]

    assert ids(branch="main") == ["ab1", "ab0"]
    assert ids(status="failed") == ["cd0", "ab1"]
    assert ids(job="test") == ["cd0", "ab0"] and ids(job="") == ["ab2"]
    assert ids(author="ADA") == ["cd0", "ab0"]                 # any part of name or e-mail, any case
    assert ids(author="bob@") == ["ab1"]
    assert ids(author="%") == ["ab2"] and ids(author="_") == ["ab2"]       # LIKE's wildcards are literal
    assert ids(sha="ab") == ["ab2", "ab1", "ab0"] and ids(sha="ab1" + "1" * 37) == ["ab1"]
    assert ids(sha="f") == []
    assert ids(branch="dev", status="failed", author="ada") == ["cd0"]
    assert ids(repo="/elsewhere") == []


def test_the_history_filters_use_their_indexes(store):
    plans = {}
    for name, value in (("branch", "main"), ("status", "passed"), ("job", "test"), ("sha", "ab")):
        where = "sha >= ? AND sha < ?" if name == "sha" else f"{name} = ?"
        args = ("ab", "abg") if name == "sha" else (value,)
        plan = store.db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM builds WHERE {where} AND id < ? "
                                f"ORDER BY id DESC LIMIT 51", (*args, 2**62)).fetchall()
        plans[name] = " ".join(row[-1] for row in plan)
    assert "builds_branch" in plans["branch"] and "builds_status" in plans["status"]
    assert "builds_job" in plans["job"] and "builds_sha" in plans["sha"]
    assert all("SCAN builds" not in plan for plan in plans.values()), plans


@scenario
async def test_the_history_request_overlays_the_active_builds(tmp_path):
    h = Harness(tmp_path)
    try:
        for sha in SHAS[:3]:
            await h.commit(sha=sha)
        await h.register()
        reply = await h.call({"type": "history", "limit": 2}, protocol.READER)
        assert [b["status"] for b in reply["builds"]] == ["queued", "queued"]
        assert reply["older"] is True and reply["newer"] is False
        rest = await h.call({"type": "history", "before": reply["builds"][-1]["id"]}, protocol.READER)
        assert [(b["id"], b["status"]) for b in rest["builds"]] == [(1, "running")]
        await h.result(1, status="failed")
        failed = await h.call({"type": "history", "status": "failed"}, protocol.READER)
        assert [b["id"] for b in failed["builds"]] == [1]
    finally:
        h.store.close()


# ---------------------------------------------------------------- branch status

@scenario
async def test_branch_status_is_the_newest_finished_pipeline(tmp_path):
    h = Harness(tmp_path)
    try:
        async def badge(branch: str = "main") -> dict:
            reply = await h.call({"type": "branch_status", "branch": branch}, protocol.READER)
            return {k: reply.get(k) for k in ("status", "sha", "builds")}

        assert (await badge())["status"] == "unknown"
        await h.commit(sha=SHAS[0], jobs=[{"name": "a", "labels": []}, {"name": "b", "labels": []}])
        assert (await badge())["status"] == "running"           # nothing finished yet, something queued
        await h.register(slots=2)
        await h.result(1)
        assert (await badge())["status"] == "running"           # job b still runs
        await h.result(2, status="failed")
        assert await badge() == {"status": "failed", "sha": SHAS[0], "builds": [1, 2]}
        await h.commit(sha=SHAS[1])                              # runs: the badge still says failed
        assert (await badge())["status"] == "failed"
        await h.settle()
        await h.result(3)
        assert await badge() == {"status": "passed", "sha": SHAS[1], "builds": [3]}
        await h.commit(sha=SHAS[2], subject="docs [skip ci]")     # skipped says nothing about the code
        assert (await badge())["status"] == "passed"
        assert (await badge("dev"))["status"] == "unknown"
    finally:
        h.store.close()


# ---------------------------------------------------------------- log windows

def numbered(lines: int, width: int = 20) -> bytes:
    return b"".join(f"line {n}".ljust(width - 1).encode() + b"\n" for n in range(1, lines + 1))


def test_a_window_of_a_log_bigger_than_a_chunk_numbers_its_lines(tmp_path):
    path = tmp_path / "7.log"
    path.write_bytes(numbered(150_000))          # 3 MB: three chunks
    lines = LogLines()
    tail = lines.read(path, 7, 4000, final=True)
    assert tail.size == 3_000_000 and tail.data.endswith(b"line 150000".ljust(19) + b"\n")
    assert tail.data.startswith(b"line 149801 ") and tail.line == 149_801     # starts at a whole line
    assert tail.offset == 149_800 * 20
    at = lines.read(path, 7, 100, final=True, line=120_000)
    assert at.offset == 119_999 * 20 and at.line == 120_000 and at.data.startswith(b"line 120000 ")
    first = lines.read(path, 7, 100, final=True, offset=0)
    assert first.line == 1 and first.data.startswith(b"line 1 ")
    mid = lines.read(path, 7, 100, final=True, offset=CHUNK + 5)     # inside a line: from the next one
    assert mid.line == (CHUNK + 5) // 20 + 2 and mid.offset == ((CHUNK + 5) // 20 + 1) * 20
    assert mid.data.startswith(f"line {mid.line} ".encode())
    one = tmp_path / "9.log"
    one.write_bytes(b"x" * 500)                                          # no line starts in the window
    assert lines.read(one, 9, 100, final=True, offset=50) == Window(b"x" * 100, 50, 1, 500)
    past = lines.read(path, 7, 100, final=True, line=10**9)           # past the end: the tail
    assert past.offset + len(past.data) == past.size
    assert lines.read(tmp_path / "8.log", 8, 100, final=True).size == 0


def test_a_window_never_splits_a_character(tmp_path):
    path = tmp_path / "1.log"
    path.write_bytes("é".encode() * 10)          # 20 bytes, each character two
    lines = LogLines()
    assert lines.read(path, 1, 5, final=False, offset=0).data == "éé".encode()    # the third waits
    assert lines.read(path, 1, 4, final=False, offset=1).data == "é".encode()     # starts at a character
    assert lines.read(path, 1, 5, final=True, offset=15).data == "éé".encode()    # the log's last two


@scenario
async def test_the_log_window_request(tmp_path):
    h = Harness(tmp_path)
    try:
        await h.commit()
        await h.register()
        text = "".join(f"out {n}\n" for n in range(1, 2001))
        await h.log(1, 0, text)
        reply = await h.call({"type": "log_window", "build": 1, "limit": 1000}, protocol.READER)
        assert reply["status"] == "running" and reply["data"].endswith("out 2000\n")
        assert reply["offset"] + len(reply["data"].encode()) == reply["size"]
        assert h.text(1).splitlines()[reply["line"] - 1] == reply["data"].splitlines()[0]
        line = await h.call({"type": "log_window", "build": 1, "line": 3, "limit": 20}, protocol.READER)
        assert h.text(1).splitlines()[2] == line["data"].splitlines()[0] and line["line"] == 3
        missing = await h.call({"type": "log_window", "build": 99}, protocol.READER)
        assert (missing["type"], missing["code"]) == ("error", "not_found")
    finally:
        h.store.close()


@scenario
async def test_counts_of_builds_finished_since(tmp_path):
    h = Harness(tmp_path)
    try:
        for sha in SHAS[:3]:
            await h.commit(sha=sha)
        await h.register()
        await h.result(1)
        await h.settle()
        h.now += 10
        await h.result(2, status="failed")
        reply = await h.call({"type": "counts", "since": 0}, protocol.READER)
        assert reply["counts"] == {"passed": 1, "failed": 1}
        reply = await h.call({"type": "counts", "since": h.now - 5}, protocol.READER)
        assert reply["counts"] == {"failed": 1}
    finally:
        h.store.close()


@scenario
async def test_a_results_steps_are_kept_and_shown_with_the_build(tmp_path):
    h = Harness(tmp_path)
    try:
        await h.commit()
        await h.register()
        steps = [{"name": "lint", "run": "make lint", "exit_code": 0, "duration": 1.5},
                 {"name": "", "run": "make test", "exit_code": None, "duration": 60.0}]
        running = await h.call({"type": "build", "build": 1}, protocol.READER)
        assert "steps" not in running["build"]
        await h.result(1, status="failed", step_results=steps)
        reply = await h.call({"type": "build", "build": 1}, protocol.READER)
        assert reply["build"]["steps"] == steps and reply["build"]["status"] == "failed"
        h.store.close()
        again = Store(tmp_path / "data")                     # kept on disk
        assert again.steps(1) == steps and again.steps(99) is None
        again.close()
    finally:
        h.store.close()
