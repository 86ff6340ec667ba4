"""peer: the same workload on tinyci and on Buildbot, back to back on this
machine, on 127.0.0.1 only (issue 16 item 6).

Buildbot (master and worker, the current release on the package index) is
installed with pip into a virtualenv cached under
``~/.cache/tinyci-bench/buildbot-<version>/``, so a second run reuses it; if
it cannot be installed the scenario fails saying so. Its master runs in the
foreground (``buildbot start --nodaemon``: the PID we started is the master),
configured by bench/buildbot_master.cfg: one builder with N workers, SQLite,
no web UI, ``collapseRequests=False``, a ``Git`` step in ``incremental`` mode
and then the step, changes from a ``GitPoller`` (``pollInterval=1``) or from
the PB change source (``buildbot sendchange`` in a post-commit hook). A
recorder service in the master writes each build's ``new`` and ``finished``
events with the master's wall clock, as tinyci's dispatcher stamps
``started_at`` and ``finished_at``.

Phases, each run on tinyci and then on Buildbot: push latency, poll latency
(1 s), builds per second for a batch of commits with 2 and with 4 workers
(coordinator CPU per build, idle RSS and CPU), and a worker SIGKILLed while it
runs a ``sleep`` build.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.daemons import free_port

from .harness import FINAL, Reader, Repo, Result, cluster, cpu_seconds, median, rss_mb, wait_for
from .latency import _bare_env, _built, _idle

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyci-bench"
MASTER_CFG = Path(__file__).resolve().parent / "buildbot_master.cfg"
STOP_TIMEOUT = 15.0


class PeerError(Exception):
    """Buildbot could not be installed or started; the message says which and why."""


# ---------------------------------------------------------------- installing Buildbot

def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def current_version() -> str:
    """The newest buildbot release on the package index (pip downloads its wheel alone, ~100 kB)."""
    with tempfile.TemporaryDirectory(prefix="tinyci-bench-bbver-") as tmp:
        done = _pip("download", "--no-deps", "--only-binary", ":all:", "--dest", tmp, "buildbot", timeout=120)
        found = [m.group(1) for p in Path(tmp).iterdir() if (m := re.match(r"buildbot-([^-]+)-", p.name))]
        if done.returncode or not found:
            why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PeerError(f"peer: could not find Buildbot on the package index (pip download buildbot): {why}")
        return found[0]


def buildbot_venv() -> tuple[Path, str]:
    """(virtualenv, version) of the current Buildbot release, installed once per version.

    Built where it stays (a virtualenv's scripts name its path) and marked
    complete last: a half-built one from an interrupted run is built again."""
    version = current_version()
    venv = CACHE / f"buildbot-{version}"
    marker = venv / "tinyci-bench-installed"
    if marker.exists():
        return venv, version
    shutil.rmtree(venv, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install",
                               "--quiet", f"buildbot=={version}", f"buildbot-worker=={version}"],
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.SubprocessError as exc:
        raise PeerError(f"peer: could not install Buildbot {version} into {venv}: {exc}") from None
    if done.returncode:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise PeerError(f"peer: could not install Buildbot {version} from the package index: {why}")
    marker.write_text(version + "\n")
    return venv, version


# ---------------------------------------------------------------- a Buildbot master and its workers

class Proc:
    """A process we started, stopped by its PID."""

    def __init__(self, argv: list[str], cwd: Path, log: Path):
        self.log_file = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)
        self.log_file.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class Buildbot:
    """A buildmaster with ``workers`` workers configured (the first ``start``
    of them started with it) under ``tmp``, building ``repo`` with ``step``
    on changes from ``trigger`` ("poll" or "push")."""

    def __init__(self, venv: Path, template: Path, tmp: Path, repo: Repo, trigger: str, step: str, workers: int,
                 start: int = 1):
        self.venv, self.tmp, self.repo = venv, tmp, repo
        self.port = free_port()
        self.master_dir = tmp / "master"
        shutil.copytree(template / "master", self.master_dir)
        shutil.copy(MASTER_CFG, self.master_dir / "master.cfg")
        self.names = [f"w{i + 1}" for i in range(workers)]
        (self.master_dir / "bench.json").write_text(json.dumps(
            {"repo": str(repo.path), "trigger": trigger, "step": step, "port": self.port, "workers": self.names}))
        self.initial = self.names[:start]
        self.events_path = self.master_dir / "events.jsonl"
        self.master: Proc | None = None
        self.workers: dict[str, Proc] = {}

    def __enter__(self) -> "Buildbot":
        try:
            self.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self) -> None:
        self.master = Proc([str(self.venv / "bin" / "buildbot"), "start", "--nodaemon", str(self.master_dir)],
                           self.master_dir, self.tmp / "master.out")
        log = self.master_dir / "twistd.log"
        wait_for("the buildmaster to start", lambda: self._master_up(log), 60, every=0.1)
        for name in self.initial:
            self.start_worker(name)
        wait_for(f"{len(self.initial)} workers to connect", lambda: len(
            {e["workerid"] for e in self.events("workers.connected")}) >= len(self.initial), 60, every=0.05)

    def _master_up(self, log: Path) -> bool:
        if not self.master.alive():
            out = (self.tmp / "master.out").read_text(errors="replace")
            tail = log.read_text(errors="replace") if log.exists() else ""
            raise PeerError(f"peer: the buildmaster exited: {(out + tail)[-3000:]}")
        return log.exists() and "BuildMaster is running" in log.read_text(errors="replace")

    def start_worker(self, name: str) -> Proc:
        where = self.tmp / "workers" / name
        where.mkdir(parents=True, exist_ok=True)
        (where / "buildbot.tac").write_text(WORKER_TAC.format(basedir=str(where), port=self.port, name=name))
        proc = Proc([str(self.venv / "bin" / "buildbot-worker"), "start", "--nodaemon", str(where)],
                    where, where / "worker.out")
        self.workers[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.workers.values():
            proc.stop()
        if self.master is not None:
            self.master.stop()

    def events(self, kind: str | None = None, after: int = 0) -> list[dict]:
        """The recorder's events so far (``kind``: e.g. "builds.new"), from line ``after`` on."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()[after:]
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue                      # a line being written
            if kind is None or event["event"] == kind:
                out.append(event)
        return out

    def mark(self) -> int:
        """How many events so far: ``events(after=mark())`` are the newer ones."""
        return len(self.events_path.read_text().splitlines()) if self.events_path.exists() else 0

    def sendchange_hook(self) -> None:
        """A post-commit hook that tells the master's PB change source of each commit (`buildbot sendchange`)."""
        hook = self.repo.path / ".git" / "hooks" / "post-commit"
        hook.write_text(f"#!/bin/sh\nexec {self.venv / 'bin' / 'buildbot'} sendchange --master 127.0.0.1:{self.port} "
                        f"--auth change:changepw --who bench --vc git --branch main "
                        f"--repository {self.repo.path} --revision \"$(git rev-parse HEAD)\" --comments bench\n")
        hook.chmod(0o755)


WORKER_TAC = """\
# written by bench/peer.py, as `buildbot-worker create-worker` would
import os
from buildbot_worker.bot import Worker
from twisted.application import service
from twisted.python.log import FileLogObserver, ILogObserver
from twisted.python.logfile import LogFile

basedir = {basedir!r}
application = service.Application('buildbot-worker')  # `buildbot-worker start` looks for this text
application.setComponent(ILogObserver, FileLogObserver(LogFile.fromFullPath(os.path.join(basedir, "twistd.log"))).emit)
Worker("127.0.0.1", {port}, {name!r}, "pass", basedir, 600, umask=None, maxdelay=300, numcpus=None,
       allow_shutdown=None, maxRetries=None, protocol="pb", useTls=0, delete_leftover_dirs=0,
       connection_string=None, proxy_connection_string=None).setServiceParent(application)
"""


def master_template(venv: Path, tmp: Path) -> Path:
    """A master directory with its SQLite database created (`buildbot create-master`), copied for each phase."""
    template = tmp / "template"
    template.mkdir(parents=True)
    done = subprocess.run([str(venv / "bin" / "buildbot"), "create-master", "-q", "-r", "--db", "sqlite:///state.sqlite",
                           str(template / "master")], capture_output=True, text=True, timeout=300)
    # it may exit 0 having failed: its database is the proof
    if done.returncode or not (template / "master" / "state.sqlite").exists():
        raise PeerError(f"peer: buildbot create-master failed: {(done.stdout + done.stderr)[-2000:]}")
    return template


# ---------------------------------------------------------------- the two sides, one interface

STEP = "sh step.sh"       # the build's one step on both sides; step.sh in the repository says `true` or `sleep N`


def _repo(path: Path) -> Repo:
    repo = Repo(path)
    repo.commit("initial", files={"step.sh": "true\n", "file.txt": "initial\n"})
    return repo


def descendant(pid: int, comm: str) -> int | None:
    """A process named ``comm`` below ``pid`` (a worker's or runner's step), from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue                          # gone meanwhile
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append((int(entry.name), name))
    todo = [pid]
    while todo:
        for child, name in children.get(todo.pop(), []):
            if name == comm:
                return child
            todo.append(child)
    return None


class TinyciSide:
    """tinyci: a dispatcher, runners and an observer (poll 1 s, or its git hook for push)."""

    label = "tinyci"

    def __init__(self, tmp: Path, trigger: str):
        self.tmp, self.trigger = tmp, trigger
        self.replaced = 0

    def __enter__(self) -> "TinyciSide":
        self.cluster = cluster(self.tmp, [STEP])
        self.cluster.__enter__()
        try:
            self.cluster.dispatcher()
            self.workers = {"r1": self.cluster.runner("r1")}
            self.repo = _repo(self.tmp / "repo")
            self.obs = self.cluster.observer(self.repo, interval=300 if self.trigger == "push" else 1)
            self.reader = Reader(self.cluster.disp.addr)
            wait_for("the initial build", _built(self.reader, self.repo.head()), 60)
            if self.trigger == "push":
                done = subprocess.run([sys.executable, "-m", "ci", "install-hook", "--repo", str(self.repo.path),
                                       "--observer", self.obs.addr], capture_output=True, text=True,
                                      env=self.cluster.env, timeout=60)
                if done.returncode:
                    raise RuntimeError(f"tinyci install-hook failed: {done.stderr}")
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.reader.close()
        finally:
            self.cluster.__exit__(*exc)

    def pids(self) -> dict[str, int]:
        return {"coordinator": self.cluster.disp.pid, "poller": self.obs.pid}

    def mark(self) -> None:
        return None

    def built(self, sha: str, mark: None, timeout: float = 60) -> tuple[float, float]:
        build = wait_for(f"the build of {sha[:7]}", _built(self.reader, sha), timeout, every=0.02)
        wait_for("the runners to be idle again", lambda: _idle(self.reader), 15, every=0.02)
        return build["started_at"], build["finished_at"]

    def grow(self, count: int) -> None:
        """Runners up to ``count``, all idle."""
        while len(self.workers) < count:
            name = f"r{len(self.workers) + 1}"
            self.workers[name] = self.cluster.runner(name)
        wait_for(f"{count} idle runners", lambda: (lambda rs: len(rs) == count and all(
            r["state"] == "idle" for r in rs))(self.reader.status(1)["runners"]), 30)

    def batch(self, shas: list[str], mark: None, timeout: float) -> list[tuple[float, float, bool]]:
        want = set(shas)

        def done():
            builds = [b for b in self.reader.status(len(shas) + 10)["builds"] if b["sha"] in want]
            return builds if len(builds) == len(shas) and all(b["status"] in FINAL for b in builds) else None
        builds = wait_for(f"{len(shas)} builds", done, timeout, every=0.1)
        return [(b["started_at"], b["finished_at"], b["status"] == "passed") for b in builds]

    def running(self, sha: str, mark: None) -> dict:
        return wait_for("the build to run", lambda: next((b for b in self.reader.status(10)["builds"]
                                                          if b["sha"] == sha and b["status"] == "running"), None), 30)

    def rerun(self, sha: str, first: dict, timeout: float) -> float | None:
        """When the build started again on another runner (its attempt 2), or None."""
        again = wait_for("the build to run elsewhere", lambda: next(
            (b for b in self.reader.status(10)["builds"] if b["sha"] == sha and b["attempt"] >= 2
             and b["status"] in ("running", *FINAL)), None), timeout)
        wait_for("the build to finish", lambda: next(
            (b for b in self.reader.status(10)["builds"] if b["sha"] == sha and b["status"] in FINAL), None), 30)
        return again["started_at"]

    def replace(self, name: str) -> None:
        del self.workers[name]
        self.replaced += 1
        fresh = f"r{100 + self.replaced}"     # a runner's name and workdir are its own: never reused
        self.workers[fresh] = self.cluster.runner(fresh)


class BuildbotSide:
    """Buildbot: a master (GitPoller at 1 s, or the PB change source fed by a post-commit hook) and workers."""

    def __init__(self, venv: Path, version: str, template: Path, tmp: Path, trigger: str):
        self.venv, self.template, self.tmp, self.trigger = venv, template, tmp, trigger
        self.label = f"Buildbot {version}"
        self.killed_results: list = []

    def __enter__(self) -> "BuildbotSide":
        self.repo = _repo(self.tmp / "repo")
        self.bb = Buildbot(self.venv, self.template, self.tmp, self.repo, self.trigger, STEP, workers=4, start=1)
        self.bb.__enter__()
        self.workers = self.bb.workers
        if self.trigger == "push":
            self.bb.sendchange_hook()
        return self

    def __exit__(self, *exc) -> None:
        self.bb.__exit__(*exc)

    def pids(self) -> dict[str, int]:
        return {"coordinator": self.bb.master.pid}

    def mark(self) -> int:
        return self.bb.mark()

    def _finished(self, mark: int, count: int):
        def check():
            done = self.bb.events("builds.finished", mark)
            return done if len(done) >= count else None
        return check

    def built(self, sha: str, mark: int, timeout: float = 60) -> tuple[float, float]:
        finished = wait_for(f"the build of {sha[:7]}", self._finished(mark, 1), timeout, every=0.02)[0]
        changes = [e.get("revision") for e in self.bb.events("changes.new", mark)]
        if sha not in changes:
            raise RuntimeError(f"Buildbot built something other than {sha[:7]} (changes seen: {changes})")
        started = next(e for e in self.bb.events("builds.new", mark) if e["buildid"] == finished["buildid"])
        return started["t"], finished["t"]

    def grow(self, count: int) -> None:
        while len(self.workers) < count:
            self.bb.start_worker(f"w{len(self.workers) + 1}")
        wait_for(f"{count} workers connected", lambda: len(
            {e["workerid"] for e in self.bb.events("workers.connected")}) >= count, 60, every=0.05)

    def batch(self, shas: list[str], mark: int, timeout: float) -> list[tuple[float, float, bool]]:
        finished = wait_for(f"{len(shas)} builds", self._finished(mark, len(shas)), timeout, every=0.1)
        started = {e["buildid"]: e["t"] for e in self.bb.events("builds.new", mark)}
        return [(started[e["buildid"]], e["t"], e.get("results") == 0) for e in finished]

    def running(self, sha: str, mark: int) -> dict:
        return wait_for("the build to run", lambda: next(iter(self.bb.events("builds.new", mark)), None), 30)

    def rerun(self, sha: str, first: dict, timeout: float) -> float | None:
        """When the same build request started again on another worker, or None if it did not within ``timeout``."""
        def again():
            return next((e for e in self.bb.events("builds.new") if e["buildrequestid"] == first["buildrequestid"]
                         and e["buildid"] != first["buildid"]), None)
        try:
            event = wait_for("the build to run elsewhere", again, timeout)
        except Exception:
            return None
        wait_for("the build to finish", lambda: any(e["buildid"] == event["buildid"]
                                                    for e in self.bb.events("builds.finished")), 30)
        # what became of the build on the killed worker (Buildbot's results: 4 is RETRY)
        self.killed_results.extend(e.get("results") for e in self.bb.events("builds.finished")
                                   if e["buildid"] == first["buildid"])
        return event["t"]

    def replace(self, name: str) -> None:
        self.bb.start_worker(name)            # the same worker again: it reconnects


# ---------------------------------------------------------------- the workload, the same on both sides

SLEEP = 4                 # the step of the build whose worker is killed


def poller_ready(side) -> bool:
    """Buildbot's GitPoller has read the branch once (else a first commit would count as already there)."""
    if not isinstance(side, BuildbotSide) or side.trigger != "poll":
        return True
    db = side.bb.master_dir / "state.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return bool(conn.execute("SELECT count(*) FROM object_state WHERE name = 'lastRev'").fetchone()[0])


def latency(side, trials: int, poll: bool, out: dict) -> None:
    """Commit, wait for the result, ``trials`` times; for polling at a random phase of the 1 s poll."""
    bare = _bare_env(side.tmp)              # no tinyci on PATH; the hooks name what they run in full
    wait_for("the poller's first look", lambda: poller_ready(side), 30, every=0.1)
    for i in range(trials):
        if poll:
            time.sleep(random.uniform(0, 1.0))
        mark = side.mark()
        sha, before, after = side.repo.timed_commit(f"trial {i}", env=bare)
        started, finished = side.built(sha, mark)
        out["running"].append(started - after)
        out["result"].append(finished - after)
        out["from_start"].append(started - before)
        out["from_start_result"].append(finished - before)
        out["commit"].append(after - before)


def idle(side, seconds: float, out: dict) -> None:
    """CPU (% of a core) and RSS of the coordinator (and tinyci's observer) with nothing to build."""
    pids = side.pids()
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)                     # the window measured: nothing happens but polls and pings
    span = time.monotonic() - t0
    for key, pid in pids.items():
        out[f"idle_cpu_{key}"].append((cpu_seconds(pid) - before[key]) / span * 100)
        out[f"idle_rss_{key}"].append(rss_mb(pid))


