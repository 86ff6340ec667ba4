"""The dispatcher's rules without sockets, disk or sleeping: time is passed in.

``now`` is the monotonic clock every rule runs on; the wall clock is a fake
(``Wall``) the tests step forward and back to show it decides nothing."""

import pytest

from ci.models import Build, RunnerRecord, Status
from ci.scheduler import Plan, Scheduler

SHA = "a" * 40


class Wall:
    """A wall clock the test sets (and steps, as NTP does)."""

    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def build(n, labels=()):
    return Build(n, "/repo", "main", SHA, labels=tuple(labels), created_at=0.0)


def sched(max_attempts=3, wall=None):
    return Scheduler(heartbeat_interval=1.0, heartbeat_misses=3, max_attempts=max_attempts, wall=wall or Wall())


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


def test_a_runner_is_dead_after_heartbeat_misses_unanswered_pings_in_a_row():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.register("r2", "h", 2, (), 1, set(), now=0)
    s.add(build(1), 0)
    owner = s.builds[1].runner
    other = "r2" if owner == "r1" else "r1"
    assert not s.missed(owner, "no pong within 1s", now=1) and not s.missed(owner, "no pong within 1s", now=2)
    s.heartbeat(owner, {(1, 1)}, sent_at=2.5, now=2.6)  # an answer starts the count again
    assert not s.missed(owner, "no pong within 1s", now=4) and not s.missed(owner, "no pong within 1s", now=5)
    assert s.runners[owner].alive and s.builds[1].attempt == 1
    plan = s.missed(owner, "no pong within 1s", now=6)  # the third in a row
    assert [r.name for r in plan.dead] == [owner]
    assert "3 pings in a row unanswered (the last: no pong within 1s)" in plan.requeued[0][1]
    assert [(b.id, why.startswith(f"attempt 1 taken back: runner {owner} lost")) for b, why in plan.requeued] == [(1, True)]
    assert assigned(plan) == [(1, 2, other)]
    assert s.runners[owner].state.value == "dead"


def test_time_passing_without_pings_kills_nobody():
    """A dispatcher paused (SIGSTOP, a VM pause) for far longer than the deadline
    sent no pings meanwhile: it judges by the first pong after waking."""
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), now=0)
    plan = s.heartbeat("r1", {(1, 1)}, sent_at=10_000, now=10_000.1)
    assert not plan and s.runners["r1"].alive and s.builds[1].attempt == 1


def test_wall_clock_steps_change_no_rule_only_the_times_people_read():
    wall = Wall()
    s = sched(wall=wall)
    s.register("r1", "h", 1, (), 2, set(), now=10)
    assert s.runners["r1"].registered_at == wall.t
    wall.t += 30                                        # NTP steps forward
    s.add(build(1), now=11)
    assert s.builds[1].started_at == wall.t
    wall.t -= 3600                                      # and back an hour
    s.add(build(2), now=12)
    assert s.builds[2].started_at == wall.t
    # a ping sent at 11.5 (after build 1's hand-out at 11, before build 2's at 12) judges build 1
    # only, though build 2's started_at is an hour "earlier" than build 1's
    plan = s.heartbeat("r1", {(1, 1)}, sent_at=11.5, now=11.6)
    assert not plan.requeued and s.builds[2].status is Status.RUNNING
    assert s.runners["r1"].last_seen == wall.t
    plan = s.finish(1, 1, Status.PASSED, 0, now=13)
    assert plan.finished[0].finished_at == wall.t


def test_a_runner_known_before_a_restart_gets_the_deadline_to_come_back_and_no_work_before():
    s = sched()
    r1 = RunnerRecord("r1", "h", 1, alive=True, last_seen=0)
    running = build(1)
    running.status, running.attempt, running.runner = Status.RUNNING, 1, "r1"
    plan = s.load([running, build(2)], [r1], now=100)
    assert not plan.assign                              # not before it answered once
    assert s.registry.in_grace("r1", 102.9)
    assert not s.unreachable("r1", "connection refused", now=101)      # still starting, maybe
    assert not s.missed("r1", "no pong", now=102)                      # one miss: counted, not fatal
    assert s.builds[1].attempt == 1 and s.runners["r1"].alive
    plan = s.heartbeat("r1", {(1, 1)}, sent_at=102.5, now=102.6)     # back, still running build 1
    assert not plan.requeued and not plan.assign        # its one slot is busy
    assert not s.registry.in_grace("r1", 102.7)
    # once it has answered, a refusal is fatal at once again
    plan = s.unreachable("r1", "connection refused", now=103)
    assert [r.name for r in plan.dead] == ["r1"] and [b.id for b, _ in plan.requeued] == [1]


def test_a_runner_not_back_when_its_window_closes_is_lost_at_the_next_refusal():
    s = sched()
    running = build(1)
    running.status, running.attempt, running.runner = Status.RUNNING, 1, "r1"
    s.load([running], [RunnerRecord("r1", "h", 1, alive=True)], now=100)
    assert not s.unreachable("r1", "connection refused", now=102.9)
    plan = s.unreachable("r1", "connection refused", now=103.1)
    assert [r.name for r in plan.dead] == ["r1"]
    assert [(b.id, b.attempt) for b, _ in plan.requeued] == [(1, 1)]


