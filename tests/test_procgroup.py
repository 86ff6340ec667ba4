"""Process groups with real processes: alive or not (zombies are dead), the
whole tree killed (SIGTERM, then SIGKILL after the grace), a stopped group
resumed so it sees SIGTERM, the orphans a killed runner left reaped, and the
strays a step left outside its group ended by the runner as their reaper."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ci import procgroup

from conftest import child_env, pid_alive
from runner_support import read_pid


class Groups:
    """Starts shell commands each in its own process group; kills those groups at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, command: str, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(["sh", "-c", command], start_new_session=True, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # the group we made: pgid = its leader's pid
            except ProcessLookupError:
                pass
            proc.wait(10)


@pytest.fixture
def groups():
    made = Groups()
    try:
        yield made
    finally:
        made.close()


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return value


def test_a_group_is_alive_until_its_last_member_is_dead_or_a_zombie(groups):
    proc = groups.start("exec sleep 1000")
    assert procgroup.group_alive(proc.pid)
    assert procgroup.group_members(proc.pid) == [proc.pid]
    os.kill(proc.pid, signal.SIGKILL)
    # not waited for yet: a zombie, which killpg still reaches, but dead
    wait_for(lambda: not pid_alive(proc.pid), "the process to die")
    assert not procgroup.group_alive(proc.pid)
    proc.wait(10)
    assert not procgroup.group_alive(proc.pid)
    assert not procgroup.signal_group(proc.pid, signal.SIGTERM)


def test_kill_group_ends_the_whole_tree_even_a_child_that_ignores_sigterm(groups, tmp_path):
    stubborn = tmp_path / "stubborn.pid"
    # a grandchild that ignores SIGTERM (sleep inherits the ignore), so only the SIGKILL ends it
    proc = groups.start(f"sh -c 'trap \"\" TERM; echo $$ > {stubborn}; exec sleep 1000' & sleep 1000")
    pid = wait_for(lambda: read_pid(stubborn), "the stubborn child to start")
    started = time.monotonic()
    asyncio.run(procgroup.kill_group(proc.pid, 0.3))
    assert time.monotonic() - started >= 0.3, "SIGKILL came before the grace was over"
    assert not procgroup.group_alive(proc.pid)
    assert not pid_alive(pid) and not pid_alive(proc.pid)
    assert proc.wait(10) == -signal.SIGTERM         # the shell itself went at the SIGTERM


def test_kill_group_resumes_a_stopped_group(groups):
    proc = groups.start("exec sleep 1000")     # one process: a vfork half done would not show "T"
    os.killpg(proc.pid, signal.SIGSTOP)
    wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "T",
             "the process to stop")
    asyncio.run(procgroup.kill_group(proc.pid, 30))
    # it saw the SIGTERM at once, long before the grace ran out
    assert proc.wait(10) == -signal.SIGTERM


def test_kill_group_of_a_group_already_gone_does_nothing(groups):
    proc = groups.start("exit 0")
    proc.wait(10)
    asyncio.run(procgroup.kill_group(proc.pid, 30))


def test_reap_orphans_kills_only_the_groups_marked_in_this_boot(groups, tmp_path):
    checkouts = tmp_path / "checkouts"
    checkouts.mkdir()
    orphan = groups.start("sleep 1000")
    spared = groups.start("sleep 1000")
    marker = procgroup.mark_group(checkouts / "0", orphan.pid)
    assert marker == checkouts / "0.pgid"
    assert marker.read_text() == f"{orphan.pid} {procgroup.boot_id()}\n"
    # a marker from before a reboot: that group id may be anyone's now
    (checkouts / "1.pgid").write_text(f"{spared.pid} another-boot\n")
    (checkouts / "2.pgid").write_text("garbage\n")
    (checkouts / "3.pgid").write_text(f"1 {procgroup.boot_id()}\n")
    assert procgroup.reap_orphans(checkouts) == [orphan.pid]
    assert orphan.wait(10) == -signal.SIGKILL
    assert procgroup.group_alive(spared.pid)
    assert not list(checkouts.glob("*.pgid")), "every marker is removed"
    assert procgroup.reap_orphans(checkouts) == []


def test_reap_orphans_finds_a_step_by_its_mark_when_its_group_was_never_noted(groups, tmp_path):
    # the runner was killed between the spawn and writing the group id: the marker
    # holds only the step's mark, which the step's processes carry in their environment
    checkouts = tmp_path / "checkouts"
    checkouts.mkdir()
    orphan = groups.start("sleep 1000", env={**os.environ, procgroup.STEP_MARK: "feedc0de"})
    spared = groups.start("sleep 1000", env={**os.environ, procgroup.STEP_MARK: "0ther"})
    wait_for(lambda: b"feedc0de" in Path(f"/proc/{orphan.pid}/environ").read_bytes(), "the orphan to start")
    marker = procgroup.mark_group(checkouts / "0", 0, "feedc0de")
    assert marker.read_text() == f"0 {procgroup.boot_id()} feedc0de\n"
    (checkouts / "1.pgid").write_text("0 another-boot 0ther\n")
    assert procgroup.reap_orphans(checkouts) == [orphan.pid]
    assert orphan.wait(10) == -signal.SIGKILL
    assert procgroup.group_alive(spared.pid)
    assert not list(checkouts.glob("*.pgid"))


