"""Test helpers: real git repositories in tmp_path and real daemons as real
processes on ephemeral loopback ports. Every wait is bounded; every process a
test starts is stopped by its PID when the test ends."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ci import net

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"tinyci (\w+) listening on (\S+):(\d+)")
GIT_ENV = {"GIT_AUTHOR_NAME": "Ada Tester", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada Tester", "GIT_COMMITTER_EMAIL": "ada@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYCI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def tinyci(*args: str, cwd: Path | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run the `tinyci` command (as `python -m ci`) the way a user would, with no stdin."""
    return subprocess.run([sys.executable, "-m", "ci", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=child_env(**env), stdin=subprocess.DEVNULL)


def free_port() -> int:
    """A port nothing listens on (bound, then released), for a daemon that must keep it across restarts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (killed, waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rfind(")") + 2] not in "ZX"


def by_sha(builds: list[dict]) -> dict[str, dict]:
    return {b["sha"]: b for b in builds}


class Repo:
    """A real git repository to commit into."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        out = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                             env={**os.environ, **GIT_ENV}, timeout=30)
        if out.returncode:
            raise AssertionError(f"git {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def commit(self, message: str, files: dict[str, str] | None = None) -> str:
        for name, text in (files or {"file.txt": f"{message}\n{time.time()}\n"}).items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self, ref: str = "HEAD") -> str:
        return self.git("rev-parse", ref)


class Daemon:
    def __init__(self, kind: str, args: list[str], cwd: Path, log: Path, env: dict,
                 prefix: tuple[str, ...] = ()):
        self.kind, self.args, self.cwd, self.log_path, self.env = kind, args, cwd, log, env
        self.prefix = list(prefix)      # e.g. ("ip", "netns", "exec", NS) to start inside a namespace
        self.start()

    def start(self) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.stderr = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", f"ci.{self.kind}", *self.args],
                                     cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL,
                                     env=self.env, text=True)
        self.pid = self.proc.pid
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        deadline = time.monotonic() + 20
        while True:
            try:
                line = self.lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.kind} did not start:\n{self.log()}")
            match = READY.search(line)
            if match:
                self.ready_after = time.monotonic() - self.started_at
                self.host, self.port = match.group(2), int(match.group(3))
                self.addr = f"{self.host}:{self.port}"
                return

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, by PID."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stderr.close()

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM by PID and wait; returns the exit code."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.kind} ignored SIGTERM for {timeout}s:\n{self.log()}")
        self.stderr.close()
        return code

class Cluster:
    """Real daemons for one test, all under tmp_path."""

    def __init__(self, tmp: Path, steps: list[str] | None = None, extra: dict | None = None,
                 **dispatcher_cfg):
        """``extra``: more configuration sections (auth, tls, net...) for every daemon."""
        self.tmp = tmp
        self.daemons: list[Daemon] = []
        self.config = tmp / "config.yaml"
        data = {"dispatcher": dispatcher_cfg, "build": {"steps": steps or ["sh build.sh"], "timeout": 120}}
        for section, keys in (extra or {}).items():
            data.setdefault(section, {}).update(keys)
        self.config.write_text(yaml.safe_dump(data))
        self.env = child_env()

    def credentials(self, role: str) -> tuple[str, object]:
        """(secret, TLS context) a tool in ``role`` uses with this cluster's configuration."""
        from ci.config import load
        from ci.settings import resolve
        settings = resolve(load(self.config, env=self.env), roles=[role], listens=False)
        return settings.secret(role), settings.client_tls

    def _start(self, kind: str, name: str, args: list[str], port: int = 0) -> Daemon:
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        d = Daemon(kind, ["--config", str(self.config), "--port", str(port), *args], self.tmp,
                   logs / f"{name}.log", self.env)
        self.daemons.append(d)
        return d

    def dispatcher(self, data: str = "dispatcher", port: int = 0) -> Daemon:
        """``port``: a fixed one (free_port()) keeps the address across restarts, so
        runners and the observer find a restarted dispatcher again."""
        self.disp = self._start("dispatcher", "dispatcher", ["--data", str(self.tmp / data)], port)
        return self.disp

    def runner(self, name: str, *args: str) -> Daemon:
        return self._start("runner", name, ["--dispatcher", self.disp.addr, "--name", name,
                                            "--workdir", str(self.tmp / "runners" / name), *args])

    def observer(self, repo: Repo, *args: str) -> Daemon:
        return self._start("observer", "observer", ["--repo", str(repo.path), "--dispatcher", self.disp.addr,
                                                     "--state", str(self.tmp / "observer"),
                                                     "--interval", "0.3", *args])

    def request(self, msg: dict, role: str = "reader") -> dict:
        secret, tls = self.credentials(role)
        return asyncio.run(net.call(self.disp.addr, msg, role, secret, timeout=10, ssl=tls))

    def status(self, limit: int = 500) -> dict:
        return self.request({"type": "status", "limit": limit})

    def builds(self) -> list[dict]:
        return self.status()["builds"]

    def runner_state(self, name: str) -> str | None:
        return next((r["state"] for r in self.status()["runners"] if r["name"] == name), None)

    def log(self, build: int) -> str:
        async def read() -> str:
            secret, tls = self.credentials("reader")
            client = net.Client(*net.parse_addr(self.disp.addr), "reader", secret, ssl=tls)
            try:
                return "".join([f.get("data", "") async for f in client.stream({"type": "read_log", "build": build})])
            finally:
                await client.close()
        return asyncio.run(read())

    def wait(self, what: str, predicate, timeout: float = 30.0):
        """Poll ``predicate`` until it returns something true, for at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (net.PeerError, OSError) as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.1)
        logs = "\n".join(f"--- {d.kind} {d.log_path.name} ---\n{d.log()}" for d in self.daemons)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{logs}")

    def wait_builds(self, predicate, what: str, timeout: float = 30.0) -> list[dict]:
        return self.wait(what, lambda: (lambda b: b if predicate(b) else None)(self.builds()), timeout)

    def stop_all(self) -> None:
        for d in self.daemons:
            try:
                if d.alive():
                    d.kill()
            except Exception:
                pass


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "repo")
    r.commit("initial", {"build.sh": "echo building; exit 0\n"})
    return r


@pytest.fixture
def cluster(tmp_path: Path):
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        c = Cluster(tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()


def finished(builds: list[dict]) -> bool:
    return bool(builds) and all(b["status"] not in ("queued", "running") for b in builds)
