"""The dispatcher's bounds, its handlers fed messages directly (the harness of
test_dispatcher.py): unfinished artifact uploads count against
``max_artifact_bytes`` and go when their attempt ends, and offsets far past
the end of a log or an artifact are the end, not an internal error."""

from __future__ import annotations

import logging
import os

import pytest

from ci import protocol

from test_dispatcher import SHA, Harness, codes, scenario

LIMIT = 1000


@pytest.fixture
def make(tmp_path):
    """``make(**dispatcher_keys)`` -> a Harness over the data dir in tmp_path (again: a restart)."""
    made: list[Harness] = []

    def build(**dispatcher) -> Harness:
        made.append(Harness(tmp_path, **dispatcher))
        return made[-1]

    yield build
    for h in made:
        h.store.close()


async def chunk(h: Harness, path: str, offset: int, size: int, eof: bool = False, build: int = 1,
                attempt: int = 1) -> dict:
    data = b"x" * size
    return await h.call({"type": "artifact", "build": build, "attempt": attempt, "path": path,
                         "offset": offset, "data": data, "eof": eof}, protocol.RUNNER, id="r1")


def on_disk(h: Harness, build: int = 1) -> dict[str, int]:
    """Every file under the build's artifact directory: relative path -> size."""
    base = h.d.artifacts.directory(build, SHA)
    return {os.path.relpath(os.path.join(folder, name), base): os.path.getsize(os.path.join(folder, name))
            for folder, _, names in os.walk(base) for name in names}


async def running(make) -> Harness:
    h = make(max_artifact_bytes=LIMIT)
    await h.commit()
    await h.register()
    assert h.build(1).attempt == 1 and h.build(1).runner == "r1"
    return h


@scenario
async def test_uploads_without_their_last_chunk_count_against_the_cap(make):
    h = await running(make)
    assert (await chunk(h, "a.bin", 0, 600))["offset"] == 600        # never finished
    refused = await chunk(h, "b.bin", 0, 600)
    assert codes(refused) == ("error", "too_large") and "max_artifact_bytes" in refused["message"]
    assert on_disk(h) == {"a.bin": 600}
    # what fits still goes, and a file refused half-way is removed at once
    assert (await chunk(h, "c.bin", 0, 300))["offset"] == 300
    assert codes(await chunk(h, "c.bin", 300, 300)) == ("error", "too_large")
    assert on_disk(h) == {"a.bin": 600}
    assert (await chunk(h, "d.bin", 0, 400, eof=True))["offset"] == 400
    assert (await h.call({"type": "artifacts", "build": 1}, protocol.READER))["artifacts"] == [
        {"path": "d.bin", "size": 400}]
    # the result ends the attempt: the unfinished file goes, the finished one stays
    await h.result(1)
    assert on_disk(h) == {"d.bin": 400}
    assert h.d.artifacts.partial == {}


@scenario
async def test_a_chunk_is_written_while_the_next_arrives_and_the_last_answers_for_all(make):
    h = await running(make)
    pieces = [os.urandom(n) for n in (100, 200, 300, 50)]
    offset, answers = 0, []
    for i, piece in enumerate(pieces):
        answers.append((await h.call({"type": "artifact", "build": 1, "attempt": 1, "path": "a.bin", "offset": offset,
                                      "data": piece, "eof": i == len(pieces) - 1}, protocol.RUNNER, id="r1"))["offset"])
        offset += len(piece)
    assert answers == [100, 100, 300, 650]      # the first's own size, then what was written before each, then all
    assert (h.d.artifacts.directory(1, SHA) / "a.bin").read_bytes() == b"".join(pieces)
    assert h.d.artifacts.list(1) == [{"path": "a.bin", "size": 650}] and h.d.artifacts.partial[1].writing == {}


