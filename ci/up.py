"""`tinyci up`: a dispatcher, an observer, N runners and the web page on this machine.

Each daemon is its own process (``python -m ci.<daemon> ...``), started in
order: the dispatcher first (the others need its address), then the observer,
the runners and `tinyci web` (unless ``--no-web``), whose address is the
first thing the summary prints. A child counts as started when it prints its ready line
("tinyci <daemon> listening on HOST:PORT") on stdout; its log goes to
DATA/logs/<name>.log (``--log-file``: rotated by size, the last few kept as
<name>.log.1 ...), and its stderr too, for what a daemon prints before its
logging starts. If any child fails to start or
dies later, the others are stopped and the end of its log is shown. Ctrl-C or
SIGTERM stops them all: SIGTERM to each by PID, SIGKILL after a grace time.

Unless the configuration sets a secret, the daemons authenticate with a random
one made on first start and kept in DATA/secret (mode 0600). Children get it
in their environment (TINYCI_AUTH_SECRET), never on a command line, where any
local user could read it; tools run in or below the same directory find
it in .tinyci/secret. It is the one-secret setup: every role, every runner and the
dispatcher towards them prove themselves with it, which is sound only when
they all run on one machine as one user (SECURITY.md).

While they run, DATA/up.json says where they listen (``local.find_up``:
tools, git hooks and daemons started by hand in or below this directory use
it and the secret), and the window gets one line per build that ends: up
watches the dispatcher as a reader for that, and speaks no other protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import files, gitops, net, patterns, protocol, waiting
from .local import DATA, UP_FILE
from .config import ConfigError, load
from .daemon import parse_ready
from .settings import resolve

READY_TIMEOUT = 15.0     # seconds a child gets to print its ready line
STOP_GRACE = 5.0         # seconds between SIGTERM and SIGKILL on shutdown
LOG_TAIL = 15            # lines of a failed child's log to show
GIT_TIMEOUT = 30.0       # seconds git gets to answer about the repository
MAX_RUNNERS = 64
WEB_PORT = 8080


class UpError(Exception):
    """Something the user must fix before `tinyci up` can start (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--repo", metavar="PATH",
                       help="git clone to watch (default: the git repository around the current directory)")
    where.add_argument("--demo", action="store_true",
                       help="watch a small demo repository, created once at DATA/demo-repo")
    parser.add_argument("--runners", type=int, metavar="N",
                        help="how many runners to start (default 2, or 0 beside --runner)")
    parser.add_argument("--labels", metavar="A,B",
                        help="comma-separated labels every runner of --runners offers (a .ci.yaml job "
                             "runs on a runner with all its labels)")
    parser.add_argument("--runner", action="append", metavar="LABELS", dest="labelled", default=[],
                        help="one more runner offering these comma-separated labels; repeat it for a "
                             "matrix, e.g. --runner py311 --runner lint")
    parser.add_argument("--port", type=int, default=8888,
                        help="dispatcher port (default 8888); the observer listens on PORT-1 and the "
                             "runners on PORT+1, PORT+2, ...; 0 picks free ports for all of them")
    parser.add_argument("--web-port", type=int, metavar="PORT",
                        help="port of the web page, on 127.0.0.1 (default 8080; with --port 0, a free one); "
                             "0 picks a free one")
    parser.add_argument("--no-web", action="store_true", help="do not start the web page (tinyci web)")
    parser.add_argument("--data", metavar="DIR", default=DATA,
                        help="where state, working clones and logs go (default .tinyci)")
    parser.add_argument("--interval", type=float, metavar="S",
                        help="seconds between the observer's looks at the repository "
                             "(default: observer.poll_interval, 1.0)")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration file passed to every daemon "
                             "(default: $TINYCI_CONFIG, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="daemons log debug detail")


