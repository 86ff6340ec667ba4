"""Scheduled builds: the configuration's ``schedule`` section, turned into
what is due when. Plain code with the time passed in; the dispatcher's
schedule task asks ``Schedules.due(now)`` and queues a build (reason
``schedule``) for each entry it returns.

An entry is ``{cron: "0 3 * * *", branch: main, repo: ..., jobs: [...]}``:
a five-field cron expression (croniter), read in ``schedule.timezone`` (an
IANA name through zoneinfo; default the machine's local zone); the branch
whose head to build; the repository (needed when the dispatcher builds
several); the ``.ci.yaml`` jobs to run (default all).

The time an entry last fired is kept in the store, so a dispatcher that was
down when entries were due fires each of them once when it comes back (one
catch-up build, however many times it missed), and a new entry first fires at
its next time, never at start-up. The time is saved before the build is
queued: a crash in between loses that one build rather than repeating it.

croniter earns its place: cron syntax has ranges, steps, lists, names and the
day-of-month/day-of-week rule, and its next time across daylight-saving
changes in a given zone is easy to get wrong; croniter is small, pure Python,
and does exactly this. It is imported only when a schedule is configured.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import patterns
from .config import ConfigError

log = logging.getLogger(__name__)

KEYS = {"cron", "branch", "repo", "jobs"}
CHECK_EVERY = 60.0          # seconds: the task looks again at least this often (a wall clock may jump)


@dataclass(frozen=True)
class Entry:
    cron: str
    branch: str
    repo: str | None = None
    jobs: tuple = ()            # empty: every job of the commit

    @property
    def key(self) -> str:
        """What the store keeps its last fire time under: the entry itself."""
        return json.dumps([self.cron, self.branch, self.repo, list(self.jobs)])

    def describe(self) -> str:
        jobs = f" jobs {','.join(self.jobs)}" if self.jobs else ""
        return f"{self.cron!r} {self.branch}{f' in {self.repo}' if self.repo else ''}{jobs}"


def zone(name: str, where: str = "schedule.timezone") -> dt.tzinfo:
    """The zone ``name`` (IANA, e.g. Europe/Paris); "" is this machine's local zone."""
    if not name:
        return dt.datetime.now().astimezone().tzinfo
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: {name!r} is not a time zone (an IANA name such as UTC or "
                          f"Europe/Paris)") from None


def parse(builds: Any, origin: str = "schedule.builds") -> list[Entry]:
    """The entries of ``schedule.builds``; ConfigError naming the entry and key at fault."""
    if not builds:
        return []
    if not isinstance(builds, list):
        raise ConfigError(f"{origin}: expected a list of {{cron, branch, repo, jobs}}")
    from croniter import croniter
    entries = []
    for i, item in enumerate(builds):
        where = f"{origin}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{cron, branch, repo, jobs}}")
        unknown = sorted(set(item) - KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
        cron, branch, repo, jobs = item.get("cron"), item.get("branch"), item.get("repo"), item.get("jobs") or []
        if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise ConfigError(f"{where}.cron: {cron!r} is not a cron expression of five fields "
                              f"(minute hour day month weekday, e.g. \"0 3 * * *\")")
        if not patterns.is_branch(branch):
            raise ConfigError(f"{where}.branch: {branch!r} is not a branch name")
        if repo is not None and (not isinstance(repo, str) or not repo):
            raise ConfigError(f"{where}.repo: expected the repository's path or URL, as the dispatcher knows it")
        if not isinstance(jobs, list) or not all(isinstance(j, str) and patterns.is_name(j) for j in jobs):
            raise ConfigError(f"{where}.jobs: expected a list of job names")
        entries.append(Entry(cron, branch, repo, tuple(jobs)))
    return entries


class Schedules:
    """The entries and when each last fired. ``last``: the saved fire times by
    key (the store's); ``save(key, when)`` keeps a new one."""

    def __init__(self, entries: list[Entry], tz: dt.tzinfo, last: Mapping[str, float],
                 save: Callable[[str, float], None]):
        self.entries, self.tz, self.save = entries, tz, save
        self.last = dict(last)

    def next_time(self, entry: Entry, after: float) -> float:
        """The first time ``entry`` is due after ``after`` (Unix seconds), in the zone."""
        from croniter import croniter
        start = dt.datetime.fromtimestamp(after, self.tz)
        return croniter(entry.cron, start).get_next(dt.datetime).timestamp()

    def due(self, now: float) -> list[Entry]:
        """The entries to fire at ``now``, each once however many times it was missed;
        their fire time becomes ``now``. A new entry is not due: it starts counting now."""
        fired = []
        for entry in self.entries:
            last = self.last.get(entry.key)
            if last is None:
                self._keep(entry, now)
            elif self.next_time(entry, last) <= now:
                self._keep(entry, now)
                fired.append(entry)
        return fired

    def wait(self, now: float) -> float:
        """Seconds until the next entry is due (at most CHECK_EVERY)."""
        soonest = min((self.next_time(e, self.last.get(e.key, now)) for e in self.entries), default=now + CHECK_EVERY)
        return max(0.0, min(soonest - now, CHECK_EVERY))

    def _keep(self, entry: Entry, when: float) -> None:
        self.last[entry.key] = when
        self.save(entry.key, when)
