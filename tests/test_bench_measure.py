"""The bench's figures for a tool are the tool's own: its peak memory is not the bench's.

Linux keeps, in a child's rusage, the larger of the peaks before and after exec, so a tool waited for
straight from a large process reported that process's size. These run real processes."""

import signal
import subprocess
import sys

from bench.data import Measured

MIB = 1 << 20


def test_a_small_tools_peak_is_its_own_under_a_large_parent():
    ballast = bytearray(256 * MIB)
    ballast[::4096] = b"\1" * (len(ballast) // 4096)     # resident, not just reserved
    seconds, rss, status = Measured([sys.executable, "-S", "-c", "pass"]).wait()
    assert status == 0 and seconds > 0
    assert rss < 64, f"a bare interpreter reported {rss:.0f} MiB: the parent's {len(ballast) // MIB} MiB leaked in"


def test_a_tools_own_growth_and_exit_status_are_reported():
    grow = "b = bytearray(96 << 20); b[::4096] = b'\\1' * (len(b) // 4096); raise SystemExit(3)"
    seconds, rss, status = Measured([sys.executable, "-S", "-c", grow], stderr=subprocess.DEVNULL).wait()
    assert status == 3
    assert rss >= 96, f"a child that touched 96 MiB reported {rss:.0f} MiB"


def test_a_command_that_cannot_start_is_exit_127_and_says_why():
    run = Measured(["/nonexistent/tinyci"], stderr=subprocess.PIPE)
    _, _, status = run.wait()
    assert status == 127
    assert b"/nonexistent/tinyci: " in run.err and b"No such file" in run.err


def test_the_tool_gets_default_signals_as_from_popen():
    """Python ignores SIGPIPE and SIGXFSZ, and an exec keeps an ignored signal: a tool started from the
    reaper must not inherit that (`cp`, `git` and `head` rely on SIGPIPE), as Popen sees to."""
    run = Measured(["cat", "/proc/self/status"], stdout=subprocess.PIPE)
    _, _, status = run.wait()
    assert status == 0
    ignored = int(next(line for line in run.out.decode().splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the tool"
