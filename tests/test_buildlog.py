"""The attempt's log file: UTF-8 written and flushed at once (the sender reads
it as it grows), lines of the runner's own always start on a fresh line, and
nothing is written after it is closed."""

from __future__ import annotations

from ci.buildlog import BuildLog


def test_writes_are_on_disk_at_once_and_counted(tmp_path):
    woken = []
    log = BuildLog(tmp_path / "1-1.log", lambda: woken.append(log.size))
    log.write("héllo")
    assert (tmp_path / "1-1.log").read_bytes() == "héllo".encode()     # flushed, not buffered
    assert log.size == len("héllo".encode()) and woken == [log.size]
    log.write("")
    assert len(woken) == 1, "an empty write wakes nobody"
    log.line("[exit 0 after 0.01s]")        # the step's output did not end its line
    log.write("next\n")
    log.line("[done]")
    log.close()
    assert (tmp_path / "1-1.log").read_text() == "héllo\n[exit 0 after 0.01s]\nnext\n[done]\n"
    assert log.size == (tmp_path / "1-1.log").stat().st_size
    log.write("after the end")
    log.close()
    assert log.size == (tmp_path / "1-1.log").stat().st_size


def test_text_that_is_not_valid_unicode_is_replaced(tmp_path):
    log = BuildLog(tmp_path / "2-1.log")
    log.write("bad \udcff surrogate\n")
    log.close()
    assert (tmp_path / "2-1.log").read_text() == "bad ? surrogate\n"
