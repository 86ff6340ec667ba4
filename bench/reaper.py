"""Run a command and report its own figures: ``python -I -S reaper.py FD CMD...``
forks CMD, waits for it, and writes "SECONDS MAXRSS_KIB STATUS" to file
descriptor FD (see ``bench.data.Measured``).

Linux counts in a child's rusage the memory of the process it was forked from:
at exec it keeps the larger of the old and new peaks. Waited for from the bench
(~90 MiB by then), a tool "peaked" at the larger of the bench's size and its
own. Forked from this small process instead, at worst a tool smaller than it
(~9 MiB) shows its size. Standard library only, run with -I -S: the smaller
this process, the lower that floor, and no module beside it is taken for one of
the standard library's.
"""

import os
import signal
import sys
import time


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(fd)
        # what Popen's restore_signals does: Python ignores these, and an exec keeps an ignored signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        try:
            os.execvp(argv[2], argv[2:])
        except OSError as exc:
            os.write(2, f"{argv[2]}: {exc}\n".encode())
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    os.write(fd, b"%.6f %d %d" % (time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    main(sys.argv)
