"""Runs one build attempt on a runner: checks the exact commit out in the
slot's working clone (fetching only when the clone lacks it), runs each step
in its own process group under the build's time limit, and writes the
attempt's log.

The steps are those of the job's ``.ci.yaml`` at the checked-out commit (the
one source of truth for a repository that has the file), else the ``steps``
of the ``run`` request. After the steps (passed or failed) the files matching
the file's ``artifacts`` globs are handed to ``upload``.

It knows nothing about the network: ``runner.py`` turns a ``run`` request into
a ``Job``, gives it a ``BuildLog`` whose writes wake the log sender and an
``upload`` coroutine for artifacts, and reports the ``Outcome``. ``Execution.stop`` ends it from outside (cancel, a
stale lease, shutdown) by killing the running step's whole process group.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import git

from . import aio, buildfile
from .buildfile import BuildFile, BuildFileError, Step
from .models import Status

log = logging.getLogger(__name__)

DEFAULT_TEST_STEP = "python -m pytest -q"
NO_STEPS = "no build steps: set build.steps in the dispatcher's config or add .ci.yaml with steps"
READ_SIZE = 1 << 16
OUTPUT_DRAIN = 2.0      # after a step ends, how long to wait for the last of its output


@dataclass(frozen=True)
class Job:
    """What one ``run`` asks for."""

    build: int
    attempt: int
    repo: str
    sha: str
    branch: str
    steps: tuple = ()
    timeout: float = 600.0
    env: dict = field(default_factory=dict)
    job: str = ""                       # the .ci.yaml job to run
    artifacts_limit: int = 100 << 20    # bytes of artifacts the dispatcher takes


@dataclass(frozen=True)
class Outcome:
    status: Status
    exit_code: int          # the failing step's exit code; 0 passed; -1 error/timeout/cancel
    steps: int              # steps started
    duration: float


class CheckoutError(Exception):
    """The commit could not be checked out; the message goes into the build log."""


class Stopped(Exception):
    """The execution was stopped from outside while it waited."""


# ---------------------------------------------------------------- the log

class BuildLog:
    """The attempt's log file, written as UTF-8 and flushed on every write so
    the sender can read it as it grows."""

    def __init__(self, path: Path, on_write: Callable[[], None] = lambda: None):
        self.path = path
        self.size = 0
        self._on_write = on_write
        self._file: Any = open(path, "wb")
        self._line_start = True

    def write(self, text: str) -> None:
        if not text or self._file is None:
            return
        data = text.encode("utf-8", "replace")
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            # a full disk must not kill the build; the log simply stops here
            log.error("cannot write build log %s: %s; the rest of this log is lost", self.path, exc)
            self._file = None
            return
        self.size += len(data)
        self._line_start = text.endswith("\n")
        self._on_write()

    def line(self, text: str) -> None:
        """Write one line of our own, starting it on a fresh line."""
        self.write(("" if self._line_start else "\n") + text + "\n")

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())   # the outbox entry written next promises this log
        except OSError as exc:
            log.error("cannot sync build log %s: %s", self.path, exc)
        self._file.close()
        self._file = None


# ---------------------------------------------------------------- process groups

def _group_members(pgid: int) -> list[int] | None:
    """Live (not zombie) processes in group ``pgid``, read from /proc; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False    # not even a zombie: spare the scan of /proc, as at the end of most steps
    except PermissionError:
        pass
    members = _group_members(pgid)      # zombies count for killpg but are dead
    return True if members is None else bool(members)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("cannot signal process group %d: %s", pgid, exc)
        return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _mark_group(checkout: Path, pgid: int) -> Path:
    """Note a running step's process group beside its checkout, so a runner
    restarted after a SIGKILL can end what its predecessor left running there."""
    marker = checkout.with_name(checkout.name + ".pgid")
    marker.write_text(f"{pgid} {_boot_id()}\n")
    return marker


