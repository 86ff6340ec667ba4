"""Real daemons as real processes, for the tests and the benchmarks: the one
way either starts a dispatcher, a runner or an observer.

A daemon is ``python -m ci <daemon> ...`` with this tree on PYTHONPATH and no
TINYCI_* variable of the caller's leaking in; it is ready when it prints the
ready line (read with ``ci.daemon.parse_ready``, bounded), and it is stopped
by its PID: SIGTERM, then SIGKILL after a bound. A ``Cluster`` is a
dispatcher, runners and an observer under one temp dir with one config file,
and reads the dispatcher (``status``, ``read_log``) as a tool would. Every
wait is bounded (``wait_until``) and names what it waited for.

Imported by the tests as ``daemons`` (tests/ is on their path) and by the
benchmarks as ``tests.daemons`` (``python -m bench`` from the repository
root). It lives beside the tests, not in ``ci``: `tinyci up` supervises its
children on its own event loop and needs none of this.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from ci import net
from ci.config import load
from ci.daemon import parse_ready
from ci.local import CEILING
from ci.settings import resolve

ROOT = Path(__file__).resolve().parents[1]
# Where tools run when a test gives no directory: not ROOT, where a `tinyci up`
# run by hand may have left .tinyci/secret, which tools look for upwards (and
# TINYCI_CEILING, set for every test and child, stops them looking there too).
TOOL_CWD = Path(tempfile.gettempdir())
START_TIMEOUT = 30.0        # for the ready line; generous because CI machines are noisy
STOP_TIMEOUT = 10.0         # for a daemon to exit after SIGTERM, and to be reaped after SIGKILL
GIT_ENV = {"GIT_AUTHOR_NAME": "Ada Tester", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada Tester", "GIT_COMMITTER_EMAIL": "ada@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}


class LaunchError(Exception):
    """A daemon did not start, or did not stop when asked; the message holds its log."""


class WaitTimeout(Exception):
    """A bounded wait ran out; the message names what was waited for."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05,
               tolerate: tuple[type[BaseException], ...] = (), details: Callable[[], str] | None = None) -> Any:
    """Call ``predicate`` until it returns something true and return that, for at
    most ``timeout`` s. Exceptions of the ``tolerate`` types count as "not yet"
    (a daemon being restarted refuses connections). ``details``: more text for
    the error, e.g. the daemons' logs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except tolerate as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    extra = f"\n{details()}" if details else ""
    raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}{extra}")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours without TINYCI_* (but for
    TINYCI_CEILING at this tree), this tree importable, output unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYCI_")}
    env[CEILING] = str(ROOT)        # a `tinyci up` run by hand in this clone lends no child its secret
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


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


# ---------------------------------------------------------------- one daemon

@dataclass(eq=False)
class Daemon:
    """One daemon process, started at construction; ``start`` again restarts it
    with the same flags (a fixed ``--port`` keeps its address)."""

    kind: str                           # dispatcher | runner | observer
    args: list[str]                     # its flags
    cwd: Path
    log_path: Path                      # its stderr, appended to across restarts
    env: dict[str, str]                 # shared with its cluster: later changes apply at restart
    prefix: tuple[str, ...] = ()        # e.g. ("ip", "netns", "exec", NS) to start inside a namespace
    module: str = ""                    # run ``python -m <module> <flags>`` instead of ``-m ci <kind>``
    profile: Path | None = None         # write a cProfile of the process here (stop it with stop())
    start_timeout: float = START_TIMEOUT
    wait_ready: bool = True             # False: do not wait (a daemon expected to refuse to start)

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.start()

    def command(self) -> list[str]:
        python = [sys.executable, *(("-m", "cProfile", "-o", str(self.profile)) if self.profile else ())]
        entry = ["-m", self.module] if self.module else ["-m", "ci", self.kind]
        return [*self.prefix, *python, *entry, *self.args]

    def start(self) -> None:
        """Start the process and wait (bounded) for its ready line."""
        lines: queue.Queue = queue.Queue()
        self._log_file = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, stdout=subprocess.PIPE, stderr=self._log_file,
                                     stdin=subprocess.DEVNULL, env=self.env, text=True)
        self.pid = self.proc.pid
        # read stdout to its end, so that the daemon never blocks on a full pipe
        threading.Thread(target=self._pump, args=(self.proc, lines), daemon=True).start()
        if not self.wait_ready:
            return
        deadline = self.started_at + self.start_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(f"printed no ready line within {self.start_timeout:g}s")
            if line is None:
                self._fail(f"exited with status {self.proc.wait(STOP_TIMEOUT)} before its ready line")
            ready = parse_ready(line)
            if ready:
                break
        name, self.host, self.port = ready
        self.ready_line = line.strip()
        if name != self.kind:
            self._fail(f"announced itself as {name!r}")
        self.ready_after = time.monotonic() - self.started_at
        self.addr = f"{self.host}:{self.port}"

    def _fail(self, why: str) -> NoReturn:
        self.kill()
        raise LaunchError(f"{self.kind} ({' '.join(self.command())}) {why}; its log:\n{self.log()}")

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def log(self, tail: int = 4000) -> str:
        """The end of what it wrote to stderr."""
        return self.log_path.read_text(errors="replace")[-tail:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, by PID, and reap it."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)
        self._log_file.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by PID and wait; returns the exit status. One that ignores
        SIGTERM for ``timeout`` s is killed, and that is a LaunchError."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LaunchError(f"{self.kind} ignored SIGTERM for {timeout:g}s; its log:\n{self.log()}") from None
        self._log_file.close()
        return code


# ---------------------------------------------------------------- a git repository to watch

class GitError(Exception):
    """A git command failed; the message names it and holds its stderr."""


class Repo:
    """A real git repository (branch main) to commit into."""

    def __init__(self, path: Path, env: dict[str, str] | None = None):
        self.path = path
        self.env = {**os.environ, **GIT_ENV, **(env or {})}
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                             env=env or self.env, timeout=60, input=input)
        if out.returncode:
            raise GitError(f"git {' '.join(args)} in {self.path} failed: {out.stderr}")
        return out.stdout.strip()

    def commit(self, message: str, files: dict[str, str] | None = None, env: dict[str, str] | None = None) -> str:
        """Write ``files`` (default: a change to file.txt) and commit them; returns the new sha."""
        for name, text in (files or {"file.txt": f"{message}\n{time.time()}\n"}).items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, env=env)
        return self.head()

    def head(self, ref: str = "HEAD") -> str:
        return self.git("rev-parse", ref)


# ---------------------------------------------------------------- a cluster

@dataclass(eq=False)
class Cluster:
    """A dispatcher, runners and an observer under ``tmp``, all reading one
    config.yaml: the build ``steps``, ``dispatcher`` keys, and whole other
    ``sections`` (auth, tls, net...). Stop them all with ``stop_all`` (or use
    it as a context manager)."""

    tmp: Path
    steps: list[str] = field(default_factory=lambda: ["sh build.sh"])
    dispatcher_keys: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: Path | None = None         # a directory: profile the dispatcher and runners with cProfile there

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.tmp / "logs").mkdir(exist_ok=True)
        self.daemons: list[Daemon] = []
        self.disp: Daemon | None = None
        self.config = self.tmp / "config.yaml"
        data: dict[str, dict] = {"dispatcher": dict(self.dispatcher_keys),
                                 "build": {"steps": self.steps, "timeout": 120}}
        for section, keys in self.sections.items():
            data.setdefault(section, {}).update(keys)
        self.config.write_text(yaml.safe_dump(data))
        self.env = child_env()          # change it before starting a daemon to give that daemon more

    def start(self, kind: str, name: str, args: list[str], module: str = "") -> Daemon:
        profile = None
        if self.profile and kind in ("dispatcher", "runner"):
            self.profile.mkdir(parents=True, exist_ok=True)
            profile = self.profile / f"{self.tmp.name}-{name}-{len(self.daemons)}.prof"
        d = Daemon(kind, ["--config", str(self.config), *args], self.tmp, self.tmp / "logs" / f"{name}.log",
                   self.env, module=module, profile=profile)
        self.daemons.append(d)
        return d

    def dispatcher(self, data: str = "dispatcher", port: int = 0) -> Daemon:
        """``port``: a fixed one (free_port()) keeps the address across restarts, so
        runners and the observer find a restarted dispatcher again."""
        self.disp = self.start("dispatcher", "dispatcher", ["--port", str(port), "--data", str(self.tmp / data)])
        return self.disp

    def runner(self, name: str, *args: str) -> Daemon:
        return self.start("runner", name, ["--port", "0", "--dispatcher", self.disp.addr, "--name", name,
                                           "--workdir", str(self.tmp / "runners" / name), *args])

    def observer(self, repo: Repo, *args: str, interval: float = 0.3, module: str = "") -> Daemon:
        """``module``: a stand-in for ``ci observer`` taking the same flags (the benchmarks' probe)."""
        return self.start("observer", "observer", ["--port", "0", "--repo", str(repo.path),
                                                   "--dispatcher", self.disp.addr,
                                                   "--state", str(self.tmp / "observer"),
                                                   "--interval", f"{interval:g}", *args], module)

    def stop_all(self) -> None:
        """Every daemon still running: SIGKILL, or SIGTERM when profiled (cProfile
        writes its file as the process exits)."""
        for d in self.daemons:
            if not d.alive():
                continue
            try:
                d.stop() if d.profile else d.kill()
            except LaunchError:
                pass                    # killed after all: nothing is left running

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ------------------------------------------------------------ reading the dispatcher, as a tool

    def credentials(self, role: str) -> tuple[str, Any]:
        """(secret, TLS context) a tool in ``role`` uses with this cluster's configuration."""
        settings = resolve(load(self.config, env=self.env), roles=[role], listens=False)
        return settings.secret(role), settings.client_tls

    def request(self, msg: dict, role: str = "reader", addr: str | None = None, id: str = "") -> dict:
        """One request to the dispatcher (or ``addr``) and its reply; ``id``: the runner named, for role runner."""
        secret, tls = self.credentials(role)
        return asyncio.run(net.call(addr or self.disp.addr, msg, role, secret, timeout=10, ssl=tls, id=id))

    def status(self, limit: int = 500) -> dict:
        return self.request({"type": "status", "limit": limit})

    def builds(self) -> list[dict]:
        return self.status()["builds"]

    def runner_state(self, name: str) -> str | None:
        return next((r["state"] for r in self.status()["runners"] if r["name"] == name), None)

    def log(self, build: int) -> str:
        """The whole log of ``build``, as `tinyci log` reads it."""
        async def read() -> str:
            secret, tls = self.credentials("reader")
            client = net.Client(*net.parse_addr(self.disp.addr), "reader", secret, ssl=tls)
            try:
                return "".join([f.get("data", "") async for f in client.stream({"type": "read_log", "build": build})])
            finally:
                await client.close()
        return asyncio.run(read())

    def logs(self) -> str:
        """Every daemon's log, for a failure message."""
        return "\n".join(f"--- {d.kind} {d.log_path.name} ---\n{d.log()}" for d in self.daemons)

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
        """``wait_until`` that rides out a restarting dispatcher and shows the logs when it runs out."""
        return wait_until(predicate, timeout, what, every=every, tolerate=(net.PeerError, OSError),
                          details=self.logs)

    def wait_builds(self, predicate: Callable[[list[dict]], Any], what: str, timeout: float = 30.0) -> list[dict]:
        """The builds (newest first) once ``predicate(builds)`` holds."""
        def check() -> list[dict] | None:
            builds = self.builds()
            return builds if predicate(builds) else None
        return self.wait(what, check, timeout)
