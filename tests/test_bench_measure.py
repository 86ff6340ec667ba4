"""The bench's figures for a tool are the tool's own: its peak memory is not the bench's.

Linux keeps, in a child's rusage, the larger of the peaks before and after exec, so a tool waited for
straight from a large process reported that process's size. These run real processes."""

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


def test_a_command_that_cannot_start_is_exit_127():
    _, _, status = Measured(["/nonexistent/tinyci"], stderr=subprocess.DEVNULL).wait()
    assert status == 127