def batch(side, workers: int, commits: int, out: dict) -> None:
    """``commits`` at once, found by the poll; builds/s and the coordinator's CPU per build."""
    side.grow(workers)
    pids = side.pids()
    wait_for("the poller's first look", lambda: poller_ready(side), 30, every=0.1)
    mark = side.mark()
    cpu = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    shas = side.repo.many(commits)
    made = time.time()
    builds = side.batch(shas, mark, 120 + commits * 15)      # Buildbot under load: ~5 s a build
    span = time.monotonic() - t0
    for key, pid in pids.items():
        used = cpu_seconds(pid) - cpu[key]
        out[f"{workers}w_cpu_ms_{key}"].append(used / commits * 1000)
        # what polling and pinging would have cost anyway over that time, at the idle rate measured before
        idle_cost = out[f"idle_cpu_{key}"][-1] / 100 * span
        out[f"{workers}w_cpu_busy_ms_{key}"].append(max(0.0, used - idle_cost) / commits * 1000)
    first, last = min(b[0] for b in builds), max(b[1] for b in builds)
    out[f"{workers}w_rate"].append(commits / (last - first))
    out[f"{workers}w_rate_e2e"].append(commits / (last - made))
    out[f"{workers}w_passed"].append(sum(b[2] for b in builds))


