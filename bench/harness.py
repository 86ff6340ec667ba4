"""What every scenario shares: real daemons started by the tests' launcher
(tests/daemons.py: ``python -m ci <daemon>`` on 127.0.0.1 port 0 in a temp
dir), real git repositories, a dispatcher client, statistics and the
machine's facts.

Every wait is bounded; every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ci import net, protocol
from tests import daemons
from tests.daemons import GIT_ENV, Cluster, wait_until

__all__ = ["GIT_ENV", "Cluster", "Figure", "Result", "Repo", "Reader", "FINAL", "cluster", "cpu_seconds",
           "machine", "median", "pct", "request", "rss_mb", "wait_for"]


# ---------------------------------------------------------------- figures

@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    target: str = ""            # e.g. "< 50"; empty when there is none
    met: bool | None = None
    note: str = ""


@dataclass
class Result:
    scenario: str
    figures: list[Figure] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def add(self, name: str, value: float | None, unit: str, target: str = "", note: str = "") -> Figure:
        met = None
        if target and value is not None:
            op, limit = target.split()
            met = value < float(limit) if op == "<" else value >= float(limit)
        fig = Figure(name, None if value is None else round(value, 4), unit, target, met, note)
        self.figures.append(fig)
        return fig


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "python": platform.python_version(), "git": git.removeprefix("git version "),
            "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ---------------------------------------------------------------- processes

def profile_dir() -> Path | None:
    """BENCH_PROFILE=<dir>: profile the dispatcher and runners with cProfile there."""
    where = os.environ.get("BENCH_PROFILE")
    return Path(where) if where else None


def cluster(tmp: Path, steps: list[str], dispatcher: dict | None = None, net_cfg: dict | None = None) -> Cluster:
    """Real daemons under ``tmp`` (the shared launcher's Cluster), profiled when BENCH_PROFILE asks."""
    return Cluster(tmp, steps=steps, dispatcher_keys=dispatcher or {},
                   sections={"net": net_cfg} if net_cfg else {}, profile=profile_dir())


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------- git

class Repo(daemons.Repo):
    """The launcher's repository, plus timed commits and commits in bulk."""

    def timed_commit(self, message: str, env: dict | None = None) -> tuple[str, float, float]:
        """Commit a change; returns (sha, time before, time after `git commit` returned)."""
        (self.path / "file.txt").write_text(f"{message}\n{time.time()}\n")
        self.git("add", "-A")
        before = time.time()
        self.git("commit", "-q", "-m", message, env=env)
        after = time.time()
        return self.head(), before, after

    def many(self, count: int, branch: str = "main") -> list[str]:
        """``count`` commits on ``branch`` at once (git fast-import); returns their shas, oldest first."""
        now = int(time.time())
        parts = []
        for i in range(count):
            body = f"change {i} {time.time()}\n"
            msg = f"bench commit {i}"
            parts.append(f"commit refs/heads/{branch}\nmark :{i + 1}\n"
                         f"committer Bench <bench@example.com> {now} +0000\n"
                         f"data {len(msg)}\n{msg}\n"
                         + (f"from refs/heads/{branch}^0\n" if i == 0 else "")
                         + f"M 644 inline file.txt\ndata {len(body)}\n{body}\n")
        self.git("fast-import", "--quiet", input="".join(parts) + "done\n")
        return self.git("rev-list", "--reverse", f"{branch}~{count}..{branch}").split()


# ---------------------------------------------------------------- talking to the dispatcher

def request(addr: str, msg: dict, role: str = protocol.READER, to: str = protocol.DISPATCHER_ID) -> dict:
    """One request to ``addr``, the daemon ``to`` names (the handshake checks whom it reached)."""
    return asyncio.run(net.call(addr, msg, role, timeout=30, to=to))


class Reader:
    """A kept connection to the dispatcher for repeated status requests, on its own loop."""

    def __init__(self, addr: str):
        self.loop = asyncio.new_event_loop()
        self.client = net.Client(*net.parse_addr(addr), protocol.READER)

    def status(self, limit: int = 50) -> dict:
        return self.loop.run_until_complete(self.client.request({"type": "status", "limit": limit}, 30))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def wait_for(what: str, predicate, timeout: float, every: float = 0.01):
    """``wait_until`` riding out a dispatcher that refuses connections for a moment."""
    return wait_until(predicate, timeout, what, every=every, tolerate=(net.PeerError, OSError))


FINAL = ("passed", "failed", "error", "cancelled")
