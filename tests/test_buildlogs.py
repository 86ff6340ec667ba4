"""Build logs: the offset rule, per-attempt sizes, the dispatcher's own lines, the cap, reads."""

from __future__ import annotations

import pytest

from ci.buildlogs import BuildLogs, LogGap
from ci.models import Build, Status

SHA = "d" * 40


@pytest.fixture
def logs(tmp_path):
    return BuildLogs(tmp_path / "logs", 1 << 20)


def running(n=1, attempt=1):
    return Build(n, "/repo", "main", SHA, status=Status.RUNNING, attempt=attempt, runner="r1")


def started(logs, build, first="=== attempt 1 ==="):
    """As a hand-out does it: the first line, then the attempt begins after it."""
    sizes = logs.first_lines([(build.id, first)])
    logs.begin(build, sizes[build.id])
    return build


def test_offsets_count_only_the_runners_bytes_of_the_attempt(logs):
    build = started(logs, running())
    assert logs.append(build, 0, b"one\n") == (4, True)
    with pytest.raises(LogGap) as gap:
        logs.append(build, 9, b"later\n")
    assert gap.value.expected == 4
    assert logs.append(build, 2, b"e\ntwo\n") == (8, True)        # the overlap is skipped
    assert logs.append(build, 0, b"one\n") == (8, False)          # nothing new
    assert logs.path(1).read_text() == "=== attempt 1 ===\none\ntwo\n"


def test_sizes_are_kept_in_memory_and_rebuilt_from_disk(tmp_path, logs):
    build = started(logs, running())
    logs.append(build, 0, b"abc")
    assert logs.sizes == {1: 3}
    again = BuildLogs(tmp_path / "logs", 1 << 20)     # a restarted dispatcher
    assert again.attempt_size(build) == 3
    assert again.append(build, 3, b"def") == (6, True)


def test_a_line_of_the_dispatchers_own_ends_the_runners_unfinished_line(logs):
    build = started(logs, running())
    logs.append(build, 0, b"no newline")
    size = logs.line(1, "=== passed ===")
    assert logs.path(1).read_text().endswith("no newline\n=== passed ===\n")
    assert size == logs.size(1)


def test_a_line_written_while_the_attempt_sends_moves_its_base(logs):
    build = started(logs, running())
    logs.append(build, 0, b"step one\n")
    logs.line(1, "=== cancelled by ada ===", sending=build)
    # the runner goes on from its own count, unaware of the line
    assert logs.attempt_size(build) == 9
    assert logs.append(build, 9, b"killed\n") == (16, True)
    assert logs.path(1).read_text() == "=== attempt 1 ===\nstep one\n=== cancelled by ada ===\nkilled\n"
    # and the count stays exact when read back from disk
    logs.sizes.clear()
    assert logs.attempt_size(build) == 16


def test_a_new_attempt_starts_after_what_the_earlier_one_left(logs):
    build = started(logs, running())
    logs.append(build, 0, b"first try\n")
    logs.line(1, "--- taken back; queued again ---")
    build.attempt = 2
    started(logs, build, "=== attempt 2 ===")
    assert logs.attempt_size(build) == 0
    assert logs.append(build, 0, b"second\n") == (7, True)


def test_over_the_cap_the_count_stays_exact_and_the_line_joins_the_tail(tmp_path):
    logs = BuildLogs(tmp_path, 2000)
    build = started(logs, running())
    sent = 0
    for n in range(500):
        line = f"output line {n:04d}\n".encode()
        sent = logs.append(build, sent, line)[0]
    assert sent == 500 * 17
    logs.line(1, "=== passed ===")
    text = logs.path(1).read_text()
    assert "output line 0000" in text and "output line 0499" in text and "output line 0250" not in text
    assert "bytes cut here" in text and text.endswith("=== passed ===\n")


def test_reads_never_end_inside_a_character_unless_asked(logs):
    logs.path(1).write_bytes("añb".encode()[:2])       # 'a' and the first byte of 'ñ'
    assert logs.read(1, 0, 100) == b"a"
    assert logs.read(1, 0, 100, whole=False) == b"a\xc3"
    assert logs.read(2, 0, 100) == b"" and logs.size(2) == 0


