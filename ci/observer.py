"""The observer daemon: watches one git clone and reports each new commit,
oldest first, to the dispatcher.

It scans every ``poll_interval`` seconds, or at once when poked (a git hook
runs ``tinyci notify``; a forge's push webhook reaches ``tinyci web``, which
pokes). With ``observer.fetch`` it watches the remote's branches instead of
local ones, and runs ``git fetch --prune <remote>`` first: on every poke, and
otherwise every ``fetch_interval`` seconds (0: before every look). What to
report is decided by ``gitwatch.plan`` (``observer.build``: every new commit,
the first-parent line, or heads only); this module only schedules scans,
talks to the dispatcher and keeps the saved position.

The saved position of a branch advances only after the dispatcher has
acknowledged a commit, and is written to disk atomically right then, so a
crash re-reports at most the commit in flight (the dispatcher de-duplicates)
and an unreachable dispatcher never loses one: the observer retries the same
commit with capped backoff until it is taken. A dispatcher that refuses our
credentials is not away: the observer stops, saying so in one line.

Sends:    commit {repo, branch, sha, author, subject, time, message, jobs?, config_error?}
          -> dispatcher, role "observer" (jobs and config_error: the commit's .ci.yaml, read here
          because the observer has the clone at hand)
Receives: poke {branch?} from roles observer and operator -> ok
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import aio, daemon, files, gitops, gitwatch, net, patterns, protocol
from .config import ObserverConfig
from .daemon import StartupError
from .settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 8887
BACKOFF_START = 0.2
# the roles it serves (poke); it uses observer towards the dispatcher
ACCEPTS = frozenset({protocol.OBSERVER, protocol.OPERATOR})
BACKOFF_CAP = 5.0
FETCH_TIMEOUT = 120.0
DESCRIBE_BUDGET = 0.5       # seconds of reading commits (and their .ci.yaml) before sending what was read
# Replies meaning "not now" rather than "not this commit": retry, never skip.
RETRY_CODES = frozenset({"internal", "busy", "disk_full"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    daemon.add_common_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--repo", metavar="PATH", help="the git clone to watch (observer.repo)")
    parser.add_argument("--dispatcher", metavar="HOST:PORT",
                        help="where to report commits (default 127.0.0.1:8888)")
    parser.add_argument("--interval", type=float, metavar="SECONDS",
                        help="seconds between scans when not poked (default 1)")
    parser.add_argument("--branches", type=_patterns, metavar="PATTERNS",
                        help="comma-separated branch patterns to watch, e.g. 'main,release/*' (default *)")
    parser.add_argument("--state", metavar="DIR",
                        help="where to keep the last reported commit of each branch "
                             "(default .tinyci/observer)")


def _patterns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(args: argparse.Namespace) -> int:
    overrides = {"observer": {
        "host": args.host, "port": args.port, "repo": args.repo, "dispatcher": args.dispatcher,
        "poll_interval": args.interval, "branches": args.branches, "state_dir": args.state}}

    async def body(stop: asyncio.Event) -> None:
        # loaded in here so a configuration error is a one-line StartupError too
        settings = daemon.load_config(args, overrides, ACCEPTS)
        await serve(settings, stop, args.insecure)

    return daemon.run("observer", body, args.verbose, args.log_file)


# ---------------------------------------------------------------- saved position

class StateFile:
    """The last acknowledged commit of each branch of one clone, in
    ``<state_dir>/<12 hex of sha1(repo path)>.json``, plus a lock file so two
    observers never share (and overwrite) one position."""

    def __init__(self, directory: Path, repo: Path):
        digest = hashlib.sha1(str(repo).encode(), usedforsecurity=False).hexdigest()[:12]
        self.directory = directory
        self.repo = repo
        self.path = directory / f"{digest}.json"
        self._lock = files.DirLock(directory / f"{digest}.lock")
        self._save_failing = False

    def lock(self) -> None:
        try:
            self._lock.acquire()
        except files.LockedError:
            raise StartupError(f"another observer is already watching {self.repo} "
                               f"(it holds {self._lock.path})") from None
        except OSError as exc:
            raise StartupError(f"cannot use state directory {self.directory}: {exc.strerror or exc}") from None

    def unlock(self) -> None:
        self._lock.release()

    def load(self) -> dict[str, str]:
        """The saved branches; a missing file is a fresh start, a corrupt one is set aside."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            return self._corrupt(f"cannot read it: {getattr(exc, 'strerror', None) or exc}")
        try:
            data = json.loads(text)
        except ValueError as exc:
            return self._corrupt(f"not valid JSON: {exc}")
        branches = data.get("branches") if isinstance(data, dict) else None
        if not isinstance(branches, dict) or not all(
                isinstance(k, str) and patterns.is_sha(v) for k, v in branches.items()):
            return self._corrupt("expected {\"repo\": ..., \"branches\": {branch: sha}}")
        if data.get("repo") != str(self.repo):
            return self._corrupt(f"it belongs to {data.get('repo')!r}, not {self.repo}")
        return dict(branches)

    def _corrupt(self, why: str) -> dict[str, str]:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
            kept = f"; kept as {aside}"
        except OSError:
            kept = ""
        log.warning("state file %s is unusable (%s)%s; starting afresh: reporting only the "
                    "head of each branch", self.path, why, kept)
        return {}

    def save(self, branches: dict[str, str]) -> None:
        """Write atomically (files.atomic_write); a failure is logged, not fatal:
        the worst outcome is re-reporting after a restart, which is harmless."""
        data = json.dumps({"repo": str(self.repo), "branches": branches}, indent=1, sort_keys=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)     # someone may have removed it
            files.atomic_write(self.path, data.encode())
        except OSError as exc:
            if not self._save_failing:
                log.error("cannot save state file %s: %s (will re-report after a restart)",
                          self.path, exc.strerror or exc)
            self._save_failing = True
            return
        if self._save_failing:
            log.info("state file %s saved again", self.path)
        self._save_failing = False


