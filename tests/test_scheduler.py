"""The dispatcher's rules without sockets, disk or sleeping: time is passed in."""

from ci.models import Build, RunnerRecord, Status
from ci.scheduler import Scheduler

SHA = "a" * 40


def build(n, labels=()):
    return Build(n, "/repo", "main", SHA, labels=tuple(labels), created_at=0.0)


def sched(**kw):
    return Scheduler(heartbeat_interval=1.0, heartbeat_misses=3, max_attempts=kw.pop("max_attempts", 3))


def assigned(plan):
    return [(b.id, b.attempt, r.name) for b, r in plan.assign]


def test_commit_waits_for_a_runner_then_is_handed_out_oldest_first():
    s = sched()
    assert assigned(s.add(build(1), 0)) == []
    assert assigned(s.add(build(2), 0)) == []
    plan = s.register("r1", "h", 1, (), 1, set(), now=1)
    assert assigned(plan) == [(1, 1, "r1")]
    assert s.builds[1].status is Status.RUNNING
    assert [b.id for b in s.queued()] == [2]


def test_slots_limit_concurrent_builds_per_runner():
    s = sched()
    s.register("r1", "h", 1, (), 2, set(), now=0)
    plans = [s.add(build(n), 0) for n in (1, 2, 3)]
    assert [assigned(p) for p in plans] == [[(1, 1, "r1")], [(2, 1, "r1")], []]
    plan = s.finish(1, 1, Status.PASSED, 0, now=5)
    assert [b.id for b in plan.finished] == [1]
    assert assigned(plan) == [(3, 1, "r1")]


def test_two_runners_take_two_builds_at_once():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.register("r2", "h", 2, (), 1, set(), now=0)
    a = assigned(s.add(build(1), 0)) + assigned(s.add(build(2), 0))
    assert sorted(r for _, _, r in a) == ["r1", "r2"]


def test_labels_route_builds_and_a_blocked_build_does_not_block_others():
    s = sched()
    s.register("plain", "h", 1, (), 1, set(), now=0)
    assert assigned(s.add(build(1, ["gpu"]), 0)) == []
    assert assigned(s.add(build(2), 0)) == [(2, 1, "plain")]
    plan = s.register("gpu", "h", 2, ("gpu", "linux"), 1, set(), now=1)
    assert assigned(plan) == [(1, 1, "gpu")]


def test_silent_runner_is_dead_after_the_deadline_and_its_build_requeued_with_next_attempt():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.register("r2", "h", 2, (), 1, set(), now=0)
    s.add(build(1), 0)
    owner = s.builds[1].runner
    other = "r2" if owner == "r1" else "r1"
    s.heartbeat(other, set(), sent_at=2.5, now=2.5)     # the other one keeps answering
    s.heartbeat(owner, {(1, 1)}, sent_at=0.5, now=0.5)
    assert not s.expire(3.4)                            # 2.9 s silent: not yet
    plan = s.expire(3.6)                                # 3.1 s silent: dead
    assert [r.name for r in plan.dead] == [owner]
    assert [(b.id, why.startswith(f"attempt 1 taken back: runner {owner} lost")) for b, why in plan.requeued] == [(1, True)]
    assert assigned(plan) == [(1, 2, other)]
    assert s.runners[owner].state.value == "dead"


def test_dead_runner_gets_no_work_until_it_registers_again():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.lost("r1", "connection refused", now=1)
    assert assigned(s.add(build(1), 2)) == []
    assert assigned(s.register("r1", "h", 1, (), 1, set(), now=3)) == [(1, 1, "r1")]


def test_build_errors_after_max_attempts_runner_lost():
    s = sched(max_attempts=2)
    s.add(build(1), 0)
    for attempt, name in ((1, "a"), (2, "b")):
        plan = s.register(name, "h", 1, (), 1, set(), now=attempt)
        assert assigned(plan) == [(1, attempt, name)]
        plan = s.lost(name, "connection refused", now=attempt + 0.5)
    assert [(b.id, b.status) for b in plan.finished] == [(1, Status.ERROR)]
    assert "runner lost" in plan.errored[0][1]
    assert 1 not in s.builds


