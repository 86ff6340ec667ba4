"""What a runner delivers for a build attempt it holds: ``log`` (bytes at an
offset), ``artifact`` (a file's chunks) and ``result``.

Each is refused unless its sender holds that attempt (``stale``,
``not_yours``). Bytes are refused with ``disk_full`` before the disk's
reserve is touched; the runner then sends its result, recorded with a note
where its log stops. A result is accepted only once the attempt's whole log
is stored (``offset`` otherwise), so a result never outruns its log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Callable

from . import net, protocol
from .artifacts import ArtifactError, Artifacts
from .buildlogs import BuildLogs, LogGap
from .diskspace import DISK_FULL, FULL_ERRNOS, DiskSpace, LogCuts
from .groupcommit import GroupCommit
from .models import Build, Status
from .scheduler import Plan, Scheduler
from .store import Store
from .watchers import Watchers

log = logging.getLogger(__name__)


class Deliveries:
    def __init__(self, sched: Scheduler, store: Store, logs: BuildLogs, artifacts: Artifacts, disk: DiskSpace,
                 watchers: Watchers, max_artifact_bytes: int, note: Callable[[int, str], int],
                 apply: Callable[[Plan | None], None], monotonic: Callable[[], float]):
        self.sched, self.store, self.logs, self.artifacts = sched, store, logs, artifacts
        self.disk, self.watchers, self.max_artifact_bytes = disk, watchers, max_artifact_bytes
        self.note, self.apply, self.monotonic = note, apply, monotonic
        self.cuts = LogCuts()
        self.group = GroupCommit(store)         # results: one transaction a turn

    async def on_log(self, conn: net.Connection, msg: dict) -> dict:
        build_id = msg["build"]
        refused = not_held(self.sched, conn, msg)
        if refused:
            return refused
        build = self.sched.builds[build_id]
        self._check_log(build)
        data = msg["data"] if isinstance(msg["data"], bytes) else msg["data"].encode()
        fitted = self.disk.fitting(data)        # up to the reserve; the rest is refused with the next frame
        if data and not fitted:
            return self._cut_log(build)
        data = fitted
        try:
            have, grew = self.logs.append(build, msg["offset"], data)
        except LogGap as gap:
            return protocol.error("offset", f"log of build {build_id} has {gap.expected} bytes, "
                                            f"not {msg['offset']}", expected=gap.expected)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            self.disk.exhausted(f"the log of build {build_id} could not be written ({exc.strerror})")
            return self._cut_log(build)
        if grew:
            self.watchers.touch()
        return protocol.ok(offset=have)

    def _check_log(self, build: Build) -> None:
        """A log file removed or cut short under us: noted in the log, and the attempt goes on."""
        note = self.logs.check(build)
        if note:
            log.warning("build %d: its log file was removed or cut short under the dispatcher; the "
                        "attempt goes on, the log says so", build.id)
            with self.store.transaction():
                self.store.save([build])        # its new base: the runner's offsets still match after a restart

    def _cut_log(self, build: Build) -> dict:
        """Refuse the rest of an attempt's log: the disk is down to its reserve.
        Its runner sends the result next, recorded with a note where the log stops."""
        if self.cuts.cut(build.id, build.attempt):
            log.info("build %d attempt %d: the log stops at %d bytes: the dispatcher's disk is full",
                     build.id, build.attempt, self.logs.attempt_size(build))
        return protocol.error(DISK_FULL, f"{self.disk.message()}: the rest of the log of build {build.id} is "
                                         f"not stored; send the result")

    async def on_result(self, conn: net.Connection, msg: dict) -> dict:
        key = (msg["build"], msg["attempt"])
        refused = self._refuse_result(conn, msg)
        if refused:
            return refused
        waiting = self.group.pending(key)
        if waiting is not None:
            # the same result again (the runner's retry on a fresh connection) while the
            # first waits for its commit: the first's answer, whatever it is
            try:
                return await asyncio.shield(waiting)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not waiting.cancelled() or (task is not None and task.cancelling()):
                    raise
                # only the first's handler was cancelled (the daemon stopping): this one goes on alone
        ending = _Ending(self, conn, msg)
        return await self.group.submit(key, ending.write, ending.after)

    def _refuse_result(self, conn: net.Connection, msg: dict) -> dict | None:
        build_id = msg["build"]
        refused = not_held(self.sched, conn, msg)
        if refused:
            return refused
        build = self.sched.builds[build_id]
        self._check_log(build)
        have = self.logs.attempt_size(build)
        if have < msg.get("log_size", 0) and not self.cuts.is_cut(build_id, msg["attempt"]):
            return protocol.error("offset", f"log of build {build_id} is incomplete ({have} bytes)", expected=have)
        return None

    async def on_artifact(self, conn: net.Connection, msg: dict) -> dict:
        build_id, attempt = msg["build"], msg["attempt"]
        refused = not_held(self.sched, conn, msg)
        if refused:
            return refused
        # only from a bulk frame: a view of a buffer lent for the write (protocol.LENT), or bytes (TLS, small)
        data = msg["data"]
        build = self.sched.builds[build_id]
        try:
            if not self.disk.room(len(data)):
                return self._leave_out(build, msg)
            size = await self.artifacts.write_off_loop(build_id, build.sha, msg["path"], msg["offset"], data,
                                                       msg["eof"], self.max_artifact_bytes, attempt,
                                                       lambda: conn.give_back(data, last=msg["eof"]))
        except ArtifactError as exc:
            # out of step: most likely a chunk that was on its way behind one refused (and logged) already
            (log.debug if exc.code == "offset" else log.warning)(
                "build %d: artifact %r refused: %s", build_id, msg["path"][:100], exc.message)
            return protocol.error(exc.code, exc.message)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                return protocol.error("internal", f"cannot store artifact {msg['path'][:100]!r}: {exc.strerror}")
            self.disk.exhausted(f"artifact {msg['path'][:100]!r} of build {build_id} could not be written "
                                f"({exc.strerror})")
            return self._leave_out(build, msg)
        return protocol.ok(offset=size)

    def _leave_out(self, build: Build, msg: dict) -> dict:
        """An artifact that does not fit on the disk: left out (what it had is
        removed), and the build's log says so once: the runner's upload stops at
        the refusal, and a chunk already on its way behind it is out of step."""
        path = msg["path"]
        if self.artifacts.give_up(build.id, build.sha, msg["attempt"], path, msg["offset"]):
            self.note(build.id, f"[artifact {path[:200]} left out: the dispatcher's disk is full]")
        return protocol.error(DISK_FULL, f"{self.disk.message()}: artifact {path[:100]!r} left out")


def not_held(sched: Scheduler, conn: net.Connection, msg: dict) -> dict | None:
    """The error refusing a log, result or artifact, or None when the
    connection is the runner holding that build attempt: ``stale`` for an
    attempt that is not current (its sender stops it), ``not_yours`` for
    the current attempt sent by another runner than the one holding it."""
    build_id, attempt = msg["build"], msg["attempt"]
    if not sched.is_current(build_id, attempt):
        return protocol.error("stale", f"build {build_id} attempt {attempt} is not current")
    holder = sched.builds[build_id].runner
    if holder != conn.id:
        log.warning("refused %s for build %d from %s (runner %s): the build is runner %s's",
                    msg["type"], build_id, conn.peer, conn.id or "-", holder)
        return protocol.error("not_yours", f"build {build_id} is not held by runner {conn.id!r}")
    return None


class _Ending:
    """A result's two steps in its turn's group commit (``groupcommit``): the
    report and the ended build written, then the attempt ended in memory."""

    def __init__(self, deliveries: Deliveries, conn: net.Connection, msg: dict):
        self.d, self.conn, self.msg = deliveries, conn, msg
        self.was_cancelled, self.finished_at = False, 0.0

    def write(self) -> dict | None:
        d, msg = self.d, self.msg
        # asked again at the commit: the lease may have been taken back since the request came
        refused = not_held(d.sched, self.conn, msg)
        if refused:
            return refused
        build = d.sched.builds[msg["build"]]
        self.was_cancelled = build.status is Status.CANCELLED
        self.finished_at = d.sched.wall()
        # the first write, always: should the commit fail (the disk too full for the database,
        # or it locked), nothing has changed yet, and the runner's retry finds its lease still held
        d.store.save_report(build.id, msg.get("step_results"), msg.get("tests"))
        if not self.was_cancelled:       # a cancelled build's end was saved with the cancel
            d.store.save([replace(build, status=Status(msg["status"]), exit_code=msg["exit_code"],
                                  finished_at=self.finished_at)])
        return None

    def after(self) -> dict:
        d, msg = self.d, self.msg
        build_id, attempt, status = msg["build"], msg["attempt"], Status(msg["status"])
        build = d.sched.builds[build_id]
        runner = build.runner
        cut = d.cuts.note(build_id, attempt, msg.get("log_size", 0) - d.logs.attempt_size(build))
        if cut:
            d.note(build_id, cut)       # moves the attempt's log base: the build is saved again, by apply
        plan = d.sched.finish(build_id, attempt, status, msg["exit_code"], d.monotonic(), self.finished_at)
        if plan is not None and not cut:
            plan.saved.append(build_id)
        if self.was_cancelled:
            d.note(build_id, f"=== cancelled (the runner reported {status.value} as it stopped) ===")
            d.watchers.touch()          # its plan may be empty: a follower of its log learns it ended now
        else:
            d.note(build_id, f"=== {status.value} (exit {msg['exit_code']}) in {msg['duration']:.2f}s on {runner} ===")
            log.info("build %d %s on %s", build_id, status.value, runner)
        d.apply(plan)
        return protocol.ok()
