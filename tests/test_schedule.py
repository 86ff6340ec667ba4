"""Scheduled builds: the cron entries with the clock passed in (due at their
time, in their zone, once however long the dispatcher was down, never at
start-up for a new entry), the configuration's errors, and the dispatcher
queuing real builds of a real repository's branch (reason ``schedule``)
as the clock is moved, across a restart on the same store."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ci import config, schedule, settings
from ci.dispatcher import Dispatcher
from ci.store import Store

from conftest import Repo

UTC = dt.timezone.utc


def at(text: str, tz=UTC) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def schedules(entries, tz=UTC, last=None):
    saved = dict(last or {})
    return schedule.Schedules(entries, tz, saved, saved.__setitem__), saved


def test_an_entry_fires_at_its_time_and_once_after_any_number_of_misses():
    nightly = schedule.Entry("0 3 * * *", "main")
    timed, saved = schedules([nightly])
    assert timed.due(at("2024-05-01T12:00:00")) == []            # new: counts from now, not at start-up
    assert saved[nightly.key] == at("2024-05-01T12:00:00")
    assert timed.wait(at("2024-05-01T12:00:00")) == schedule.CHECK_EVERY
    assert timed.due(at("2024-05-02T02:59:59")) == []
    assert timed.due(at("2024-05-02T03:00:00")) == [nightly]
    assert timed.due(at("2024-05-02T03:00:30")) == []             # once per time
    # the dispatcher was down for three nights: one catch-up build, not three
    assert timed.due(at("2024-05-05T09:00:00")) == [nightly]
    assert timed.due(at("2024-05-05T09:01:00")) == []
    assert timed.next_time(nightly, saved[nightly.key]) == at("2024-05-06T03:00:00")


def test_cron_times_are_read_in_the_configured_zone_across_daylight_saving():
    paris = ZoneInfo("Europe/Paris")
    nightly = schedule.Entry("0 3 * * *", "main")
    timed, _ = schedules([nightly], paris)
    # 03:00 in Paris is 01:00 UTC in summer, 02:00 UTC in winter
    assert timed.next_time(nightly, at("2024-07-01T12:00:00")) == at("2024-07-02T01:00:00")
    assert timed.next_time(nightly, at("2024-01-01T12:00:00")) == at("2024-01-02T02:00:00")
    assert timed.next_time(nightly, at("2024-03-30T12:00:00")) == at("2024-03-31T03:00:00", paris)


@pytest.mark.parametrize("builds, message", [
    ([{"cron": "0 3 * *", "branch": "main"}], "schedule.builds[0].cron: '0 3 * *' is not a cron expression"),
    ([{"cron": "61 3 * * *", "branch": "main"}], "schedule.builds[0].cron"),
    ([{"cron": "0 3 * * *", "branch": "a..b"}], "schedule.builds[0].branch: 'a..b' is not a branch name"),
    ([{"cron": "0 3 * * *", "branch": "main", "when": 1}], "schedule.builds[0]: unknown key 'when'"),
    ([{"cron": "0 3 * * *", "branch": "main", "jobs": "lint"}], "schedule.builds[0].jobs: expected a list"),
    (["nightly"], "schedule.builds[0]: expected a mapping"),
])
def test_a_bad_entry_is_refused_naming_it(builds, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        schedule.parse(builds)


def test_the_schedule_section_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("schedule:\n  - {cron: '30 2 * * 1-5', branch: main, jobs: [lint]}\n")
    cfg = config.load(path, env={})
    assert schedule.parse(cfg.schedule.builds) == [schedule.Entry("30 2 * * 1-5", "main", None, ("lint",))]
    cfg = config.load(None, env={"TINYCI_SCHEDULE_BUILDS": '[{"cron": "0 * * * *", "branch": "dev"}]',
                                 "TINYCI_SCHEDULE_TIMEZONE": "UTC"})
    assert schedule.parse(cfg.schedule.builds) == [schedule.Entry("0 * * * *", "dev")]
    assert schedule.zone(cfg.schedule.timezone) == ZoneInfo("UTC")
    with pytest.raises(config.ConfigError, match="schedule.timezone: 'Mars/Olympus' is not a time zone"):
        schedule.zone("Mars/Olympus")


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def dispatcher(tmp_path: Path, repo: Repo, clock: Clock) -> Dispatcher:
    cfg = config.load(None, env={}, overrides={
        "dispatcher": {"data_dir": str(tmp_path / "data"), "repos": [str(repo.path)]},
        "schedule": {"timezone": "UTC", "builds": [
            {"cron": "0 3 * * *", "branch": "main"},
            {"cron": "0 * * * *", "branch": "main", "repo": str(repo.path), "jobs": ["lint"]}]}})
    d = Dispatcher(settings.resolve(cfg), Store(tmp_path / "data"), clock=clock)
    d.triggers.timed = d.triggers.schedules()
    return d


def test_the_dispatcher_queues_scheduled_builds_of_a_branch_as_the_clock_moves(tmp_path):
    repo = Repo(tmp_path / "repo")
    head = repo.commit("nightly material", {".ci.yaml": "steps: ['true']\njobs:\n  lint: {}\n  test: {}\n"})
    clock = Clock(at("2024-05-01T12:30:00"))
    d = dispatcher(tmp_path, repo, clock)

    def tick() -> list:
        asyncio.run(d.triggers.schedule_tick(d.triggers.timed))
        return [(b.reason, b.branch, b.sha, b.job) for b in reversed(d.store.recent(100))]

    assert tick() == []                                   # start-up fires nothing
    clock.now = at("2024-05-01T13:00:00")                 # the hourly lint is due
    assert tick() == [("schedule", "main", head, "lint")]
    clock.now = at("2024-05-02T03:00:00")                 # both are due: every job of the nightly, and lint
    built = tick()
    assert sorted(built[1:]) == [("schedule", "main", head, "lint")] * 2 + [("schedule", "main", head, "test")]
    log = d.logs.path(d.store.recent(1)[0].id).read_text()
    assert "=== schedule ===" in log

    d.store.close()


def test_catch_up_builds_one_each_after_downtime(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("one", {".ci.yaml": "steps: ['true']\njobs:\n  lint: {}\n"})
    clock = Clock(at("2024-05-01T12:30:00"))
    d = dispatcher(tmp_path, repo, clock)
    asyncio.run(d.triggers.schedule_tick(d.triggers.timed))                 # remembers when each entry was set up
    d.store.close()
    clock.now = at("2024-05-04T09:15:00")                 # down for 3 nights and ~69 hours
    d = dispatcher(tmp_path, repo, clock)
    pause = asyncio.run(d.triggers.schedule_tick(d.triggers.timed))
    builds = d.store.recent(100)
    assert sorted(b.job for b in builds) == ["lint", "lint"] and {b.reason for b in builds} == {"schedule"}
    assert 0 < pause <= schedule.CHECK_EVERY
    assert asyncio.run(d.triggers.schedule_tick(d.triggers.timed)) and len(d.store.recent(100)) == 2     # no storm
    d.store.close()
