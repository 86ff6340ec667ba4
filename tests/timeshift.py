"""Run a tinyci command with the wall clock moved, for tests of what happens
days later (retention) without waiting days:

    python -m tests.timeshift SECONDS COMMAND [ARGS...]   ->   tinyci COMMAND ARGS...

where every ``time.time()`` in the process reads SECONDS later (negative:
earlier). The monotonic clock is left alone, as a clock step would leave it.
Patched before any ``ci`` module is imported, so that defaults bound at
import (``clock=time.time``) see the moved clock too.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    offset = float(argv[0])
    real = time.time
    time.time = lambda: real() + offset
    from ci.cli import main as tinyci
    return tinyci(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
