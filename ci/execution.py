"""Runs one build attempt on a runner: the checkout (``checkout.py``), then
each step in its own process group under the build's time limit, its output
into the attempt's ``BuildLog``, then the artifacts.

The steps are those of the job's ``.ci.yaml`` at the checked-out commit (the
one source of truth for a repository that has the file, unless the
dispatcher's definition for the repository overrides it), else the job's in
the dispatcher's definition that came with the ``run``, else the ``steps``
of the ``run`` request, else ``python -m pytest -q`` for a repository with
tests (after ``python -m pip install .`` for an installable one). They run in
the attempt's own virtualenv, in the environment ``buildenv`` makes. A
build with ``needs`` first gets the artifacts of the builds it needs (the
run's ``inputs``) into its checkout at their paths, through ``fetch``; one
that does not arrive ends the attempt in error. Before the steps the job's
``cache`` is restored (``cache.py``), and saved after them when the build
passed. After the steps (passed or failed) the files matching the job's
``artifacts`` globs are handed to ``upload`` and its ``reports`` are read
(``reports.py``) into the Outcome's ``tests``.

It knows nothing about the network: ``runner.py`` turns a ``run`` request
into a ``RunRequest``, gives it a ``BuildLog`` whose writes wake the log
sender and an ``upload`` coroutine for artifacts, and reports the
``Outcome``. ``Execution.stop`` ends it from outside (cancel, a stale lease,
shutdown) by killing the running step's whole process group.

However a step ends, nothing it started outlives it: its process group is
killed, then the processes that left the group (``procgroup.end_strays``;
the runner is their reaper). Each step carries a mark in its environment
(``procgroup.STEP_MARK``) so that one slot's step ending spares another's.

The build secrets that came with the ``run`` are variables of every step
(over the file's env), and their values are masked in the log
(``masking.Masker``, set on the ``BuildLog`` before anything is written).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import aio, artifact_find, buildfile, cache, masking, procgroup, reports
from .attempt import Outcome, RunRequest, Stopped
from .buildenv import build_env, make_venv, venv_path
from .buildfile import BuildFile, BuildFileError, Keeps, Step
from .buildlog import BuildLog, widen_pipe
from .checkout import Checkout, CheckoutError
from .models import Status

log = logging.getLogger(__name__)

DEFAULT_TEST_STEP = "python -m pytest -q"
# an installable project (pyproject.toml or setup.py) is installed into the build's virtualenv first
DEFAULT_INSTALL_STEP = "python -m pip install --quiet --disable-pip-version-check ."
NO_STEPS = "no build steps: set build.steps in the dispatcher's config or add .ci.yaml with steps"
READ_SIZE = 1 << 20        # a fast step's output is read (and logged) in big pieces
OUTPUT_DRAIN = 2.0      # after a step ends, how long to wait for the last of its output


def has_tests(root: Path) -> bool:
    if (root / "tests").is_dir() or (root / "test").is_dir():
        return True
    return any(p.is_file() and (p.name.startswith("test_") or p.name.endswith("_test.py"))
               for p in root.glob("*.py"))


def installable(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() or (root / "setup.py").is_file()


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


def input_path(root: Path, rel: str) -> Path | None:
    """Where an input artifact goes in the checkout: its relative path, if that
    stays inside (no '..', no absolute path, no symlink on the way); else None."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    here = root
    for part in parts:
        here = here / part
        if here.is_symlink():
            return None
    return here