def main(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except UpError as exc:
        print(f"tinyci up: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(Supervisor(plan).run())


# ---------------------------------------------------------------- what to start

@dataclass
class Child:
    name: str                     # dispatcher, observer, runner-1 ...
    daemon: str                   # module under ci.
    flags: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    addr: str = ""
    log_start: int = 0            # where this run's output begins in the (appended) log

    def argv(self) -> list[str]:
        return [sys.executable, "-m", f"ci.{self.daemon}", *self.flags]


@dataclass
class UpPlan:
    """What `tinyci up` starts, decided before anything starts: the clone, the
    data directory, the ports and how many runners, and the children's flags
    and environment."""

    repo: Path
    data: Path
    port: int
    runners: int
    common: list[str]             # flags every child gets (--config, -v)
    interval: float | None
    config: str | None
    demo: bool = False
    env: dict | None = None       # children's environment when it carries a secret we made
    secret_file: Path | None = None
    web_port: int | None = WEB_PORT   # None: no web page
    labels: list = field(default_factory=list)    # each runner's labels, runner-1 first
    demo_made: bool = False       # the demo repository was made now: its first commit is being built
    excluded: str = ""            # the line added to the watched clone's .git/info/exclude, if any
    reader: tuple = ("", None)    # (secret, TLS context) up reads the dispatcher with, for its build lines


def runner_labels(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Each runner's labels: --runners N of them with --labels, then one per --runner."""
    count = args.runners if args.runners is not None else (0 if args.labelled else 2)
    if count < 0:
        raise UpError(f"--runners must be 0 or more, got {count}")
    every = _labels("--labels", args.labels or "")
    runners = [every] * count + [_labels("--runner", text) for text in args.labelled]
    if not 1 <= len(runners) <= MAX_RUNNERS:
        raise UpError(f"tinyci up starts between 1 and {MAX_RUNNERS} runners (--runners N, --runner LABELS), "
                      f"not {len(runners)}")
    return runners


def _labels(flag: str, text: str) -> tuple[str, ...]:
    labels = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [label for label in labels if not patterns.is_name(label)]
    if bad:
        raise UpError(f"{flag}: label {bad[0]!r} must be a {patterns.NAME_RULE}")
    return labels


def make_plan(args: argparse.Namespace) -> UpPlan:
    labels = runner_labels(args)
    count = len(labels)
    if args.port != 0 and not 2 <= args.port <= 65535 - count:
        raise UpError(f"--port {args.port} leaves no room for the observer (PORT-1) and "
                      f"{count} runner(s) (PORT+1...); pick one between 2 and "
                      f"{65535 - count}, or 0 for free ports")
    web_port = None if args.no_web else (args.web_port if args.web_port is not None
                                         else 0 if args.port == 0 else WEB_PORT)
    if web_port is not None and not 0 <= web_port <= 65535:
        raise UpError(f"--web-port must be a port 0-65535 (0 for a free one), got {web_port}")
    if args.interval is not None and not args.interval > 0:
        raise UpError(f"--interval must be greater than 0, got {args.interval:g}")
    config = None
    if args.config:
        config = str(Path(args.config).resolve())
    # fail on a broken configuration here, once, instead of in every child
    try:
        settings = resolve(load(config))
    except ConfigError as exc:
        raise UpError(f"configuration error: {exc}") from None
    data = Path(args.data).resolve()
    demo_made = False
    if args.demo:
        demo_made = not (data / "demo-repo").exists()
        repo, demo = make_demo(data / "demo-repo"), True
    elif args.repo:
        repo, demo = find_repo(Path(args.repo), f"--repo {args.repo}"), False
    else:
        cwd = Path.cwd()
        if git_dir(cwd) is None:
            raise UpError(f"{cwd} is not in a git repository: pass --repo PATH to watch a clone, "
                          f"or --demo to try tinyci on a demo repository")
        repo, demo = find_repo(cwd, str(cwd)), False
    env = secret_file = None
    reader_secret = settings.secret(protocol.READER)
    if not settings.secured:
        secret_file = data / "secret"
        reader_secret = local_secret(secret_file)
        env = {**os.environ, "TINYCI_AUTH_SECRET": reader_secret}
    common = (["--config", config] if config else []) + (["-v"] if args.verbose else [])
    return UpPlan(repo=repo, data=data, port=args.port, runners=count, common=common,
                interval=args.interval, config=config, demo=demo, env=env, secret_file=secret_file,
                web_port=web_port, labels=labels, demo_made=demo_made, reader=(reader_secret, settings.client_tls),
                excluded="" if demo else exclude_data(repo, data))


def local_secret(path: Path) -> str:
    """The secret kept at ``path``, made (random, mode 0600) when there is none yet."""
    try:
        secret = path.read_text().strip()
        if secret:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)      # it grants control of every daemon: owner only
            return secret
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise UpError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    secret = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, (secret + "\n").encode(), mode=0o600)
    except OSError as exc:
        raise UpError(f"cannot write the daemons' secret to {path}: {exc.strerror or exc}") from None
    return secret


def exclude_data(repo: Path, data: Path) -> str:
    """Keep the data directory out of `git add -A` when it is inside the watched
    clone: add it to .git/info/exclude (local to this clone, unlike .gitignore).
    Returns the line added ("" when none was needed or it could not be)."""
    try:
        relative = data.resolve().relative_to(repo)
    except ValueError:
        return ""               # outside the clone (or a bare repository): nothing to hide
    if _git(repo, "check-ignore", "-q", "--no-index", str(relative / "secret")) is not None:
        return ""               # already ignored (.gitignore or exclude)
    path = _git(repo, "rev-parse", "--git-path", "info/exclude")
    if path is None:
        return ""
    exclude = Path(path) if Path(path).is_absolute() else repo / path
    line = f"/{relative.as_posix()}/"
    try:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n")
                           + f"# tinyci up: its data (secret, database, runners' clones)\n{line}\n")
    except OSError:
        return ""
    return line