def test_pong_without_the_build_takes_it_back_but_not_one_sent_after_the_ping():
    s = sched()
    s.register("r1", "h", 1, (), 2, set(), now=0)
    s.add(build(1), now=1)
    # ping sent at 0.5, before build 1 was handed out at 1: not judged
    assert not s.heartbeat("r1", set(), sent_at=0.5, now=1.2).requeued
    plan = s.heartbeat("r1", set(), sent_at=2, now=2.1)
    assert [b.id for b, _ in plan.requeued] == [1]
    assert assigned(plan) == [(1, 2, "r1")]


def test_pong_listing_another_attempt_cancels_it_on_that_runner():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    plan = s.heartbeat("r1", {(1, 1), (7, 3)}, sent_at=1, now=1)
    assert [(r.name, b, a) for r, b, a in plan.cancel] == [("r1", 7, 3)]
    assert s.builds[1].status is Status.RUNNING


def test_restarted_runner_gets_its_old_build_taken_back_at_once():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    plan = s.register("r1", "h", 1, (), 1, set(), now=1)     # came back with nothing running
    assert [b.id for b, _ in plan.requeued] == [1]
    assert assigned(plan) == [(1, 2, "r1")]


def test_stale_result_is_refused_and_current_one_accepted():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    s.lost("r1", "refused", now=1)
    s.register("r2", "h", 2, (), 1, set(), now=2)
    assert s.finish(1, 1, Status.PASSED, 0, now=3) is None       # attempt 1 is over
    plan = s.finish(1, 2, Status.FAILED, 1, now=3)
    assert [(b.id, b.status, b.exit_code) for b in plan.finished] == [(1, Status.FAILED, 1)]
    assert s.finish(1, 2, Status.PASSED, 0, now=4) is None       # only once


def test_cancel_wins_over_a_racing_result_and_frees_the_slot_only_then():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    s.add(build(2), now=0)
    plan = s.cancel(1, now=1)
    assert [(r.name, b) for r, b, _ in plan.cancel] == [("r1", 1)]
    assert [b.status for b in plan.finished] == [Status.CANCELLED]
    assert not plan.assign                                       # runner still stopping it
    plan = s.finish(1, 1, Status.PASSED, 0, now=2)
    assert plan.finished == []                                   # stays cancelled
    assert assigned(plan) == [(2, 1, "r1")]


def test_cancel_queued_build_leaves_the_queue():
    s = sched()
    s.add(build(1), now=0)
    plan = s.cancel(1, now=1)
    assert [b.status for b in plan.finished] == [Status.CANCELLED]
    assert s.queued() == []
    assert assigned(s.register("r1", "h", 1, (), 1, set(), now=2)) == []
    assert s.cancel(1, now=3) is None


def test_load_after_restart_keeps_running_builds_with_live_runners():
    s = sched()
    r1 = RunnerRecord("r1", "h", 1, alive=True)
    gone = RunnerRecord("gone", "h", 2, alive=False)
    running = build(1)
    running.status, running.attempt, running.runner = Status.RUNNING, 1, "r1"
    orphan = build(2)
    orphan.status, orphan.attempt, orphan.runner = Status.RUNNING, 1, "gone"
    plan = s.load([running, build(3), orphan], [r1, gone], now=100)
    assert s.runners["r1"].running == {(1, 1)}
    assert [b.id for b, _ in plan.requeued] == [2]
    assert [b.id for b in s.queued()] == [2, 3]
    # the live runner's pong confirms its build
    assert not s.heartbeat("r1", {(1, 1)}, sent_at=101, now=101).requeued
    # and it is not declared dead before it had a full window to answer
    assert not s.expire(102.9).dead


def test_refused_run_puts_build_back_without_counting_a_loss():
    s = sched(max_attempts=1)
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    plan = s.refused(1, 1, "busy", now=1)
    assert [b.id for b, _ in plan.requeued] == [1]
    assert s.builds[1].status is Status.QUEUED


def test_the_runner_free_the_longest_gets_the_next_build():
    s = sched()
    for name in ("r1", "r2", "r3"):
        s.register(name, "h", 1, (), 1, set(), now=0)
    assert [assigned(s.add(build(n), 0)) for n in (1, 2)] == [[(1, 1, "r1")], [(2, 1, "r2")]]
    s.finish(1, 1, Status.PASSED, 0, now=1)             # r1 is free again, but after r3
    assert assigned(s.add(build(3), 2)) == [(3, 1, "r3")]
    assert assigned(s.add(build(4), 2)) == [(4, 1, "r1")]
    assert assigned(s.add(build(5), 2)) == []           # nobody free