# ---------------------------------------------------------------- the daemon

@dataclass(frozen=True)
class Setup:
    """Everything checked at start-up, before anything listens."""

    config: ObserverConfig
    repo: Path              # absolute path of the clone
    repo_url: str           # what runners clone, sent as commit.repo
    dispatcher: tuple[str, int]


def check(cfg: ObserverConfig) -> Setup:
    """Start-up checks; each failure is one StartupError line naming what to fix."""
    if not cfg.repo:
        raise StartupError("no repository to watch: pass --repo PATH or set observer.repo")
    # absolute but not resolved: errors and the state file name the path the user gave
    repo = Path(os.path.abspath(Path(cfg.repo).expanduser()))
    problem = gitwatch.Clone.problem(repo)
    if problem:
        raise StartupError(problem)
    try:
        dispatcher = net.parse_addr(cfg.dispatcher)
    except ValueError as exc:
        raise StartupError(f"bad dispatcher address (--dispatcher / observer.dispatcher): {exc}") from None
    if not cfg.branches:
        raise StartupError("observer.branches is empty: there is no branch to watch")
    repo_url = cfg.repo_url
    if cfg.fetch and not repo_url:
        # remote-tracking refs are not cloned by runners, so let them build from the remote itself
        try:
            repo_url = gitwatch.Clone(repo, remote=cfg.remote).remote_url()
        except gitops.GitReadError as exc:
            raise StartupError(f"observer.fetch is on but {exc} (set observer.remote)") from None
    return Setup(cfg, repo, repo_url or str(repo), dispatcher)


