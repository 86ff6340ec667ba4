"""What every scenario shares: real daemons started as a user starts them
(``python -m ci.<daemon>`` on 127.0.0.1 port 0 in a temp dir), real git
repositories, a dispatcher client, statistics and the machine's facts.

Every wait is bounded; every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ci import net, protocol

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"tinyci (\w+) listening on (\S+):(\d+)")
GIT_ENV = {"GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}


class BenchError(Exception):
    """A scenario could not be measured (a daemon failed, a wait ran out)."""


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

def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYCI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Daemon:
    """One daemon process; ``argv`` after ``python``."""

    def __init__(self, kind: str, argv: list[str], cwd: Path, log: Path, env: dict):
        self.kind, self.argv, self.cwd, self.log_path, self.env = kind, argv, cwd, log, env
        self.start()

    def start(self) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.stderr = open(self.log_path, "ab")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, *self.argv], cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=self.stderr, stdin=subprocess.DEVNULL, env=self.env, text=True)
        self.pid = self.proc.pid
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.kind} did not start:\n{self.log()}")
            match = READY.search(line)
            if match:
                self.ready = time.time()
                self.host, self.port = match.group(2), int(match.group(3))
                self.addr = f"{self.host}:{self.port}"
                return

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.stderr.close()

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far, from /proc/<pid>/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


class Cluster:
    """Real daemons under one temp dir, configured by one config.yaml."""

    def __init__(self, tmp: Path, steps: list[str], dispatcher: dict | None = None, net_cfg: dict | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.daemons: list[Daemon] = []
        self.config = tmp / "config.yaml"
        cfg = {"dispatcher": dispatcher or {}, "build": {"steps": steps, "timeout": 120}}
        if net_cfg:
            cfg["net"] = net_cfg
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = child_env()
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        self.disp: Daemon | None = None

    def start(self, kind: str, name: str, args: list[str], module: list[str] | None = None) -> Daemon:
        argv = (module or ["-m", f"ci.{kind}"]) + ["--config", str(self.config), *args]
        profile = os.environ.get("BENCH_PROFILE")       # a directory: profile the daemons with cProfile
        if profile and kind in ("dispatcher", "runner"):
            Path(profile).mkdir(parents=True, exist_ok=True)
            out = Path(profile) / f"{self.tmp.name}-{name}-{len(self.daemons)}.prof"
            argv = ["-m", "cProfile", "-o", str(out), *argv]
        d = Daemon(kind, argv, self.tmp, self.tmp / "logs" / f"{name}.log", self.env)
        self.daemons.append(d)
        return d

    def dispatcher(self, port: int = 0, data: str = "dispatcher") -> Daemon:
        self.disp = self.start("dispatcher", "dispatcher", ["--port", str(port), "--data", str(self.tmp / data)])
        return self.disp

    def runner(self, name: str, *args: str) -> Daemon:
        return self.start("runner", name, ["--port", "0", "--dispatcher", self.disp.addr, "--name", name,
                                           "--workdir", str(self.tmp / "runners" / name), *args])

    def observer(self, repo: "Repo", interval: float, module: list[str] | None = None) -> Daemon:
        return self.start("observer", "observer", ["--port", "0", "--repo", str(repo.path),
                                                   "--dispatcher", self.disp.addr,
                                                   "--state", str(self.tmp / "observer"),
                                                   "--interval", str(interval)], module)

    def stop_all(self) -> None:
        for d in self.daemons:
            try:
                # SIGTERM when profiling, so cProfile writes its file as the daemon exits
                (d.stop if os.environ.get("BENCH_PROFILE") else d.kill)() if d.alive() else None
            except Exception:
                pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


# ---------------------------------------------------------------- git

class Repo:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.env = {**os.environ, **GIT_ENV}

    def git(self, *args: str, input: str | None = None) -> str:
        out = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                             env={**os.environ, **GIT_ENV}, timeout=60, input=input)
        if out.returncode:
            raise BenchError(f"git {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def commit(self, message: str, env: dict | None = None) -> tuple[str, float, float]:
        """Commit a change; returns (sha, time before, time after `git commit` returned)."""
        (self.path / "file.txt").write_text(f"{message}\n{time.time()}\n")
        self.git("add", "-A")
        before = time.time()
        out = subprocess.run(["git", "-C", str(self.path), "commit", "-q", "-m", message],
                             capture_output=True, text=True, env=env or self.env, timeout=60)
        after = time.time()
        if out.returncode:
            raise BenchError(f"git commit failed: {out.stderr}")
        return self.git("rev-parse", "HEAD"), before, after

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

def request(addr: str, msg: dict, role: str = protocol.READER) -> dict:
    return asyncio.run(net.call(addr, msg, role, timeout=30))


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
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (net.PeerError, OSError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


FINAL = ("passed", "failed", "error", "cancelled")