def test_a_draining_runner_finishes_its_build_takes_nothing_new_until_resumed():
    s = sched()
    s.register("r1", "h", 1, (), 2, set(), now=0)
    s.add(build(1), now=0)
    assert not s.drain("r1", True, now=1)
    assert s.runners["r1"].state.value == "draining"
    assert assigned(s.add(build(2), now=2)) == []       # a free slot, but draining
    s.register("r1", "h", 1, (), 2, {(1, 1)}, now=3)    # registering again keeps it draining
    assert assigned(s.add(build(3), now=3)) == []
    plan = s.finish(1, 1, Status.PASSED, 0, now=4)
    assert not plan.assign and s.runners["r1"].state.value == "drained"
    plan = s.drain("r1", False, now=5)
    assert assigned(plan) == [(2, 1, "r1"), (3, 1, "r1")]
    with pytest.raises(KeyError):
        s.drain("nobody", True, now=6)


def test_only_a_dead_runner_is_forgotten_and_the_long_dead_are_forgettable():
    wall = Wall()
    s = sched(wall=wall)
    s.register("r1", "h", 1, (), 1, set(), now=0)
    with pytest.raises(ValueError):
        s.registry.forget("r1")
    s.lost("r1", "connection refused", now=10)
    assert s.registry.forgettable(100, now=109) == [] and s.registry.forgettable(100, now=110) == ["r1"]
    assert s.registry.forgettable(0, now=1e9) == []              # 0: never
    assert s.registry.forget("r1").name == "r1" and "r1" not in s.runners
    with pytest.raises(KeyError):
        s.registry.forget("r1")
    # after a restart, a runner dead before it counts from when it was last seen
    t = Scheduler(1.0, 3, 3, wall=wall)
    t.load([], [RunnerRecord("old", "h", 1, alive=False, last_seen=wall.t - 50)], now=1000)
    assert t.registry.forgettable(60, now=1009) == [] and t.registry.forgettable(60, now=1010) == ["old"]


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
    assert s.runners["r1"].last_seen == s.wall() and s.runners["r1"].running == {(1, 1)}
    assert [b.id for b in s.queued()] == [2]


def test_a_slot_freed_by_a_refused_run_is_offered_again_at_the_next_pong():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), 0)
    assert not s.refused(1, 1, "busy", now=1).assign    # not at once: the same runner would be picked
    assert assigned(s.heartbeat("r1", set(), sent_at=2, now=2)) == [(1, 2, "r1")]


def test_no_pong_judges_a_build_until_its_run_was_acknowledged_and_sending_refuses_an_ended_lease():
    s = sched()
    s.register("r1", "h", 1, (), 1, set(), now=0)
    s.add(build(1), 0)
    assert s.sending(1, 1, now=3)
    # pings sent at 2 and at 4 (the `run` on its way: a ping on its own connection may overtake it)
    assert not s.heartbeat("r1", set(), sent_at=2, now=3.1).requeued
    assert not s.heartbeat("r1", set(), sent_at=4, now=4.1).requeued
    s.sent(1, 1, now=5)                                 # the runner acknowledged it at 5
    assert not s.heartbeat("r1", set(), sent_at=4.5, now=5.1).requeued
    plan = s.heartbeat("r1", set(), sent_at=6, now=6.1)     # sent after: the runner must report it
    assert [(b.id, why) for b, why in plan.requeued] == [(1, "attempt 1 taken back: runner r1 is not running it")]
    s.sent(1, 1, now=7)                                 # a late acknowledgement of an ended lease: ignored
    assert s.builds[1].status is Status.RUNNING and s.builds[1].attempt == 2
    s.cancel(1, now=8)
    assert not s.sending(1, 2, now=9)
    assert not s.sending(9, 1, now=9)


def test_the_free_runner_index_agrees_with_the_runners_after_any_events():
    import random
    rng = random.Random(7)
    s = sched(max_attempts=5)
    names = [f"r{i}" for i in range(6)]
    next_id = 1
    for step in range(3000):
        now = step * 0.1
        event = rng.randrange(9)
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
        elif event == 7 and name in s.runners:
            s.drain(name, not s.runners[name].draining, now)
        elif event == 8:
            s.missed(name, "no pong", now)
        free = {r.name for r in s.runners.values() if r.free > 0}
        assert set(s.registry.free) == free, step
        if event == 1:      # a hand-out looks at every queued build: none left that a free runner could take
            for b in s.queued():
                assert not any(set(b.labels) <= set(r.labels) for r in s.runners.values() if r.free > 0), step


def test_restart_with_a_dead_runners_build_still_honours_max_attempts():
    s = sched()
    spent = build(1)
    spent.status, spent.attempt, spent.runner = Status.RUNNING, 3, "gone"
    plan = s.load([spent], [RunnerRecord("gone", "h", 1, alive=False), RunnerRecord("r2", "h", 2)], now=10)
    assert [(b.id, b.status) for b in plan.finished] == [(1, Status.ERROR)]
    assert "runner lost" in plan.errored[0][1]
    assert not plan.assign


def test_a_plan_is_true_when_any_of_its_parts_has_something():
    """``Plan.__bool__`` names each part: one added later and not named there fails here.
    ``saved`` asks for nothing: it only says which of the other parts' builds need no write."""
    assert not Plan() and not Plan(saved=[1])
    for name in Plan.__dataclass_fields__:
        if name != "saved":
            plan = Plan()
            getattr(plan, name).append(object())
            assert plan, name
