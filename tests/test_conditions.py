"""Conditions (one line when a trouble begins, at most one a minute while it
lasts, one when it clears) and the free-space reserve, with the clock and the
disk's free space set by the test."""

from __future__ import annotations

import logging

from ci.conditions import Conditions
from ci.diskspace import DISK_FULL, DiskSpace


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_condition_is_one_line_then_one_a_minute_then_one_when_it_clears(caplog):
    caplog.set_level(logging.INFO)
    clock, changes = Clock(), []
    conditions = Conditions(logging.getLogger("t"), clock=clock, wall=lambda: 1700000000.0,
                            on_change=lambda: changes.append(conditions.active()))
    for _ in range(400):                    # a request an eighth of a second, for fifty seconds
        conditions.report("disk_full", "disk full (1.0 MB free)", "build logs are refused")
        clock.now += 0.125
    assert lines(caplog) == ["disk full (1.0 MB free): build logs are refused [disk_full]"]
    clock.now += 15
    conditions.report("disk_full", "disk full (1.0 MB free)", "build logs are refused")
    assert lines(caplog)[1] == ("still disk full (1.0 MB free): build logs are refused [disk_full, 400 time(s) in the "
                                "last 65s, for 65s]")
    assert conditions.active() == [{"name": "disk_full", "message": "disk full (1.0 MB free)",
                                    "since": 1700000000.0}]
    assert "disk_full" in conditions and len(changes) == 1
    conditions.report("disk_full", "disk full (0.5 MB free)")
    assert len(changes) == 2 and len(caplog.records) == 2       # a new figure: watchers told, no new line
    clock.now += 200
    conditions.clear("disk_full", "room again")
    assert lines(caplog)[2] == "room again [disk_full cleared after 4m]"
    assert conditions.active() == [] and changes[-1] == []
    conditions.clear("disk_full")
    assert len(caplog.records) == 3                             # nothing held: nothing said


def test_no_record_of_a_condition_carries_a_traceback(caplog):
    conditions = Conditions(logging.getLogger("t"))
    conditions.report("peer_gone", "observer unreachable", "connection refused")
    assert all(r.exc_info is None and r.exc_text is None for r in caplog.records)


class Disk:
    def __init__(self, free: int):
        self.free, self.looks = free, 0

    def __call__(self, path: str):
        self.looks += 1
        return type("statvfs", (), {"f_bavail": self.free // 1024, "f_frsize": 1024})()


def space(free: int, reserve: int = 1 << 20):
    clock, disk = Clock(), Disk(free)
    conditions = Conditions(logging.getLogger("t"), clock=clock)
    return DiskSpace("/data", reserve, conditions, clock=clock, statvfs=disk), clock, disk, conditions


def test_the_reserve_is_looked_at_once_a_second_not_once_a_write():
    guard, clock, disk, _ = space(100 << 20)
    for _ in range(1000):
        assert guard.room(4096)
        clock.now += 0.0001
    assert disk.looks == 1                  # the writes are counted off the last figure in between
    clock.now += 1
    assert guard.room(4096) and disk.looks == 2


def test_a_write_into_the_reserve_is_refused_and_the_disk_counts_as_full_until_there_is_room():
    guard, clock, disk, conditions = space((1 << 20) + 8192)
    assert guard.room(4096)
    assert not guard.room(8192)             # would go below the reserve: refused, after looking again
    assert DISK_FULL in conditions and conditions.active()[0]["message"] == "disk full (1.1 MB free)"
    disk.free = (1 << 20) + 100_000         # a little room: not enough to stop flapping
    clock.now += 2
    assert not guard.room(10)
    disk.free = 10 << 20
    clock.now += 0.2                        # refused writes look again sooner than once a second
    assert guard.room(10) and DISK_FULL not in conditions


def test_a_disk_that_says_it_is_full_stops_the_room_at_once():
    guard, clock, disk, conditions = space(50 << 20)
    guard.exhausted("the database could not be written (database or disk is full)")
    assert not guard.room(1)
    assert "disk full" in conditions.active()[0]["message"]
    clock.now += 1.5                        # a look finds plenty: it was the quota, or someone freed space
    assert guard.room(1) and DISK_FULL not in conditions


def test_a_big_piece_of_a_log_is_stored_up_to_the_reserve_and_its_rest_refused():
    guard, clock, disk, conditions = space((1 << 20) + 10 * 1024)
    assert guard.fitting(b"a" * 4001) == b"a" * 4001          # fits: all of it
    piece = "é".encode() * 4000                             # 8000 bytes, two a character
    part = guard.fitting(piece)                             # 6239 bytes are left above the reserve
    assert part == piece[:6238] and DISK_FULL in conditions  # up to the reserve, at a character
    assert guard.fitting(b"more") == b""                     # the rest: refused
