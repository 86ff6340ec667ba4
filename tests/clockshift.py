"""`tinyci dispatcher` with its wall clock stepped by the test, as NTP steps it.

    python -m tests.clockshift FLAGS...     (= tinyci dispatcher FLAGS...)

``time.time`` is replaced, before ci is imported, by the real time plus an
offset in seconds read from the file named by $CLOCKSHIFT_FILE (re-read by a
thread every 20 ms; 0 until the file exists; write it with a rename). ``time.monotonic`` is left
alone, as a real step leaves it. The test writes the file to step the clock of
the running dispatcher; nothing in ci knows about it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    source = Path(os.environ["CLOCKSHIFT_FILE"])
    real = time.time
    offset = [0.0]

    def read() -> None:
        try:
            offset[0] = float(source.read_text())
        except (OSError, ValueError):
            pass        # missing (0 until written), or caught half written: keep the last offset

    def follow() -> None:
        while True:
            read()
            time.sleep(0.02)

    read()
    threading.Thread(target=follow, name="clockshift", daemon=True).start()
    time.time = lambda: real() + offset[0]
    from ci.cli import main as cli
    return cli(["dispatcher", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