def git_dir(path: Path) -> str | None:
    """The repository's top (or, for a bare one, its git dir), or None when path is in no repository."""
    bare = _git(path, "rev-parse", "--is-bare-repository")
    if bare is None:
        return None
    if bare == "true":
        return _git(path, "rev-parse", "--absolute-git-dir")
    return _git(path, "rev-parse", "--show-toplevel")


def _git(path: Path, *argv: str) -> str | None:
    """git's output, or None when it says no; UpError when git cannot run at all."""
    done = _run_git(path, list(argv))
    return done.out.strip() if done.ok else None


def _run_git(path: Path, argv: list[str]) -> gitops.GitResult:
    done = gitops.run(argv, path, timeout=GIT_TIMEOUT)
    if done.status < 0 and path.is_dir():       # git never answered (gitops.run reports it as < 0)
        if shutil.which("git") is None:
            raise UpError("git is not installed (or not on PATH); tinyci needs it")
        raise UpError(f"git took too long to answer about {path} ({done.err.strip() or 'killed'})")
    return done


def find_repo(path: Path, what: str) -> Path:
    if not path.exists():
        raise UpError(f"{what}: no such directory")
    if not path.is_dir():
        raise UpError(f"{what} is not a directory")
    top = git_dir(path)
    if top is None:
        raise UpError(f"{what} is not a git repository (give the path of a git clone)")
    return Path(top).resolve()