async def serve(settings: Settings, stop: asyncio.Event, insecure: bool = False) -> None:
    setup = check(settings.config.observer)
    cfg = setup.config
    accepts = ACCEPTS
    daemon.check_exposure("observer", cfg.host, settings, sorted(accepts), insecure)
    state = StateFile(Path(os.path.abspath(Path(cfg.state_dir).expanduser())), setup.repo)
    state.lock()
    client = net.Client(*setup.dispatcher, role=protocol.OBSERVER, secret=settings.secret(protocol.OBSERVER),
                        limits=settings.limits, ssl=settings.client_tls, to=protocol.DISPATCHER_ID)
    try:
        observer = Observer(setup, state, client)
        server = await daemon.listen(
            lambda: net.serve(observer.handle, cfg.host, cfg.port, keys=settings.key,
                              roles=accepts, limits=settings.limits, name="observer",
                              identity=protocol.OBSERVER_ID, ssl=settings.server_tls),
            "observer", cfg.host, cfg.port)
        port = server.sockets[0].getsockname()[1]
        log.info("state in %s (%d branches known); reporting to %s", state.path,
                 len(observer.branches), client.addr)
        daemon.announce("observer", cfg.host, port, f" watching {setup.repo}")
        watching = asyncio.create_task(observer.watch())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done() and not watching.cancelled() and isinstance(watching.exception(), Refused):
                raise StartupError(str(watching.exception()))
        finally:
            stopping.cancel()
            await _cancel(watching)
            server.close()
    finally:
        await client.close()
        state.unlock()


async def _cancel(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait for it to end. Cancelling is safe at any await:
    the state is only touched between awaits. Cancelling more than once,
    because before Python 3.12 ``asyncio.wait_for`` swallows a cancellation
    that lands just as its inner await completes (a reply arriving as we stop)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), Refused):
        log.error("the scan loop failed", exc_info=task.exception())


class Refused(Exception):
    """The dispatcher refused our credentials (or is not the dispatcher): the
    observer stops with this one line instead of retrying a secret forever."""


