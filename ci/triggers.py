"""Builds an operator or the clock asks for: ``trigger`` (a branch's head or a
revision, all its jobs or one), ``rebuild`` (a build's commit again), and the
``schedule`` (builds at set times, reason ``schedule``).

Each resolves what to build in the right repository (``intake.choose_repo``:
the configured repositories, else those built before) with git reads in a
thread, then hands an ``intake.Request`` to ``admit`` (the dispatcher's:
store, supersede, queue). Nothing here talks to a socket.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from . import aio, buildfile, intake, net, protocol, schedule
from .config import Config
from .models import Build
from .store import Store

# GitPython (some 100 modules) loaded at the first trigger or rebuild, not when the dispatcher starts
gitops: Any = aio.Lazy(globals(), f"{__package__}.gitops", "gitops")

log = logging.getLogger(__name__)

Admit = Callable[[intake.Request], "tuple[list[Build], list[Build]]"]


class Triggers:
    def __init__(self, config: Config, store: Store, admit: Admit, clock: Callable[[], float],
                 pipelines: Mapping | None = None):
        """``pipelines``: repository -> its definition kept on the dispatcher (settings.Pipeline)."""
        self.config, self.store, self.admit, self.clock = config, store, admit, clock
        self.pipelines = pipelines or {}
        self.timed: schedule.Schedules | None = None     # set by the daemon from the configuration

    async def on_trigger(self, conn: net.Connection, msg: dict) -> dict:
        if not (msg.get("rev") or msg.get("branch")):
            return protocol.error("bad_request", "trigger needs a branch or a revision")
        try:
            builds = await self.trigger(msg.get("rev"), msg.get("branch"), msg.get("repo"), msg.get("job"))
        except intake.RevisionError as exc:
            return protocol.error(exc.code, exc.message)
        return protocol.ok(builds=[b.id for b in builds])

    async def trigger(self, rev: str | None, branch: str | None, repo: str | None = None, job: str | None = None,
                      reason: str = "manual") -> list[Build]:
        """Queue builds of the commit ``rev`` names, or of ``branch``'s head (all its
        jobs, or only ``job``), even if built before. The build records the branch
        (the one named, else one the commit is on); ``reason`` says why (manual,
        schedule). Raises intake.RevisionError (not_found, ambiguous)."""
        # the repositories it may build: those configured, else every one it has built
        known = list(self.config.dispatcher.repos) or self.store.repos()
        # a branch is refs/heads/<name> and nothing else: rev-parse would take a tag of
        # the same name first (and the build would get the branch's secrets)
        resolve = _branch_head if branch else gitops.resolve
        repo, sha = await aio.in_thread(intake.choose_repo, branch or rev, repo, known, resolve,
                                        "branch" if branch else "commit")
        (author, subject), text = await aio.in_thread(_commit_at, repo, sha)
        if not branch:
            branch = intake.trigger_branch(rev, sha, *await aio.in_thread(_branches, repo, rev, sha))
        # a manual trigger ignores [skip ci]; its jobs come from .ci.yaml at the commit, as for a push.
        # Checked in a thread: a file at the size cap takes up to a second or so
        jobs, problem = await aio.in_thread(intake.jobs_from, text, self.pipelines.get(repo))
        if job is not None and not problem:
            jobs = intake.pick_jobs(jobs, job, sha)
        builds, _ = self.admit(intake.Request(
            repo=repo, branch=branch, sha=sha, subject=subject or f"triggered {rev or branch}",
            author=author, reason=reason, jobs=jobs, config_error=problem, note=reason))
        return builds

    async def on_rebuild(self, conn: net.Connection, msg: dict) -> dict:
        old = self.store.get(msg["build"])
        if old is None:
            return protocol.error("not_found", f"no build {msg['build']}")
        reason = f"rebuild of {old.id}"
        jobs, problem = [{"name": old.job, "labels": list(old.labels), "needs": list(old.needs),
                          "secrets": list(old.secrets)}], ""
        if not old.job:         # a skipped or broken commit may have jobs now: read them as a trigger does
            text = await aio.in_thread(gitops.file_at, old.repo, old.sha, buildfile.FILENAME)
            jobs, problem = await aio.in_thread(intake.jobs_from, text, self.pipelines.get(old.repo))
        builds, _ = self.admit(intake.Request(
            repo=old.repo, branch=old.branch, sha=old.sha, subject=old.subject, author=old.author,
            reason=reason, jobs=jobs, config_error=problem, note=reason))
        return protocol.ok(builds=[b.id for b in builds])

    # ------------------------------------------------------------ scheduled builds

    def schedules(self) -> schedule.Schedules:
        """The configured schedule with its saved fire times (ConfigError for a bad entry)."""
        cfg = self.config.schedule
        return schedule.Schedules(schedule.parse(cfg.builds), schedule.zone(cfg.timezone),
                                  self.store.schedule_times(), self.store.save_schedule_time)

    async def schedule_tick(self, timed: schedule.Schedules) -> float:
        """Queue a build (reason schedule) for each entry due now; returns the seconds to the next look."""
        now = self.clock()
        for entry in timed.due(now):
            for job in entry.jobs or (None,):
                try:
                    builds = await self.trigger(None, entry.branch, entry.repo, job, reason="schedule")
                except intake.RevisionError as exc:
                    log.warning("scheduled build %s not queued: %s", entry.describe(), exc.message)
                    continue
                log.info("scheduled %s: build(s) %s", entry.describe(), ", ".join(str(b.id) for b in builds))
        return timed.wait(self.clock())

    async def schedule_loop(self, stop: asyncio.Event) -> None:
        timed = self.timed
        if timed is None or not timed.entries:
            return
        while not stop.is_set():
            try:
                pause = await self.schedule_tick(timed)
            except Exception:       # a store or git failure: log it, the next look may work
                log.exception("scheduled builds: the check failed")
                pause = schedule.CHECK_EVERY
            try:
                await aio.within(stop.wait(), pause)
            except asyncio.TimeoutError:
                pass


def _branch_head(repo: str, branch: str) -> str | None:
    """The sha at the head of local branch ``branch``, or None; a blocking git read."""
    return gitops.resolve(repo, f"refs/heads/{branch}")


def _branches(repo: str, rev: str, sha: str) -> tuple[bool, list[str], list[str]]:
    """(``rev`` names a local branch, branches at ``sha``, branches containing it); blocking git reads."""
    at, containing = gitops.branches_of(repo, sha)
    return gitops.resolve(repo, f"refs/heads/{rev}") is not None, at, containing


def _commit_at(repo: str, sha: str) -> tuple[tuple[str, str], bytes | None]:
    """(author, subject) of a commit and its .ci.yaml (None: none); blocking git reads."""
    return gitops.commit_info(repo, sha), gitops.file_at(repo, sha, buildfile.FILENAME)
