"""The durable outbox on a real directory (an entry whole or absent, damaged
entries set aside, a log shorter than promised, leftovers swept) and the
``Delivery`` of one attempt's log and result to a fake dispatcher in this
process (resent from the offset the dispatcher names, refusals retried,
stale leases dropped)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ci.outbox import ACCEPTED, MAX_CHUNK, STALE, Delivery, Outbox

from runner_support import FakeDispatcher, wait_until


def result(build: int, attempt: int = 1, log_size: int = 0, **fields) -> dict:
    return {"build": build, "attempt": attempt, "status": "passed", "exit_code": 0, "steps": 1,
            "duration": 0.5, "log_size": log_size, **fields}


def test_saved_results_load_oldest_first(tmp_path):
    box = Outbox(tmp_path)
    assert box.load() == []
    box.log_path(12, 1).write_text("twelve\n")
    box.save(result(12, log_size=7))
    box.save(result(3, 2))
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["12-1.json", "3-2.json"]
    assert json.loads((tmp_path / "outbox" / "12-1.json").read_text()) == result(12, log_size=7)
    assert box.load() == [result(3, 2), result(12, log_size=7)]
    box.discard(12, 1)
    assert not box.log_path(12, 1).exists()
    assert Outbox(tmp_path).load() == [result(3, 2)]


def test_damaged_entries_are_set_aside_and_half_writes_forgotten(tmp_path, caplog):
    box = Outbox(tmp_path)
    entries = tmp_path / "outbox"
    (entries / "1-1.json").write_text('{"build": 1, "attempt": 1, "status": "pass')
    (entries / "2-1.json").write_text(json.dumps(result(2, status="sideways")))
    (entries / "3-1.json").write_text(json.dumps(result(4)))          # not the file's build
    (entries / "5-1.json").write_text(json.dumps({"build": 5, "attempt": 1}))
    (entries / "6-1.json.tmp").write_text(json.dumps(result(6)))      # a crash before the rename
    (entries / "7-1.tmp").write_text("")
    (entries / "notes.txt").write_text("not ours\n")
    box.save(result(8))
    assert box.load() == [result(8)]
    assert sorted(p.name for p in entries.iterdir()) == [
        "1-1.bad", "2-1.bad", "3-1.bad", "5-1.bad", "8-1.json", "notes.txt"]
    assert "outbox entry" in caplog.text and "moved it to 3-1.bad" in caplog.text


def test_a_log_shorter_than_its_entry_promises_only_what_is_left(tmp_path):
    box = Outbox(tmp_path)
    box.log_path(9, 1).write_text("abc")
    box.save(result(9, log_size=100))
    assert box.load() == [result(9, log_size=3)]


def test_sweep_logs_keeps_only_the_logs_of_pending_results(tmp_path):
    box = Outbox(tmp_path)
    for name in ("1-1.log", "2-1.log", "2-2.log", "other.log", "3-x.log"):
        (box.logs / name).write_text("x")
    box.sweep_logs({(2, 1)})
    assert sorted(p.name for p in box.logs.iterdir()) == ["2-1.log", "3-x.log", "other.log"]


def test_a_delivery_streams_the_log_then_sends_the_result(tmp_path):
    box = Outbox(tmp_path)
    path = box.log_path(7, 1)

    async def scenario():
        fake = await FakeDispatcher().start()
        delivery = Delivery(fake.client(), 7, 1, path, max_bulk=8192)
        try:
            path.write_bytes(b"")
            task = asyncio.ensure_future(delivery.run())
            text = "é€😀" * 5000 + "\n"         # several frames, cut between characters
            with open(path, "ab") as f:
                f.write("first line\n".encode())
                f.flush()
                delivery.wake()
                await wait_until(lambda: fake.log_text(7) == "first line\n", "the first line")
                f.write(text.encode())
            final = result(7, log_size=path.stat().st_size)
            delivery.finish(final)
            assert await asyncio.wait_for(task, 10) == ACCEPTED
            assert fake.log_text(7) == "first line\n" + text
            assert fake.results[7] == {"type": "result", **final}
        finally:
            await delivery.client.close()
            fake.close()

    asyncio.run(scenario())


def test_a_dispatcher_that_lost_the_log_gets_it_again_from_its_offset(tmp_path):
    box = Outbox(tmp_path)
    path = box.log_path(8, 1)
    path.write_text("0123456789" * 10)

    async def scenario():
        fake = await FakeDispatcher().start()
        fake.logs[(8, 1)] = bytearray(b"0123456789")    # it has the first 10 bytes only
        # a runner restarted with this result in its outbox believes all 100 bytes were sent
        delivery = Delivery(fake.client(), 8, 1, path, start=100, result=result(8, log_size=100))
        try:
            assert await asyncio.wait_for(delivery.run(), 10) == ACCEPTED
            assert fake.log_text(8) == "0123456789" * 10
            assert fake.results[8]["log_size"] == 100
        finally:
            await delivery.client.close()
            fake.close()

    asyncio.run(scenario())


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_refused_results_are_retried_and_a_stale_lease_ends_the_delivery(tmp_path, caplog):
    box = Outbox(tmp_path)
    path = box.log_path(9, 1)
    path.write_text("still running\n")

    async def scenario():
        fake = await FakeDispatcher().start()
        fake.refuse_results = True
        delivery = Delivery(fake.client(), 9, 1, path, result=result(9, log_size=14))
        other = Delivery(fake.client(), 10, 1, box.log_path(10, 1))
        try:
            task = asyncio.ensure_future(delivery.run())
            await wait_until(lambda: len(fake.result_tries) >= 3, "the result to be sent again")
            assert not task.done()
            fake.refuse_results = False
            assert await asyncio.wait_for(task, 10) == ACCEPTED
            # one warning for the whole outage, however many tries
            assert caplog.text.count("cannot deliver its result") == 1
            assert "delivering to the dispatcher" in caplog.text

            fake.stale_at[10] = "given away"
            box.log_path(10, 1).write_text("given away\n")
            other.wake()
            assert await asyncio.wait_for(other.run(), 10) == STALE
            assert 10 not in fake.results
        finally:
            await delivery.client.close()
            await other.client.close()
            fake.close()

    caplog.set_level("INFO", logger="ci.outbox")
    asyncio.run(scenario())


def test_a_log_frame_fits_the_bulk_limit(tmp_path):
    def chunk(bulk: int) -> int:
        return Delivery(None, 1, 1, tmp_path / "1-1.log", max_bulk=bulk).chunk

    # the bytes go raw (a bulk frame), nothing escaped: MAX_CHUNK, or less with a smaller bulk limit
    assert chunk(64 << 20) == MAX_CHUNK
    assert chunk(8192) == 8192
    assert chunk(100) == 1024           # never below 1 KiB