class Observer:
    def __init__(self, setup: Setup, state: StateFile, client: net.Client):
        cfg = setup.config
        self.setup = setup
        self.interval = cfg.poll_interval
        self.fetch_interval = cfg.fetch_interval
        self.state = state
        self.client = client
        self.clone = gitwatch.Clone(setup.repo, cfg.branches, cfg.remote if cfg.fetch else None, cfg.build)
        self.branches = state.load()
        self.wake = asyncio.Event()
        self._poked = False                     # a poke came since the last scan began: fetch then
        self._fetched_at: float | None = None   # time.monotonic() of the last fetch begun
        self._git_failing = False
        self._fetch_failing = False
        self._dispatcher_down = False

    async def handle(self, conn: net.Connection, msg: dict) -> dict:
        if msg["type"] != "poke":
            return protocol.error("unsupported", f"the observer does not handle {msg['type']!r}")
        log.debug("poked by %s (%s)", conn.peer, msg.get("branch") or "any branch")
        self._poked = True
        self.wake.set()
        return protocol.ok()

    async def watch(self) -> None:
        """Scan, then wait for a poke or the interval; runs until cancelled."""
        while True:
            # cleared before scanning: a poke during the scan means one more scan, not one per poke
            self.wake.clear()
            poked, self._poked = self._poked, False
            try:
                await self.scan(fetch=poked or self._fetch_due())
            except (asyncio.CancelledError, Refused):
                raise
            except Exception:
                log.exception("scanning %s failed; trying again next scan", self.setup.repo)
            try:
                await aio.within(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def _fetch_due(self) -> bool:
        """No poke: fetch when fetch_interval has passed since the last fetch (0: always)."""
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self.fetch_interval

    async def scan(self, fetch: bool = True) -> None:
        """One look at the branches; with ``fetch`` (and observer.fetch on) the remote is fetched first."""
        if self.clone.remote and fetch:
            self._fetched_at = time.monotonic()
            await self.fetch()
        try:
            plan = await aio.in_thread(self.clone.plan, dict(self.branches))
        except gitops.GitReadError as exc:
            self._read_failed(exc)
            return
        self._read_again()
        for branch, old in plan.dropped:
            log.info("branch %s is gone (or no longer watched); forgetting it (last reported %s)",
                     branch, old[:12])
            del self.branches[branch]
        if plan.dropped:
            self.state.save(self.branches)
        for branch, old, new in plan.forced:
            log.warning("branch %s was force-pushed: %s is no longer in its history; reporting only "
                        "its new head %s", branch, old[:12], new[:12])
        # branches take turns, and commits are read a batch at a time: a branch
        # with many commits or a costly .ci.yaml holds the others back by one
        # commit at a time (see gitwatch.describe), never by all of its own
        pending = gitwatch.interleave(plan.report)
        while pending:
            try:
                commits = await aio.in_thread(self.clone.describe, pending, DESCRIBE_BUDGET)
            except gitops.GitReadError as exc:
                self._read_failed(exc)
                return
            pending = pending[len(commits):]
            for commit in commits:
                await self.deliver(commit)
                self.branches[commit.branch] = commit.sha
                self.state.save(self.branches)

    def _read_failed(self, exc: gitops.GitReadError) -> None:
        if not self._git_failing:
            log.warning("%s; trying again next scan", exc)
        self._git_failing = True

    def _read_again(self) -> None:
        if self._git_failing:
            log.info("%s is readable again", self.setup.repo)
        self._git_failing = False

    async def fetch(self) -> None:
        remote = self.clone.remote
        # cancellable: stopping the observer mid-fetch ends git and its ssh child at once
        done = await gitops.run_cancellable(["fetch", "--prune", "--quiet", remote], self.setup.repo,
                                            timeout=FETCH_TIMEOUT)
        problem = None if done.ok else (done.err.strip().splitlines() or [f"exit code {done.status}"])[-1]
        if problem:
            if not self._fetch_failing:
                log.warning("git fetch %s in %s failed: %s; watching the branches as last fetched",
                            remote, self.setup.repo, problem)
            self._fetch_failing = True
        elif self._fetch_failing:
            log.info("git fetch %s works again", remote)
            self._fetch_failing = False

    async def deliver(self, commit: gitwatch.Commit) -> None:
        """Send one commit until the dispatcher acknowledges or refuses it."""
        msg = {"type": "commit", "repo": self.setup.repo_url, "branch": commit.branch, "sha": commit.sha,
               "author": commit.author, "subject": commit.subject, "time": commit.time,
               "message": commit.message}
        if commit.jobs is not None:
            msg["jobs"] = commit.jobs
        if commit.config_error:
            msg["config_error"] = commit.config_error
        name = f"commit {commit.sha[:12]} on {commit.branch}"
        try:
            protocol.validate(msg, protocol.OBSERVER)
        except protocol.ProtocolError as exc:
            log.error("cannot report %s: %s; skipping it", name, exc.message)
            return
        retry = aio.Backoff(BACKOFF_START, BACKOFF_CAP)
        while True:
            try:
                reply = await self.client.request(msg)
            except net.PeerAuthFailed as exc:
                raise Refused(f"dispatcher {exc}; check auth.observer_secret / auth.secret (under `tinyci up`, "
                              f"start the observer in or below the directory up ran in)") from None
            except (net.PeerError, protocol.ProtocolError) as exc:
                self._outage(f"dispatcher {self.client.addr} is unreachable: {exc}", name)
            except protocol.RemoteError as exc:
                if exc.code == "auth_failed":
                    raise Refused(f"dispatcher {self.client.addr} refused our credentials; check "
                                  f"auth.observer_secret / auth.secret") from None
                if exc.code not in RETRY_CODES:
                    log.error("dispatcher %s refused %s: %s: %s; moving on",
                              self.client.addr, name, exc.code, exc.message)
                    return
                self._outage(f"dispatcher {self.client.addr} cannot take commits now ({exc.code}: {exc.message})",
                             name)
            else:
                if self._dispatcher_down:
                    log.info("dispatcher %s is reachable again", self.client.addr)
                self._dispatcher_down = False
                log.info("reported %s: build %s%s", name, reply["build"],
                         " (already known)" if reply["duplicate"] else "")
                return
            await asyncio.sleep(retry.next())

    def _outage(self, what: str, name: str) -> None:
        if not self._dispatcher_down:
            log.warning("%s; holding %s and retrying", what, name)
        self._dispatcher_down = True


if __name__ == "__main__":
    import sys
    from .cli import main as cli
    sys.exit(cli(["observer", *sys.argv[1:]]))