def kill(side, trials: int, out: dict) -> None:
    """SIGKILL the worker running a `sleep` build: seconds until the build runs on another one."""
    for i in range(trials):
        mark = side.mark()
        sha = side.repo.commit(f"kill {i}", files={"step.sh": f"sleep {SLEEP}\n# trial {i}\n"})
        first = side.running(sha, mark)
        victim = wait_for("the step to be under way", lambda: next(
            (name for name, proc in side.workers.items() if descendant(proc.pid, "sleep")), None), 30, every=0.05)
        killed = time.time()
        side.workers[victim].kill()
        again = side.rerun(sha, first, 30)
        out["regain"].append(None if again is None else again - killed)
        side.replace(victim)


# ---------------------------------------------------------------- the scenario

# (figure, key in the samples, unit, how: p50 of the samples; "x1000": seconds shown as ms)
FIGURES = [
    ("push: git commit started -> running p50", "push_from_start", "ms"),
    ("push: git commit started -> result p50", "push_from_start_result", "ms"),
    ("push: commit returned -> running p50", "push_running", "ms"),
    ("push: git commit with the hook p50", "push_commit", "ms"),
    ("poll 1 s: commit -> running p50", "poll_running", "ms"),
    ("poll 1 s: commit -> result p50", "poll_result", "ms"),
    ("2 workers: builds/s, first start -> last result", "2w_rate", "builds/s"),
    ("2 workers: builds/s, commits made -> last result", "2w_rate_e2e", "builds/s"),
    ("2 workers: coordinator CPU per build", "2w_cpu_ms_coordinator", "ms"),
    ("4 workers: builds/s, first start -> last result", "4w_rate", "builds/s"),
    ("4 workers: builds/s, commits made -> last result", "4w_rate_e2e", "builds/s"),
    ("4 workers: coordinator CPU per build", "4w_cpu_ms_coordinator", "ms"),
    ("4 workers: coordinator + poller CPU per build", "4w_cpu_ms_all", "ms"),
    ("4 workers: coordinator + poller CPU per build beyond idle", "4w_cpu_busy_ms_all", "ms"),
    ("idle: coordinator RSS", "idle_rss_coordinator", "MB"),
    ("idle: coordinator + poller RSS", "idle_rss_all", "MB"),
    ("idle: coordinator + poller CPU", "idle_cpu_all", "% of a core"),
    ("worker SIGKILLed -> build running on another p50", "kill_regain", "s"),
]
SECONDS_AS_MS = ("push_", "poll_")


