"""A daemon's log file rotates by size, and a stderr pointed at it (as
`tinyci up` points its children's) follows it; a log file that cannot be
written is one line at start-up. Each case in a process of its own: it
changes the process's logging and its stderr."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from conftest import ROOT, child_env

ROTATE = """
import logging, os, sys
from ci import daemon
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.dup2(fd, 2)                                  # as `tinyci up` starts its children
handler = daemon.RotatingLog(path, max_bytes=4000, backups=2)
handler.addFilter(daemon.PlainRecords())
logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s", force=True)
for i in range(300):
    logging.getLogger("ci.test").info("record %03d %s", i, "x" * 40)
print("printed on stderr after the rotations", file=sys.stderr, flush=True)
"""


def test_the_log_rotates_by_size_and_stderr_follows_it(tmp_path):
    log = tmp_path / "dispatcher.log"
    done = subprocess.run([sys.executable, "-c", ROTATE, str(log)], env=child_env(), cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["dispatcher.log", "dispatcher.log.1", "dispatcher.log.2"]      # two kept, the rest gone
    assert all(p.stat().st_size <= 4000 for p in tmp_path.iterdir())
    current = log.read_text()
    assert "record 299" in current and current.endswith("printed on stderr after the rotations\n")
    assert "record 299" not in (tmp_path / "dispatcher.log.1").read_text()


def test_a_log_file_that_cannot_be_opened_is_one_line(tmp_path):
    target = tmp_path / "no-such-dir" / "dispatcher.log"
    done = subprocess.run([sys.executable, "-m", "ci", "dispatcher", "--port", "0", "--data", str(tmp_path / "d"),
                           "--log-file", str(target)], env=child_env(), cwd=tmp_path, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"tinyci dispatcher: cannot write its log file {target}: No such file or directory\n"


FULL = """
import logging, os, sys
from ci import daemon
handler = daemon.RotatingLog(sys.argv[1])
logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s", force=True)
real = handler.stream
handler.stream = open("/dev/full", "w")          # every write: ENOSPC
for i in range(50):
    logging.getLogger("ci.test").info("record %d", i)
handler.stream = real
logging.getLogger("ci.test").info("room again")
"""


def test_records_lost_to_a_full_disk_are_counted_not_each_a_traceback(tmp_path):
    log = tmp_path / "d.log"
    done = subprocess.run([sys.executable, "-c", FULL, str(log)], env=child_env(), cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert log.read_text() == "50 log record(s) were lost here: the log file could not be written\nroom again\n"


NOT_A_FILE = """
import logging, os, sys, threading
from ci import daemon
fifo = sys.argv[1]
got = []
reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
reader.start()
handler = daemon.RotatingLog(fifo, max_bytes=100, backups=2)
logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s", force=True)
for i in range(50):
    logging.getLogger("ci.test").info("record %03d %s", i, "x" * 40)
handler.close()
reader.join(30)
print(got[0].count(b"\\n"), "records read")
"""


def test_a_log_that_is_not_a_regular_file_is_never_rotated(tmp_path):
    """A log pointed at a fifo (or /dev/null) takes every record, however many
    bytes: renaming it aside and making a regular file in its place would break it."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-c", NOT_A_FILE, str(fifo)], env=child_env(), cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "50 records read\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.fifo"] and stat.S_ISFIFO(fifo.stat().st_mode)


STAMPS = """
import logging, sys, time
from ci import daemon
daemon.setup_logging("dispatcher", False, sys.argv[1])
log = logging.getLogger("ci.test")
base = time.mktime((2026, 12, 1, 10, 20, 30, 0, 0, -1))
for offset, text in ((0.1, "first"), (0.9, "same second"), (1.0, "next second \\x1b[2Jx")):
    record = log.makeRecord("ci.test", logging.INFO, "f", 1, "%s", (text,), None)
    record.created = base + offset
    log.handle(record)
"""


def test_each_record_has_the_time_it_was_made_and_its_message_made_plain(tmp_path):
    """The formatter keeps the time's text for the second it was made in: a
    record in the next second has its own; a peer's escape never gets through."""
    out = tmp_path / "d.log"
    done = subprocess.run([sys.executable, "-c", STAMPS, str(out)], env=child_env(), cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines() == ["10:20:30 dispatcher INFO first", "10:20:30 dispatcher INFO same second",
                                            "10:20:31 dispatcher INFO next second x"]