class Execution:
    """One attempt in progress in one slot's checkout."""

    def __init__(self, request: RunRequest, checkout: Path, buildlog: BuildLog, kill_grace: float,
                 header: str = "", upload: Callable[[str, Path], Any] | None = None,
                 steps: procgroup.Steps | None = None,
                 fetch: Callable[[int, str, Path], Awaitable[int]] | None = None,
                 build_cache: cache.Cache | None = None):
        """``steps``: the steps running in this process, every slot's (the runner's one registry).
        ``fetch(build, path, dest)``: one artifact of another build into ``dest``; raises ValueError.
        ``build_cache``: the runner's cache (None: none)."""
        self.request = request
        self.cache = build_cache
        self.tests: dict | None = None      # the reports' counts and failures (reports.read)
        self.steps = steps if steps is not None else procgroup.Steps()
        self.upload = upload        # async (relative path, file) -> None; raises OSError/ValueError to refuse
        self.fetch = fetch
        self.checkout = checkout.absolute()
        self.log = buildlog
        if request.secrets:
            buildlog.mask = masking.Masker(request.secrets.values())
        self.kill_grace = kill_grace
        self.header = header
        self.stop_reason: str | None = None
        self.limit = request.timeout            # seconds: the run's, or the .ci.yaml's once read
        self.steps_run = 0
        self.step_results: list[dict] = []
        self._stop = asyncio.Event()
        self._clone = Checkout(self.checkout, buildlog, self._stop, request.timeout)
        self._started = self._deadline = 0.0

    @property
    def lingering(self) -> asyncio.Future | None:
        """A git command still running after a stop: the slot is not free until it ends."""
        return self._clone.lingering

    def stop(self, reason: str, grace: float | None = None) -> None:
        """End the attempt: ``reason`` is "cancelled", "stale" or "shutdown"."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if grace is not None:
            self.kill_grace = min(self.kill_grace, grace)
        self._stop.set()

    async def run(self) -> Outcome:
        request = self.request
        self._started = time.monotonic()
        self._deadline = self._started + request.timeout
        self.log.line(f"{self.header}build {request.build} attempt {request.attempt}: "
                      f"commit {request.sha} on {request.branch} from {request.repo}")
        try:
            return await self._attempt()
        except Stopped as exc:
            if not exc.args:            # a step already said how it ended
                self.log.line(f"[{self.stop_reason}]")
            return self._outcome(Status.CANCELLED)
        except Exception as exc:  # a runner bug must still end the build with a result
            log.exception("build %d attempt %d: runner failure", request.build, request.attempt)
            self.log.line(f"runner failure: {type(exc).__name__}: {exc}")
            return self._outcome(Status.ERROR)

    def _outcome(self, status: Status, code: int = -1) -> Outcome:
        return Outcome(status, code, self.steps_run, round(time.monotonic() - self._started, 3),
                       tuple(self.step_results), self.tests)

    async def _attempt(self) -> Outcome:
        try:
            await self._clone.run(self.request.repo, self.request.sha, self._deadline)
        except CheckoutError as exc:
            self.log.line(f"checkout failed: {exc}")
            return self._outcome(Status.ERROR)
        venv = await self._venv()
        try:
            steps, source, env, spec = await self._choose_steps(venv)
        except BuildFileError as exc:
            self.log.line(f"build error: {exc}")
            return self._outcome(Status.ERROR)
        if not steps:
            self.log.line(NO_STEPS)
            return self._outcome(Status.ERROR)
        if not await self._inputs():
            return self._outcome(Status.ERROR)
        self.log.line(f"{len(steps)} step(s) from {source}")
        keeps = spec.what_to_keep(self.request.job) if spec is not None else Keeps()
        cache_key = await self._restore_cache(keeps, env)
        status, code = Status.PASSED, 0
        for number, step in enumerate(steps, 1):
            self.steps_run = number
            if step.name:
                self.log.line(f"--- step {number}: {step.name} ---")
            step_deadline, why = self._deadline, f"{self.limit:g} s (the build's time limit)"
            if step.timeout is not None and time.monotonic() + step.timeout < self._deadline:
                step_deadline, why = time.monotonic() + step.timeout, f"{step.timeout:g} s (the step's time limit)"
            began = time.monotonic()
            how, code = await self._step(step.run, {**env, **step.env}, step_deadline, why)
            # what the web page shows per step; exit_code None: it timed out or could not start
            self.step_results.append({"name": step.name[:200], "run": step.run, "duration":
                                      round(time.monotonic() - began, 3),
                                      "exit_code": code if how == "exit" else None})
            if how == "error":
                return self._outcome(Status.ERROR)
            if how == "timeout" or code != 0:
                if number < len(steps):
                    self.log.line(f"[step {number} failed; skipping {len(steps) - number} more]")
                status = Status.FAILED
                break
        if cache_key is not None:
            await self._save_cache(keeps, cache_key, env, status)
        if keeps.artifacts:
            await self._artifacts(keeps.artifacts, keeps.artifacts_own)
        if keeps.reports:
            self.tests, notes = await aio.in_thread(reports.read, self.checkout, keeps.reports)
            if self.tests is not None and self.request.secrets:
                # a test's name can hold a secret (a parametrized value): masked like the log
                self.tests = reports.masked(self.tests, self.request.secrets.values())
            for note in notes:
                self.log.line(f"[reports: {note}]")
            if self.tests is not None:
                self.log.line(f"tests: {reports.summary(self.tests)}")
        return self._outcome(status, code)

    async def _restore_cache(self, keeps: Keeps, env: dict) -> str | None:
        """Before the steps: the job's cache put in place; its key, None with nothing to save after."""
        # scoped to the repository and to the secrets the build was given: a build without a
        # secret never restores what one with it saved (a token written into ~/.cache, say)
        request = self.request
        scope = "\0".join([request.repo, request.job, *sorted(request.secrets)])
        key, lines = await aio.in_thread(cache.restore_lines, self.cache, keeps.cache, self.checkout,
                                         scope, env.get("HOME"))
        for line in lines:
            self.log.line(line)
        return key

    async def _save_cache(self, keeps: Keeps, key: str, env: dict, status: Status) -> None:
        if status is not Status.PASSED:
            self.log.line(f"cache: not saved: the build {status.value}")
            return
        if self._stop.is_set():
            raise Stopped()
        for line in await aio.in_thread(cache.save_lines, self.cache, keeps.cache, key, self.checkout,
                                        env.get("HOME")):
            self.log.line(line)

    async def _venv(self) -> Path | None:
        """The attempt's own virtualenv (``buildenv``), made afresh; None when it cannot be."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, make_venv, venv_path(self.checkout))
        except OSError as exc:
            self.log.line(f"[{exc}; the steps run without a virtualenv of their own]")
            return None

    async def _choose_steps(self, venv: Path | None = None) -> tuple[tuple, str, dict, BuildFile | None]:
        """The steps, where they come from, their environment (in ``venv``) and the
        ``.ci.yaml`` (None without one); a ``.ci.yaml`` time limit replaces the run's.
        Raises BuildFileError."""
        request = self.request
        env = build_env(request, venv_dir=venv)
        # in a thread: a file at the size cap takes up to a second or so to check,
        # and the loop must go on answering the dispatcher's pings meanwhile
        spec, source = await aio.in_thread(self._definition)
        if spec is not None:
            steps, timeout, file_env = spec.plan(request.job)
            env.update(file_env)
            if timeout is not None:
                self._deadline, self.limit = self._started + timeout, timeout
            source += f" (job {request.job})" if request.job else ""
        elif request.job:
            raise BuildFileError(0, f"is missing, but this build is its job {request.job!r}")
        else:
            steps, source = tuple(Step(command) for command in request.steps), "the dispatcher's build.steps"
        env.update(request.secrets)     # last: a file's env cannot shadow what the operator gave
        if not steps and has_tests(self.checkout):
            steps, source = (Step(DEFAULT_TEST_STEP),), "the default for a repository with tests"
            if installable(self.checkout):
                steps = (Step(DEFAULT_INSTALL_STEP), *steps)
                source = "the default for an installable repository with tests (installed into the build's virtualenv)"
        return steps, source, env, spec

    async def _inputs(self) -> bool:
        """The artifacts of the builds this one needs, into the checkout at their
        paths; False (logged) when one cannot be placed or does not arrive."""
        for item in self.request.inputs:
            if self._stop.is_set():
                raise Stopped()
            where = f"input {item['path'][:200]} of build {item['build']} ({item['job']})"
            dest = input_path(self.checkout, item["path"])
            if dest is None or self.fetch is None:
                self.log.line(f"[{where}: cannot be placed in the checkout]")
                return False
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                size = await self.fetch(item["build"], item["path"], dest)
            except (OSError, ValueError) as exc:
                self.log.line(f"[{where} did not arrive: {exc}]")
                return False
            self.log.line(f"[{where}: {size} bytes]")
        return True

    def _definition(self) -> tuple[BuildFile | None, str]:
        """(the definition this attempt follows, where it comes from): the checkout's
        ``.ci.yaml``, or the dispatcher's when the checkout has none or it overrides;
        (None, "") with neither. Blocking; raises BuildFileError."""
        request = self.request
        spec = None if request.definition and request.override else read_buildfile(self.checkout)
        if spec is not None:
            return spec, buildfile.FILENAME
        if request.definition:
            try:
                return buildfile.parse(request.definition), "the dispatcher's pipeline for this repository"
            except BuildFileError as exc:   # checked at the dispatcher's start: a different version's rules
                raise BuildFileError(0, f"(the dispatcher's pipelines entry) {exc.problem}") from None
        return None, ""

    async def _artifacts(self, patterns: tuple, own: bool = True) -> None:
        """Send the files the patterns match; a refusal is noted in the log, never fails the build.
        ``own`` False: the top level's globs in a file of several jobs, perhaps another job's."""
        files, notes = await asyncio.get_running_loop().run_in_executor(
            None, artifact_find.find, self.checkout, patterns, self.request.artifacts_limit, own)
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
        mark = self.steps.begin()
        marker = procgroup.mark_group(self.checkout, 0, mark)     # before the spawn: see procgroup
        try:
            # asyncio.create_subprocess_shell, but with a protocol that says when the shell exits
            transport, protocol = await loop.subprocess_shell(
                lambda: _StepProtocol(loop), command, cwd=self.checkout, env={**env, procgroup.STEP_MARK: mark},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)     # its own process group, so the whole tree can be killed
        except OSError as exc:
            self.steps.end(mark)
            marker.unlink(missing_ok=True)
            self.log.line(f"[cannot start the step: {exc}]")
            return "error", -1
        widen_pipe(transport)
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        self.steps.started(mark, proc.pid)
        procgroup.mark_group(self.checkout, proc.pid, mark)
        pump = asyncio.ensure_future(self._pump(proc.stdout))
        exited = asyncio.ensure_future(_exit_of(proc, protocol))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({exited, stopped}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            how = "exit" if exited.done() else "stopped" if self._stop.is_set() else "timeout"
            # even after a clean exit: background children must not outlive their step
            await procgroup.kill_group(proc.pid, self.kill_grace)
            await aio.within(asyncio.shield(exited), 5.0)
            self.steps.end(mark)
            # and those that left the group (setsid, a double fork): the runner is their reaper
            strays_ended = await procgroup.end_strays(self.steps, self.kill_grace)
        except BaseException:
            procgroup.signal_group(proc.pid, signal.SIGKILL)    # torn down mid-step: leave nothing behind
            self.steps.end(mark)
            procgroup.kill_strays_now(self.steps, keep=frozenset({proc.pid}))
            pump.cancel()
            raise
        finally:
            self.steps.end(mark)
            stopped.cancel()
            marker.unlink(missing_ok=True)
        try:
            await aio.within(pump, OUTPUT_DRAIN)
        except asyncio.TimeoutError:
            # a process that left the group, where the runner is not its reaper, still holds the output pipe
            self.log.line("[the step's output is still open after it ended; stopped reading it]")
        finally:
            transport.close()       # the shell has exited: this only closes a pipe still open
        if strays_ended:
            self.log.line(f"[{len(strays_ended)} process(es) the step left running outside its process group "
                          f"were killed]")
        return self._ended(how, proc.returncode, why, time.monotonic() - started)

    def _ended(self, how: str, returncode: int | None, why: str, elapsed: float) -> tuple[str, int]:
        """Log how a step ended; the step's result, as ``_step`` returns it."""
        if how == "timeout":
            self.log.line(f"[timed out after {why or f'{self.request.timeout:g} s'}; "
                          f"the step's processes were killed]")
            return "timeout", -1
        if how == "stopped":
            self.log.line(f"[{self.stop_reason} after {elapsed:.2f}s; the step's processes were killed]")
            raise Stopped("logged")
        code = returncode if returncode is not None else -1
        if code < 0:
            self.log.line(f"[killed by signal {-code} after {elapsed:.2f}s]")
        else:
            self.log.line(f"[exit {code} after {elapsed:.2f}s]")
        return "exit", code

    async def _pump(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while True:
            chunk = await stream.read(READ_SIZE)
            if not chunk:
                break
            self.log.feed(chunk)
        self.log.feed_end()


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