def _samples() -> dict:
    return defaultdict(list)


def _add_all(out: dict) -> None:
    """tinyci's observer is a process of its own, Buildbot's poller is in the master: add them up to compare."""
    for key in [k for k in out if k.endswith("_coordinator")]:
        base = key.removesuffix("_coordinator")
        if base + "_poller" in out:
            out[base + "_all"] = [a + b for a, b in zip(out[key], out[base + "_poller"])]
        else:
            out[base + "_all"] = list(out[key])


def _run_side(make, tmp: Path, sizes: dict, out: dict) -> None:
    push, poll, regain = _samples(), _samples(), _samples()
    clock = _Clock(out)
    with make(tmp / "push", "push") as side:
        clock.lap("push: start")
        latency(side, sizes["trials"], False, push)
        clock.lap("push: trials")
    with make(tmp / "poll", "poll") as side:
        clock.lap("poll: start")
        latency(side, sizes["trials"], True, poll)
        clock.lap("poll: trials")
        side.grow(2)
        idle(side, sizes["idle"], out)
        batch(side, 2, sizes["commits"], out)
        clock.lap("2 workers")
        batch(side, 4, sizes["commits"], out)
        clock.lap("4 workers")
        kill(side, sizes["kills"], regain)
        clock.lap("kill")
        out["killed_build_results"].extend(getattr(side, "killed_results", []))
    for prefix, got in (("push", push), ("poll", poll)):
        for key, values in got.items():
            out[f"{prefix}_{key}"].extend(values)
    out["kill_regain"].extend(regain["regain"])


