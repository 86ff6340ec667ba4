"""The real observer, with one probe: the wall-clock start of every scan is
appended to the file named by ``BENCH_SCAN_LOG``. latency-poll needs it to
tell the polling wait apart from the CI's own overhead; nothing else changes.

    python -m bench.observer_probe <observer flags>
"""

import os
import sys
import time

from ci import observer
from ci.cli import main


def probe() -> None:
    path = os.environ["BENCH_SCAN_LOG"]
    scan = observer.Observer.scan

    async def timed_scan(self, *args, **kwargs) -> None:      # whatever scan takes, passed on
        with open(path, "a") as out:
            out.write(f"{time.time():.6f}\n")
        await scan(self, *args, **kwargs)

    observer.Observer.scan = timed_scan


if __name__ == "__main__":
    probe()
    sys.exit(main(["observer", *sys.argv[1:]]))