def reap_orphans(checkouts: Path) -> list[int]:
    """Kill the step process groups a previous run of this runner left behind
    (it was killed mid-step); returns the groups killed. A marker from before a
    reboot names nothing: its group ids may belong to anyone now."""
    killed = []
    boot = _boot_id()
    for marker in checkouts.glob("*.pgid"):
        try:
            pgid_text, _, marked_boot = marker.read_text().strip().partition(" ")
            pgid = int(pgid_text)
        except (OSError, ValueError):
            pgid = 0
            marked_boot = ""
        if pgid > 1 and marked_boot == boot and group_alive(pgid) and _signal_group(pgid, signal.SIGKILL):
            killed.append(pgid)
        marker.unlink(missing_ok=True)
    return killed


async def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM every process in the group, then SIGKILL whatever is left after ``grace`` seconds."""
    if not group_alive(pgid) or not _signal_group(pgid, signal.SIGTERM):
        return
    _signal_group(pgid, signal.SIGCONT)     # a stopped process only sees SIGTERM once resumed
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        await asyncio.sleep(0.05)
    if group_alive(pgid):
        log.info("process group %d ignored SIGTERM for %gs; sending SIGKILL", pgid, grace)
        _signal_group(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- git



def _git_run(args: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str]:
    try:
        status, out, err = git.Git(str(cwd)).execute(
            ["git", *args], with_extended_output=True, with_exceptions=False,
            kill_after_timeout=max(timeout, 1.0), env=env)
    except git.GitError as exc:         # git missing, or it could not be started
        return -1, str(exc)
    return status, "\n".join(part for part in (out, err) if part)


def has_tests(root: Path) -> bool:
    if (root / "tests").is_dir() or (root / "test").is_dir():
        return True
    return any(p.is_file() and (p.name.startswith("test_") or p.name.endswith("_test.py"))
               for p in root.glob("*.py"))


def read_buildfile(root: Path) -> BuildFile | None:
    """The checkout's ``.ci.yaml``; None without one. Raises BuildFileError when it is unusable."""
    path = root / buildfile.FILENAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BuildFileError(0, "is not a regular file")
    if not path.exists():
        return None
    try:
        return buildfile.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildFileError(0, f"cannot be read: {exc}") from None


def find_artifacts(root: Path, patterns: tuple, limit: int) -> tuple[list[tuple[str, Path, int]], list[str]]:
    """Regular files inside ``root`` matching ``patterns``, as (relative path, path,
    size), in order, within ``limit`` bytes in all; and notes on what was left out.
    Symlinks are never followed: a link could point anywhere on the runner."""
    root = root.resolve()
    found: dict[str, tuple[Path, int]] = {}
    notes = []
    for pattern in patterns:
        matched = False
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel in found or rel.split("/")[0] == ".git":
                continue
            matched = True
            if any(p.is_symlink() for p in [path, *path.parents] if root in p.parents):
                notes.append(f"{rel}: a symlink (or inside one); not sent")
                continue
            if path.is_dir():
                for inner in sorted(path.rglob("*")):
                    if inner.is_file() and not inner.is_symlink() and not any(
                            p.is_symlink() for p in inner.parents if root in p.parents):
                        found.setdefault(inner.relative_to(root).as_posix(), (inner, inner.stat().st_size))
            elif path.is_file():
                found[rel] = (path, path.stat().st_size)
        if not matched:
            notes.append(f"{pattern}: matched nothing")
    chosen, total = [], 0
    for rel, (path, size) in found.items():
        if total + size > limit:
            notes.append(f"{rel}: {size} bytes would exceed the {limit}-byte artifact limit; not sent")
            continue
        total += size
        chosen.append((rel, path, size))
    return chosen, notes