# ---------------------------------------------------------------- strays, in a process of their own

# A stand-in runner: it becomes the subreaper, starts "steps" that leave
# processes behind outside their group, and reports (as JSON) who is its child
# and what end_strays did. A process of its own, so that this test process
# never becomes anyone's reaper.
REAPER = r"""
import asyncio, json, os, subprocess, sys, time
from ci import procgroup

started = []

def start(command, mark=None):
    env = dict(os.environ, **({procgroup.STEP_MARK: mark} if mark else {}))
    shell = subprocess.Popen(["sh", "-c", command], env=env, start_new_session=True, stdout=subprocess.PIPE)
    pids = [int(p) for p in shell.stdout.read().split()]     # the shell prints them and exits
    shell.wait()
    started.extend(pids)
    return pids

def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

out = {"subreaper": procgroup.become_subreaper()}
steps = procgroup.Steps()
helper = subprocess.Popen(["sleep", "300"])     # the runner's own child, in its own session
started.append(helper.pid)
try:
    other = steps.begin()                       # a step still running in another slot
    steps.started(other, 1)                     # (its shell's pid is known: one not ours to scan)
    escaped = start("setsid sleep 300 >/dev/null & echo $!")     # the issue's case: a new session
    forked = start("(sleep 300 >/dev/null & echo $!) | cat")     # a double fork: its parent subshell is gone
    cleared = start(f"env -u {procgroup.STEP_MARK} setsid sleep 300 >/dev/null & echo $!", mark="gone-step")
    spared = start("setsid sleep 300 >/dev/null & echo $!", mark=other)    # the step still running's
    out["parents"] = [parent(p) for p in escaped + forked + cleared + spared]
    out["first"] = asyncio.run(procgroup.end_strays(steps, 0.5))
    out["alive"] = [p for p in escaped + forked + cleared + spared + [helper.pid] if os.path.exists(f"/proc/{p}")]
    steps.end(other)                            # that step ends too
    out["second"] = asyncio.run(procgroup.end_strays(steps, 0.5))
    out["spared"] = spared
    out["ended"] = escaped + forked + cleared
    out["helper"] = helper.pid
    out["helper_alive"] = helper.poll() is None
finally:
    for pid in started:                         # whatever happened, nothing started here outlives it
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    helper.wait()
print(json.dumps(out))
"""


def test_strays_outside_the_group_are_ended_unless_a_live_step_or_the_runner_owns_them():
    done = subprocess.run([sys.executable, "-c", REAPER], capture_output=True, text=True, timeout=60,
                          env=child_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["subreaper"] is True
    me = out["parents"][0]
    assert set(out["parents"]) == {me}, "each stray was reparented to the subreaper, not to init"
    # the first sweep ends the three that no live step owns (one cleared its mark) and reaps
    # them: gone from /proc, not zombies; the live step's process and the runner's own child stay
    assert sorted(out["first"]) == sorted(out["ended"])
    assert out["alive"] == [*out["spared"], out["helper"]]
    assert out["second"] == out["spared"] and out["helper_alive"]
    assert not any(pid_alive(p) for p in out["ended"] + out["spared"])


def test_the_children_files_name_the_same_children_as_a_scan_of_proc():
    # strays() reads /proc/<pid>/task/*/children where the kernel has them, else scans every process
    child = subprocess.Popen(["sleep", "30"])
    try:
        scan = procgroup._scanned_children()
        assert scan is not None
        direct = {pid for pid, _ in procgroup._direct_children(os.getpid())}
        assert child.pid in direct
        assert direct == {pid for pid, _ in scan(os.getpid())}
    finally:
        child.kill()
        child.wait()


def test_a_step_being_started_in_another_slot_is_not_taken_for_a_stray():
    # its shell is our child before its pid is known: a quick one may already be a zombie,
    # which the scan must leave to asyncio (reaping it made the step exit 255)
    steps = procgroup.Steps()
    mark = steps.begin()                        # started, pid not known yet
    shell = subprocess.Popen(["true"], start_new_session=True)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{shell.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    try:
        live, zombies = procgroup.strays(steps)
        assert shell.pid not in zombies and shell.pid not in live
        steps.end(mark)                         # no step starting: a zombie of ours outside our session is a stray's
        assert shell.pid in procgroup.strays(steps)[1]
    finally:
        assert shell.wait(timeout=10) == 0      # ours to reap: its exit status is still there