class _Clock:
    """Seconds each phase took, kept with the samples (where a slow run spent its time)."""

    def __init__(self, out: dict):
        self.out, self.t = out, time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        self.out[f"phase_s: {what}"].append(round(now - self.t, 1))
        self.t = now


def peer(tmp: Path, quick: bool) -> Result:
    sizes = ({"trials": 1, "commits": 6, "kills": 1, "idle": 1.0, "rounds": 1} if quick else
             {"trials": 5, "commits": 50, "kills": 2, "idle": 5.0, "rounds": 1})
    venv, version = buildbot_venv()
    template = master_template(venv, tmp)
    makers = {"tinyci": lambda where, trigger: TinyciSide(where, trigger),
              "buildbot": lambda where, trigger: BuildbotSide(venv, version, template, where, trigger)}
    samples = {"tinyci": _samples(), "buildbot": _samples()}
    for r in range(sizes["rounds"]):
        # alternate who goes first, so that neither always meets the machine in the same state
        for name in (("tinyci", "buildbot") if r % 2 == 0 else ("buildbot", "tinyci")):
            t0 = time.monotonic()
            _run_side(makers[name], tmp / f"{name}-{r}", sizes, samples[name])
            print(f"   round {r + 1}: {name} in {time.monotonic() - t0:.0f}s", flush=True)
    for got in samples.values():
        _add_all(got)
    res = Result("peer")
    for title, key, unit in FIGURES:
        scale = 1000 if key.startswith(SECONDS_AS_MS) else 1
        ours, theirs = ([v * scale for v in samples[s][key] if v is not None] for s in ("tinyci", "buildbot"))
        a, b = median(ours), median(theirs)
        missing = len(samples["buildbot"][key]) - len(theirs)
        res.add(f"{title}: tinyci", a, unit)
        res.add(f"{title}: Buildbot {version}", b, unit,
                note=f"{missing} of {len(samples['buildbot'][key])} never ran again" if missing else "")
        if a and b and a > 0 and b > 0:        # no ratio of two negative times (running before commit returned)
            res.add(f"{title}: Buildbot / tinyci", b / a, "x")
    res.data = {"buildbot": version, "sizes": sizes, "samples": {k: dict(v) for k, v in samples.items()},
                "trigger": {"push": "tinyci: its post-commit hook (tinyci install-hook -> tinyci notify pokes the "
                                    "observer); Buildbot: a post-commit hook running `buildbot sendchange` to the "
                                    "PB change source",
                            "poll": "tinyci: observer --interval 1; Buildbot: GitPoller pollInterval=1"}}
    return res