def build_env(job: Job, base: dict | None = None) -> dict:
    """The environment a step sees."""
    base = dict(os.environ if base is None else base)
    # the runner's own settings (a TINYCI_AUTH_SECRET above all) are not the build's business
    env = {k: v for k, v in base.items() if not k.startswith("TINYCI_")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH") or os.defpath])
    env.update(CI="true", CI_BUILD=str(job.build), CI_COMMIT=job.sha, CI_BRANCH=job.branch,
               CI_ATTEMPT=str(job.attempt), PYTHONUNBUFFERED="1")
    env.update(job.env)
    return env


# ---------------------------------------------------------------- one attempt

class Execution:
    """One attempt in progress in one slot's checkout."""

    def __init__(self, job: Job, checkout: Path, buildlog: BuildLog, kill_grace: float,
                 header: str = "", upload: Callable[[str, Path], Any] | None = None):
        self.job = job
        self.upload = upload        # async (relative path, file) -> None; raises OSError to refuse
        self.checkout = checkout.absolute()
        self.log = buildlog
        self.kill_grace = kill_grace
        self.header = header
        self.stop_reason: str | None = None
        self.lingering: asyncio.Future | None = None    # a git command still running after a stop
        self._stop = asyncio.Event()

    def stop(self, reason: str, grace: float | None = None) -> None:
        """End the attempt: ``reason`` is "cancelled", "stale" or "shutdown"."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if grace is not None:
            self.kill_grace = min(self.kill_grace, grace)
        self._stop.set()

    async def run(self) -> Outcome:
        started = time.monotonic()
        steps_run = 0

        def done(status: Status, code: int = -1) -> Outcome:
            return Outcome(status, code, steps_run, round(time.monotonic() - started, 3))

        job = self.job
        deadline = started + job.timeout
        self.limit = job.timeout
        self.log.line(f"{self.header}build {job.build} attempt {job.attempt}: "
                      f"commit {job.sha} on {job.branch} from {job.repo}")
        try:
            try:
                await self._checkout(deadline)
            except CheckoutError as exc:
                self.log.line(f"checkout failed: {exc}")
                return done(Status.ERROR)
            env = build_env(job)
            spec = None
            try:
                spec = read_buildfile(self.checkout)
                if spec is not None:
                    steps, timeout, file_env = spec.plan(job.job)
                    env.update(file_env)
                    if timeout is not None:
                        deadline, self.limit = started + timeout, timeout
                    source = buildfile.FILENAME + (f" (job {job.job})" if job.job else "")
                elif job.job:
                    raise BuildFileError(0, f"is missing, but this build is its job {job.job!r}")
            except BuildFileError as exc:
                self.log.line(f"build error: {exc}")
                return done(Status.ERROR)
            if spec is None:
                steps, source = tuple(Step(command) for command in job.steps), "the dispatcher's build.steps"
            if not steps and has_tests(self.checkout):
                steps, source = (Step(DEFAULT_TEST_STEP),), "the default for a repository with tests"
            if not steps:
                self.log.line(NO_STEPS)
                return done(Status.ERROR)
            self.log.line(f"{len(steps)} step(s) from {source}")
            status, code = Status.PASSED, 0
            for number, step in enumerate(steps, 1):
                steps_run = number
                if step.name:
                    self.log.line(f"--- step {number}: {step.name} ---")
                step_deadline, why = deadline, f"{self.limit:g} s (the build's time limit)"
                if step.timeout is not None and time.monotonic() + step.timeout < deadline:
                    step_deadline, why = time.monotonic() + step.timeout, f"{step.timeout:g} s (the step's time limit)"
                how, code = await self._step(step.run, {**env, **step.env}, step_deadline, why)
                if how == "error":
                    return done(Status.ERROR)
                if how == "timeout" or code != 0:
                    if number < len(steps):
                        self.log.line(f"[step {number} failed; skipping {len(steps) - number} more]")
                    status = Status.FAILED
                    break
            if spec is not None and spec.artifacts:
                await self._artifacts(spec.artifacts)
            return done(status, code)
        except Stopped as exc:
            if not exc.args:            # a step already said how it ended
                self.log.line(f"[{self.stop_reason}]")
            return done(Status.CANCELLED)
        except Exception as exc:  # a runner bug must still end the build with a result
            log.exception("build %d attempt %d: runner failure", job.build, job.attempt)
            self.log.line(f"runner failure: {type(exc).__name__}: {exc}")
            return done(Status.ERROR)

    # ------------------------------------------------------------ checkout

    async def _git(self, args: list[str], deadline: float, cwd: Path | None = None,
                   quiet: bool = False) -> tuple[int, str]:
        if self._stop.is_set():
            raise Stopped()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CheckoutError(f"timed out after {self.job.timeout:g} s")
        if not quiet:
            self.log.line("$ git " + " ".join(args))
        env = {"GIT_TERMINAL_PROMPT": "0"}
        if cwd is None:
            # pin git to the checkout: never act on a repository around the workdir
            env.update(GIT_DIR=str(self.checkout / ".git"), GIT_WORK_TREE=str(self.checkout))
        work = asyncio.ensure_future(aio.in_thread(_git_run, args, cwd or self.checkout, env, remaining))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not work.done():
            self.lingering = work       # the slot stays taken until git is done with it
            raise Stopped()
        status, text = work.result()
        if text and not quiet:
            self.log.write(text + "\n")
        return status, text

    async def _checkout(self, deadline: float) -> None:
        job, path = self.job, self.checkout
        repo = job.repo
        if not repo or repo.startswith("-"):
            raise CheckoutError(f"bad repository address {repo!r}")
        if os.path.exists(repo):
            repo = os.path.abspath(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        status = 128
        if (path / ".git").is_dir():
            # the workdir is ours alone (locked): a lock file here is left from a killed git
            for stale in (path / ".git").glob("*.lock"):
                stale.unlink(missing_ok=True)
            if _origin_url(path) == repo and await self._try_checkout(deadline):
                # the usual case: a clone of this repository that has the commit already.
                # Commits are immutable, so a fetch would change nothing this build sees
                # but the remote branches and tags: none, two git commands in all
                await self._must(["clean", "-ffdx"], deadline)
                return
            # one git command for two questions: is the clone sound (else 128), and has it
            # the commit already (0) or not (1)
            status, _ = await self._git(["rev-parse", "--verify", "--quiet", f"{job.sha}^{{commit}}"],
                                        deadline, quiet=True)
            if status not in (0, 1):
                self.log.line(f"the working clone {path} is damaged; cloning it again")
        if status not in (0, 1):
            if path.exists():
                await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path)
            status, text = await self._git(["clone", "--no-checkout", "--", repo, str(path)],
                                           deadline, cwd=path.parent)
            if status != 0:
                raise CheckoutError(f"git clone of {repo} failed: {_last_line(text)}")
            if await self._try_checkout(deadline):
                return              # a fresh clone holds nothing to clean
            present = False
        else:
            if _origin_url(path) != repo:   # not surely ours (rare): ask git itself, then fix it
                found, url = await self._git(["config", "--get", "remote.origin.url"], deadline,
                                             quiet=True)
                if found == 1:          # no origin: someone removed it
                    await self._must(["remote", "add", "origin", repo], deadline)
                elif found != 0 or url.strip() != repo:
                    await self._must(["remote", "set-url", "origin", repo], deadline)
            present = status == 0
            if not present:
                await self._must(["fetch", "--force", "--prune", "--tags", "origin",
                                  "+refs/heads/*:refs/remotes/origin/*"], deadline)
                present = await self._has(job.sha, deadline)
        if not present:
            await self._git(["fetch", "--force", "origin", job.sha], deadline)
            if not await self._has(job.sha, deadline):
                raise CheckoutError(f"commit {job.sha} is not in {repo} "
                                    f"(fetched its branches, its tags and the commit itself)")
        await self._must(["checkout", "--force", "--detach", job.sha], deadline)
        await self._must(["clean", "-ffdx"], deadline)

    async def _must(self, args: list[str], deadline: float) -> None:
        status, text = await self._git(args, deadline)
        if status != 0:
            raise CheckoutError(f"git {args[0]} failed (exit {status}): {_last_line(text)}")

    async def _try_checkout(self, deadline: float) -> bool:
        """Check the commit out if the clone has it; logged only when that worked."""
        args = ["checkout", "--force", "--detach", self.job.sha]
        status, text = await self._git(args, deadline, quiet=True)
        if status == 0:
            self.log.line("$ git " + " ".join(args))
            if text:
                self.log.write(text + "\n")
        return status == 0

    async def _has(self, sha: str, deadline: float) -> bool:
        status, _ = await self._git(["cat-file", "-e", f"{sha}^{{commit}}"], deadline, quiet=True)
        return status == 0

    # ------------------------------------------------------------ steps

    async def _artifacts(self, patterns: tuple) -> None:
        """Send the files the patterns match; a refusal is noted in the log, never fails the build."""
        files, notes = await asyncio.get_running_loop().run_in_executor(
            None, find_artifacts, self.checkout, patterns, self.job.artifacts_limit)
        for note in notes:
            self.log.line(f"[artifacts: {note}]")
        if self.upload is None:
            return
        for rel, path, size in files:
            if self._stop.is_set():
                raise Stopped()
            try:
                await self.upload(rel, path)
                self.log.line(f"[artifact {rel} ({size} bytes) sent]")
            except (OSError, ValueError) as exc:
                self.log.line(f"[artifact {rel} not sent: {exc}]")

    async def _step(self, command: str, env: dict, deadline: float, why: str = "") -> tuple[str, int]:
        """Run one step; returns ("exit", code), ("timeout", -1) or ("error", -1); raises Stopped."""
        if self._stop.is_set():
            raise Stopped()
        self.log.line(f"$ {command}")
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            # asyncio.create_subprocess_shell, but with a protocol that says when the shell exits
            transport, protocol = await loop.subprocess_shell(
                lambda: _StepProtocol(loop), command, cwd=self.checkout, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)     # its own process group, so the whole tree can be killed
        except OSError as exc:
            self.log.line(f"[cannot start the step: {exc}]")
            return "error", -1
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        marker = _mark_group(self.checkout, proc.pid)
        pump = asyncio.ensure_future(self._pump(proc.stdout))
        exited = asyncio.ensure_future(_exit_of(proc, protocol))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({exited, stopped}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            how = "exit" if exited.done() else "stopped" if self._stop.is_set() else "timeout"
            # even after a clean exit: background children must not outlive their step
            await kill_group(proc.pid, self.kill_grace)
            await aio.within(asyncio.shield(exited), 5.0)
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)     # torn down mid-step: leave nothing behind
            pump.cancel()
            raise
        finally:
            stopped.cancel()
            marker.unlink(missing_ok=True)
        try:
            await aio.within(pump, OUTPUT_DRAIN)
        except asyncio.TimeoutError:
            # a process that left the group (setsid) still holds the output pipe
            self.log.line("[the step's output is still open after it ended; stopped reading it]")
        elapsed = time.monotonic() - started
        if how == "timeout":
            self.log.line(f"[timed out after {why or f'{self.job.timeout:g} s'}; "
                          f"the step's processes were killed]")
            return "timeout", -1
        if how == "stopped":
            self.log.line(f"[{self.stop_reason} after {elapsed:.2f}s; the step's processes were killed]")
            raise Stopped("logged")
        code = proc.returncode if proc.returncode is not None else -1
        if code < 0:
            self.log.line(f"[killed by signal {-code} after {elapsed:.2f}s]")
        else:
            self.log.line(f"[exit {code} after {elapsed:.2f}s]")
        return "exit", code

    async def _pump(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            chunk = await stream.read(READ_SIZE)
            if not chunk:
                break
            self.log.write(decoder.decode(chunk))
        self.log.write(decoder.decode(b"", final=True))


class _StepProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol for a subprocess with streams, plus a future done when
    the process exits (its output may still be open)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(limit=READ_SIZE, loop=loop)
        self.exited = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _exit_of(proc: asyncio.subprocess.Process, protocol: _StepProtocol) -> int:
    """The step's exit status as soon as its shell exits.

    Not proc.wait(): that also waits for the output pipe to close, which a
    background child holding it would put off forever. Not a poll of
    ``returncode`` either: every build would end up to a poll interval late.
    """
    await protocol.exited
    while proc.returncode is None:      # set before process_exited is called; a safety net only
        await asyncio.sleep(0.02)
    return proc.returncode


def _origin_url(checkout: Path) -> str | None:
    """The clone's ``remote.origin.url`` as GitPython reads .git/config, in process
    (a git command less per build); None when it cannot say for sure."""
    try:
        url = git.GitConfigParser(str(checkout / ".git" / "config"), read_only=True).get(
            'remote "origin"', "url")
    except Exception:       # a configparser error, an unreadable file: ask git itself
        return None
    # GitPython keeps git's quoting and escapes: compare only values that have none
    return url if isinstance(url, str) and not any(c in url for c in '"\\;#') else None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
