"""The scheduler's runners (``ci.registry``): records, the index of runners
with a free slot, and liveness without builds. Plain objects, no sockets."""

from __future__ import annotations

import pytest

from ci.models import RunnerRecord
from ci.registry import Registry


def test_restored_runners_wait_for_their_window_and_the_dead_keep_when_they_died():
    reg = Registry(wall=lambda: 1000.0)
    alive = RunnerRecord("a", "h", 1, running={(1, 1)}, misses=2)
    dead = RunnerRecord("d", "h", 2, alive=False, last_seen=990.0)
    reg.restore([alive, dead], now=50.0, window=3.0)
    assert (alive.grace_until, alive.running, alive.misses) == (53.0, set(), 0)
    assert dead.died_at == 40.0                 # ten seconds before now, as the wall clock says
    for runner in (alive, dead):
        reg.slots_changed(runner)
    assert reg.free == {}                       # no work before it answers
    assert reg.in_grace("a", 52.9) and not reg.in_grace("a", 53.0) and not reg.in_grace("d", 0.0)
    reg.heard(alive)
    assert list(reg.free) == ["a"] and alive.grace_until == 0.0


def test_the_free_index_follows_slots_and_liveness_in_the_order_runners_came_free():
    reg = Registry(wall=lambda: 5.0)
    one, two = reg.register("one", "h", 1, (), 1), reg.register("two", "h", 2, ("gpu",), 1)
    assert list(reg.free) == ["one", "two"] and one.registered_at == 5.0
    one.running.add((7, 1))
    reg.slots_changed(one)
    assert list(reg.free) == ["two"]
    one.running.clear()
    reg.slots_changed(one)
    assert list(reg.free) == ["two", "one"]     # back of the line
    assert reg.missed(two) == 1 and reg.missed(two) == 2
    reg.died(two, now=9.0)
    assert list(reg.free) == ["one"] and reg.live("two") is None and two.died_at == 9.0
    with pytest.raises(ValueError):
        reg.forget("one")                        # alive: only the dead are forgotten
    assert reg.forgettable(5.0, now=13.9) == [] and reg.forgettable(5.0, now=14.0) == ["two"]
    assert reg.forget("two") is two and "two" not in reg.runners
    with pytest.raises(KeyError):
        reg.forget("two")