@scenario
async def test_a_chunk_written_in_the_background_that_fails_is_the_next_ones_error(make):
    h = await running(make)
    assert (await chunk(h, "a.bin", 0, 100))["offset"] == 100
    assert (await chunk(h, "a.bin", 100, 100))["offset"] == 100        # its write goes on meanwhile
    writing = h.d.artifacts.partial[1].writing["a.bin"]
    await writing
    (h.d.artifacts.directory(1, SHA) / "a.bin").unlink()            # lost under it: the next write fails
    assert (await chunk(h, "a.bin", 200, 100))["offset"] == 200
    refused = await chunk(h, "a.bin", 300, 100, eof=True)
    assert codes(refused) == ("error", "offset") and "has 0 bytes, not 200" in refused["message"]


@scenario
async def test_a_chunk_behind_a_refused_one_is_out_of_step_and_logged_once(make, caplog):
    h = await running(make)
    assert (await chunk(h, "c.bin", 0, 600))["offset"] == 600
    with caplog.at_level(logging.WARNING):
        assert codes(await chunk(h, "c.bin", 600, 600)) == ("error", "too_large")
        assert codes(await chunk(h, "c.bin", 1200, 600)) == ("error", "offset")    # was on its way already
    assert [r.getMessage() for r in caplog.records] == [
        "build 1: artifact 'c.bin' refused: artifacts of build 1 would exceed 1000 bytes "
        "(dispatcher.max_artifact_bytes)"]
    assert on_disk(h) == {}


@scenario
async def test_a_lost_runner_or_a_cancel_removes_the_unfinished_uploads(make):
    h = await running(make)
    await chunk(h, "dir/a.bin", 0, 500)
    h.d.apply(h.d.sched.lost("r1", "missed its pings", h.mono))     # build 1 queued again
    assert h.build(1).status.value == "queued"
    assert on_disk(h) == {}
    await h.register()                              # r1 is back, attempt 2 runs
    assert h.build(1).attempt == 2
    await chunk(h, "b.bin", 0, 500, attempt=2)
    assert await h.call({"type": "cancel", "build": 1}) == {"type": "ok", "builds": [1]}
    assert on_disk(h) == {}
    # the cancelled runner sends on: nothing is kept, nor made by a chunk out of step
    assert codes(await chunk(h, "b.bin", 500, 100, attempt=2)) == ("error", "offset")
    assert on_disk(h) == {}


@scenario
async def test_a_restarted_dispatcher_still_counts_and_removes_what_was_half_sent(make, tmp_path):
    h = await running(make)
    await chunk(h, "a.bin", 0, 700)
    h.store.close()
    again = make(max_artifact_bytes=LIMIT)          # the same data dir: a restart
    assert codes(await chunk(again, "b.bin", 0, 700)) == ("error", "too_large")
    # a chunk between the first and the last is answered with what was written before it
    assert (await chunk(again, "a.bin", 700, 100))["offset"] == 700
    assert (await chunk(again, "a.bin", 800, 50))["offset"] == 800
    await again.result(1)
    assert on_disk(again) == {}


@scenario
async def test_offsets_past_the_end_are_the_end(make, caplog):
    h = await running(make)
    await h.log(1, 0, "hello\n")
    await chunk(h, "a.txt", 0, 10, eof=True)
    await h.result(1)
    size = h.d.logs.size(1)
    with caplog.at_level(logging.WARNING):
        for offset in (size, size + 1, 2**40, 2**62):
            frames = await h.stream({"type": "read_log", "build": 1, "offset": offset})
            assert frames == [{"type": "end", "status": "passed", "offset": size}], offset
            fetched = await h.call({"type": "fetch_artifact", "build": 1, "path": "a.txt", "offset": offset},
                                   protocol.READER)
            assert (fetched["type"], fetched["data"], fetched["eof"], fetched["size"]) == ("ok", b"", True, 10)
            streamed = await h.stream({"type": "read_artifact", "build": 1, "path": "a.txt", "offset": offset})
            assert streamed == [{"type": "ok", "size": 10}, {"type": "end", "offset": 10}]
    assert "Traceback" not in caplog.text and not caplog.records