DEMO_FILES = {
    "README.md": "# tinyci demo\n\nEvery commit here is built by `tinyci up --demo`.\n",
    "calc.py": 'def add(a, b):\n    """The code under test."""\n    return a + b\n',
    # an (empty) conftest.py at the top puts the top on sys.path, so tests can `import calc`
    "conftest.py": "",
    "tests/test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}


def make_demo(path: Path) -> Path:
    """Create the demo repository once: a tiny module, a passing test, one commit on main."""
    if path.exists():
        top = git_dir(path)
        if top is None or Path(top).resolve() != path.resolve():
            raise UpError(f"{path} exists but is not the demo git repository; move it away or "
                          f"pick another --data directory")
        return path.resolve()
    try:
        path.mkdir(parents=True)
        for name, text in DEMO_FILES.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
    except OSError as exc:
        raise UpError(f"cannot create the demo repository at {path}: {exc.strerror}") from None
    steps = [["init", "-q"], ["symbolic-ref", "HEAD", "refs/heads/main"], ["add", "."],
             # an identity of its own and no signing or hooks: the first commit must not depend on
             # how the user's git is set up
             ["-c", "user.name=tinyci demo", "-c", "user.email=demo@tinyci.invalid",
              "-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", "Add calc and its test"]]
    for argv in steps:
        done = _run_git(path, argv)
        if not done.ok:
            raise UpError(f"cannot create the demo repository at {path}: git {argv[-1]}: "
                          f"{done.err.strip().splitlines()[-1:] or ['failed']}")
    # later commits by the user need an identity too; lend the demo one only when git has none
    if _git(path, "config", "user.email") is None:
        _git(path, "config", "user.name", "tinyci demo")
        _git(path, "config", "user.email", "demo@tinyci.invalid")
    return path.resolve()


# ---------------------------------------------------------------- running

class ChildFailed(Exception):
    def __init__(self, child: Child, why: str):
        super().__init__(why)
        self.child = child
        self.why = why


class Supervisor:
    def __init__(self, plan: UpPlan):
        self.plan = plan
        self.children: list[Child] = []
        self.logs = plan.data / "logs"
        self.drains: set[asyncio.Task] = set()

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"tinyci up: cannot create {self.logs}: {exc.strerror}", file=sys.stderr)
            return 2
        stopping = asyncio.create_task(stop.wait())
        reporter = None
        try:
            startup = asyncio.create_task(self.start_all())
            await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():              # Ctrl-C while starting
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
                print("tinyci up: stopping", file=sys.stderr)
                await self.stop_all()
                return 0
            try:
                startup.result()
            except ChildFailed as exc:
                await self.stop_all()
                self.report(exc.child, f"failed to start ({exc.why})")
                return 1
            self.print_summary()
            self.write_addresses()
            reporter = asyncio.create_task(self.report_builds())
            return await self.watch(stopping)
        finally:
            stopping.cancel()
            if reporter is not None:
                reporter.cancel()
            await self.stop_all()
            self.remove_addresses()

    def write_addresses(self) -> None:
        """DATA/up.json: where the daemons listen, for tools (and daemons started
        by hand) in or below this directory (``local.find_up``)."""
        addrs = {child.daemon: child.addr for child in self.children if child.daemon in ("dispatcher", "observer")}
        web = next((c.addr for c in self.children if c.daemon == "web"), None)
        try:
            files.atomic_write(self.plan.data / UP_FILE, json.dumps(
                {**addrs, **({"web": web} if web else {}), "pid": os.getpid()}, indent=1).encode())
        except OSError as exc:
            print(f"tinyci up: cannot write {self.plan.data / UP_FILE} ({exc.strerror or exc}); tools "
                  f"need --dispatcher", file=sys.stderr)

    def remove_addresses(self) -> None:
        try:
            (self.plan.data / UP_FILE).unlink()
        except OSError:
            pass

    async def report_builds(self) -> None:
        """One line in this window per build that ends (``waiting.verdict_line``)."""
        host, port = net.parse_addr(self.children[0].addr)
        secret, tls = self.plan.reader
        told: set[int] = set()
        try:
            async for kind, builds in waiting.build_events(
                    lambda: net.Client(host, port, protocol.READER, secret, ssl=tls), reconnect_for=None):
                for build in builds:
                    if build["status"] not in waiting.FINAL or build["id"] in told:
                        continue
                    told.add(build["id"])
                    if kind == "build":         # not one that ended before we looked
                        print(waiting.verdict_line(build, with_time=True), flush=True)
        except (net.PeerError, protocol.RemoteError, protocol.ProtocolError) as exc:
            print(f"tinyci up: no more build lines here: {exc}", file=sys.stderr)

    async def start_all(self) -> None:
        plan = self.plan
        port = lambda offset: 0 if plan.port == 0 else plan.port + offset   # noqa: E731
        dispatcher = self.child("dispatcher", "dispatcher", [
            "--host", "127.0.0.1", "--port", str(port(0)), "--data", str(plan.data / "dispatcher")])
        await self.start(dispatcher)
        await self.ready(dispatcher)
        observer = self.child("observer", "observer", [
            "--host", "127.0.0.1", "--port", str(port(-1)), "--repo", str(plan.repo),
            "--dispatcher", dispatcher.addr, "--state", str(plan.data / "observer"),
            *(["--interval", f"{plan.interval:g}"] if plan.interval is not None else [])])
        runners = [self.child(f"runner-{n}", "runner", [
            "--host", "127.0.0.1", "--port", str(port(n)), "--dispatcher", dispatcher.addr,
            "--name", f"runner-{n}", "--workdir", str(plan.data / "runners" / f"runner-{n}"),
            *(["--labels", ",".join(labels)] if labels else [])])
            for n, labels in enumerate(plan.labels or [()] * plan.runners, 1)]
        others = [observer, *runners]
        if plan.web_port is not None:
            others.append(self.child("web", "web", ["--host", "127.0.0.1", "--port", str(plan.web_port),
                                                    "--dispatcher", dispatcher.addr]))
        for child in others:
            await self.start(child)
        waits = [asyncio.create_task(self.ready(child)) for child in others]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in waits:
                task.cancel()
        # only finished tasks can be asked for their exception; the rest were just cancelled
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    def child(self, name: str, daemon: str, flags: list[str]) -> Child:
        log_path = self.logs / f"{name}.log"
        return Child(name, daemon, [*flags, *self.plan.common, "--log-file", str(log_path)], log_path)

    async def start(self, child: Child) -> None:
        try:
            with open(child.log_path, "ab") as log:
                child.log_start = log.tell()
                log.write(f"--- tinyci up: {shlex.join(child.argv())}\n".encode())
                log.flush()
                child.proc = await asyncio.create_subprocess_exec(
                    *child.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=self.env(child),
                    # its own session: Ctrl-C reaches only us, and we stop the children in order
                    start_new_session=True)
        except OSError as exc:
            raise ChildFailed(child, f"cannot start it: {exc.strerror or exc}") from None
        self.children.append(child)

    def env(self, child: Child) -> dict | None:
        """A child's environment. The web page reads builds and nothing more: it
        gets the secret as the reader's only (one secret here, so the same value,
        but a configuration with a reader secret of its own keeps it apart)."""
        env = self.plan.env
        if env is None or child.daemon != "web" or "TINYCI_AUTH_SECRET" not in env:
            return env
        env = dict(env)
        env["TINYCI_AUTH_READER_SECRET"] = env.pop("TINYCI_AUTH_SECRET")
        return env

    async def ready(self, child: Child) -> None:
        """Wait for the child's ready line; then keep draining its stdout so it never blocks."""
        assert child.proc is not None and child.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while True:
            try:
                line = await asyncio.wait_for(child.proc.stdout.readline(),
                                              max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ChildFailed(child, f"no ready line within {READY_TIMEOUT:g}s") from None
            if not line:
                try:
                    code = await asyncio.wait_for(child.proc.wait(), STOP_GRACE)
                except asyncio.TimeoutError:
                    raise ChildFailed(child, "it closed its output without saying it was ready") from None
                raise ChildFailed(child, f"exit status {code}")
            ready = parse_ready(line.decode(errors="replace"))
            if ready and ready[0] == child.daemon:
                child.addr = f"{ready[1]}:{ready[2]}"
                self.drains.add(asyncio.create_task(_drain(child.proc.stdout)))
                return

    async def watch(self, stopping: asyncio.Task) -> int:
        """Run until a stop signal (exit 0) or until a child dies (exit 1)."""
        waits = {asyncio.create_task(child.proc.wait()): child for child in self.children if child.proc}
        done, _ = await asyncio.wait({stopping, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            if task not in done:
                task.cancel()
        dead = [waits[task] for task in done if task in waits]
        if not dead:
            print("\ntinyci up: stopping", file=sys.stderr)
            await self.stop_all()
            return 0
        child = dead[0]
        await self.stop_all()
        self.report(child, f"stopped unexpectedly (exit status {child.proc.returncode})")
        return 1

    async def stop_all(self) -> None:
        """SIGTERM every live child by PID, wait up to STOP_GRACE, then SIGKILL the rest."""
        live = [c for c in self.children if c.proc is not None and c.proc.returncode is None]
        for child in live:
            _signal(child, signal.SIGTERM)
        waits = [asyncio.create_task(c.proc.wait()) for c in live]
        if waits:
            await asyncio.wait(waits, timeout=STOP_GRACE)
        for child in live:
            if child.proc.returncode is None:
                print(f"tinyci up: {child.name} did not stop within {STOP_GRACE:g}s; killing it",
                      file=sys.stderr)
                _signal(child, signal.SIGKILL)
                await child.proc.wait()

    def report(self, child: Child, what: str) -> None:
        pid = f" (pid {child.proc.pid})" if child.proc else ""
        print(f"tinyci up: the {child.name}{pid} {what}; the others were stopped.", file=sys.stderr)
        tail = _tail(child.log_path, child.log_start, LOG_TAIL)
        if tail:
            print(f"Last lines of its log, {_show(child.log_path)}:", file=sys.stderr)
            for line in tail:
                print(f"  {line}", file=sys.stderr)
        if child.daemon == "web" and any("already in use" in line for line in tail):
            print("Choose another port for the web page with --web-port (0 for a free one), or --no-web.",
                  file=sys.stderr)
        elif self.plan.port and any("already in use" in line for line in tail):
            print(f"tinyci up uses ports {self.plan.port - 1} to {self.plan.port + self.plan.runners}; "
                  f"choose others with --port, or --port 0 for free ones.", file=sys.stderr)

    def print_summary(self) -> None:
        plan = self.plan
        dispatcher = self.children[0]
        web = next((c for c in self.children if c.daemon == "web"), None)
        if web is not None:
            print(f"tinyci is up: {web.addr}")
            print(f"watching {_show(plan.repo)}")
        else:
            print(f"tinyci is up, watching {_show(plan.repo)}")
        labels = dict(zip((c.name for c in self.children if c.daemon == "runner"), plan.labels))
        for child in self.children:
            offers = f"  labels {','.join(labels[child.name])}" if labels.get(child.name) else ""
            print(f"  {child.name:<12} {child.addr:<22} pid {child.proc.pid:<8} log {_show(child.log_path)}"
                  + offers)
        # tools in (or below) the directory holding the default .tinyci find the addresses in up.json
        local = plan.data == Path(DATA).resolve()
        flags = ""
        if dispatcher.addr != "127.0.0.1:8888" and not local:
            flags += f" --dispatcher {dispatcher.addr}"
        if plan.config:
            flags += f" --config {shlex.quote(_show(Path(plan.config)))}"
        print()
        if plan.demo:
            repo = shlex.quote(_show(plan.repo))
            print(f"The demo repository is {_show(plan.repo)}"
                  + ("; its first commit is being built now." if plan.demo_made else "."))
            print("Make another commit there to start a build:")
            print(f"  cd {repo} && echo '# more' >> calc.py && git commit -qam 'Try tinyci'")
            print("or one whose test fails:")
            print(f"  cd {repo} && echo 'def test_fails(): assert add(1, 1) == 3' >> tests/test_calc.py"
                  f" && git commit -qam 'Add a failing test'")
            print()
        print(f"Runners and recent builds:  tinyci status{flags}")
        print(f"Build N's log as it runs:   tinyci log N --follow{flags}")
        print(f"Build logs are in {_show(plan.data / 'dispatcher' / 'logs')}/, "
              f"daemon logs in {_show(self.logs)}/.")
        if plan.excluded:
            print(f"Added {plan.excluded} to the clone's .git/info/exclude, so `git add -A` leaves it out.")
        if plan.secret_file is not None:
            print(f"The daemons' secret is in {_show(plan.secret_file)}"
                  + ("; tools run in this directory or below it use it." if local else
                     f"; for tools elsewhere: export TINYCI_AUTH_SECRET_FILE={shlex.quote(str(plan.secret_file))}"))
        print("Press Ctrl-C to stop everything.", flush=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def _signal(child: Child, sig: int) -> None:
    try:
        child.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, start: int, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            if start > os.fstat(f.fileno()).st_size:
                start = 0           # the log was rotated since: all of it is newer
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if not line.startswith("--- tinyci up:")][-lines:]


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (ValueError, OSError):
        return str(path)