def test_a_runner_with_fewer_slots_after_registering_again_gets_no_more_than_those():
    s = sched()
    s.register("r1", "h", 1, (), 2, set(), now=0)
    s.add(build(1), 0)
    s.register("r1", "h", 1, (), 1, {(1, 1)}, now=1)     # restarted with one slot, still running build 1
    assert assigned(s.add(build(2), 1)) == []
    assert assigned(s.register("r1", "h", 1, (), 3, {(1, 1)}, now=2)) == [(2, 1, "r1")]   # and with three
    assert assigned(s.add(build(3), 2)) == [(3, 1, "r1")]
    assert assigned(s.add(build(4), 2)) == []


def test_a_pong_that_changes_nothing_hands_out_nothing_and_changes_nothing():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), 0)
    s.add(build(2), 0)
    plan = s.heartbeat("r1", {(1, 1)}, sent_at=5, now=5)
    assert not plan
    assert s.runners["r1"].last_seen == 5 and s.runners["r1"].running == {(1, 1)}
    assert [b.id for b in s.queued()] == [2]


def test_a_slot_freed_by_a_refused_run_is_offered_again_at_the_next_pong():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), 0)
    assert not s.refused(1, 1, "busy", now=1).assign    # not at once: the same runner would be picked
    assert assigned(s.heartbeat("r1", set(), sent_at=2, now=2)) == [(1, 2, "r1")]


def test_sending_restarts_the_lease_clock_and_refuses_a_lease_that_ended():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), 0)
    assert s.sending(1, 1, now=3)
    # a ping sent at 2 (after the hand-out at 0, before the `run` went out at 3) cannot judge it
    assert not s.heartbeat("r1", set(), sent_at=2, now=3.1).requeued
    s.cancel(1, now=4)
    assert not s.sending(1, 1, now=5)
    assert not s.sending(9, 1, now=5)


def test_the_free_runner_index_agrees_with_the_runners_after_any_events():
    import random
    rng = random.Random(7)
    s = sched(max_attempts=5)
    names = [f"r{i}" for i in range(6)]
    next_id = 1
    for step in range(3000):
        now = step * 0.1
        event = rng.randrange(7)
        name = rng.choice(names)
        if event == 0:
            s.register(name, "h", 1, rng.choice([(), ("gpu",)]), rng.randint(1, 3),
                       set(s.runners[name].running) if name in s.runners and rng.random() < 0.5 else set(), now)
        elif event == 1:
            s.add(build(next_id, rng.choice([(), (), ("gpu",)])), now)
            next_id += 1
        elif event == 2 and name in s.runners:
            lease = sorted(s.runners[name].running)
            if lease:
                s.finish(*rng.choice(lease), Status.PASSED, 0, now)
        elif event == 3:
            s.lost(name, "refused", now)
        elif event == 4 and name in s.runners:
            leases = set(s.runners[name].running)
            if leases and rng.random() < 0.3:
                leases.pop()
            s.heartbeat(name, leases, sent_at=now, now=now)
        elif event == 5 and s.builds:
            s.cancel(rng.choice(sorted(s.builds)), now)
        elif event == 6 and s.builds:
            b = s.builds[rng.choice(sorted(s.builds))]
            if b.status is Status.RUNNING:
                s.refused(b.id, b.attempt, "busy", now)
        free = {r.name for r in s.runners.values() if r.free > 0}
        assert set(s._free) == free, step
        if event == 1:      # a hand-out looks at every queued build: none left that a free runner could take
            for b in s.queued():
                assert not any(set(b.labels) <= set(r.labels) for r in s.runners.values() if r.free > 0), step


def test_restart_with_a_dead_runners_build_still_honours_max_attempts():
    s = Scheduler(heartbeat_interval=1.0, heartbeat_misses=3, max_attempts=3)
    spent = build(1)
    spent.status, spent.attempt, spent.runner = Status.RUNNING, 3, "gone"
    plan = s.load([spent], [RunnerRecord("gone", "h", 1, alive=False), RunnerRecord("r2", "h", 2)], now=10)
    assert [(b.id, b.status) for b in plan.finished] == [(1, Status.ERROR)]
    assert "runner lost" in plan.errored[0][1]
    assert not plan.assign