def test_a_log_removed_under_it_is_noted_and_counts_go_on(tmp_path):
    logs = BuildLogs(tmp_path / "logs", 1024)
    build = started(logs, running())
    logs.append(build, 0, b"a" * 100)
    assert logs.check(build) is None                        # as it should be: nothing said
    logs.path(1).unlink()
    assert logs.check(build) == "[log file was removed; continuing]"
    assert logs.append(build, 100, b"b\n") == (102, True)   # the runner's count goes on
    assert logs.path(1).read_text() == "[log file was removed; continuing]\nb\n"
    assert logs.check(build) is None                        # said once


def test_a_log_over_its_cap_grows_in_its_tail_and_is_not_taken_for_cut_short(tmp_path):
    logs = BuildLogs(tmp_path / "logs", 1024)
    build = started(logs, running())
    for n in range(10):
        logs.append(build, n * 300, b"x" * 299 + b"\n")
    assert logs.cap._paths(1)[1].exists() and logs.check(build) is None


def test_a_line_that_cannot_be_written_is_reported_and_skipped(tmp_path):
    errors = []
    logs = BuildLogs(tmp_path / "logs", 1024, on_error=lambda build, exc: errors.append((build, exc.errno)))
    logs.path(7).mkdir()                                    # where the log should be: not a file
    assert logs.line(7, "=== passed ===") == logs.path(7).stat().st_size
    assert [build for build, _ in errors] == [7]


def test_a_secret_the_runner_left_in_a_frame_is_hidden_keeping_the_offsets(tmp_path):
    value = "a-secret-value-123"
    logs = BuildLogs(tmp_path / "logs", 1 << 20, secrets=lambda build: ["unused-secret", value])
    build = started(logs, Build(1, "/repo", "main", SHA, status=Status.RUNNING, attempt=1, runner="r1",
                                secrets=("TOKEN",)))
    first = f"token={value}\n".encode()
    assert logs.append(build, 0, first) == (len(first), True)
    # a resent frame overlapping the first: skipped by offset, as ever
    assert logs.append(build, 6, f"{value}\nmore\n".encode()) == (len(first) + 5, True)
    text = logs.path(1).read_text()
    assert value not in text and "token=" + "*" * len(value) + "\nmore\n" in text
    # a build that asked for no secret is written as sent
    plain = started(logs, running(2))
    logs.append(plain, 0, value.encode())
    assert value in logs.path(2).read_text()


def test_arrival_times_are_held_until_taken_and_read_from_every_place_they_are(tmp_path):
    now = iter([100.0, 101.25, 102.5, 103.0])
    logs = BuildLogs(tmp_path / "logs", 1 << 20, clock=lambda: next(now))
    build = started(logs, running())                        # "=== attempt 1 ===\n" at 100.0
    logs.append(build, 0, b"one\n")                         # at offset 18, 101.25
    assert logs.times(1, 0, 22) == [[0, 100.0], [18, 101.25]]
    taken = logs.take_stamps()
    assert taken == {1: "0 100.000\n18 101.250\n"} and logs.take_stamps() == {}
    logs.append(build, 4, b"two\n")                         # at 22, 102.5: held, the rest stored
    assert logs.times(1, 20, 26, stored=taken[1]) == [[20, 101.25], [22, 102.5]]
    # a data dir from before the database kept them: its file is still read, first
    (tmp_path / "logs" / "2.times").write_text("0 50.000\n5 51.000\n")
    assert logs.times(2, 0, 10, stored="9 52.000\n") == [[0, 50.0], [5, 51.0], [9, 52.0]]


def test_arrival_times_that_could_not_be_saved_are_held_for_the_next_save(tmp_path):
    import sqlite3
    now = iter([10.0, 11.0, 12.0])
    logs = BuildLogs(tmp_path / "logs", 1 << 20, clock=lambda: next(now))
    build = started(logs, running())                # 0 at 10.0
    saved = []

    def full(times):
        raise sqlite3.OperationalError("database or disk is full")
    logs.save_times(full)
    logs.append(build, 0, b"one\n")                 # 18 at 11.0, noted while the first were held again
    logs.save_times(saved.append)
    assert saved == [{1: "0 10.000\n18 11.000\n"}] and logs.held_times(1) == []
