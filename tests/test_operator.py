"""The operator's commands against real daemons: `log --follow` exit codes,
`trigger`, `rebuild`, `cancel` of a queued and of a running build (with its
whole process tree), and `status --watch`."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

from conftest import ROOT, child_env, finished, pid_alive, tinyci

FAIL = "echo checking; echo 'expected 4, got 5' >&2; exit 3\n"


def test_log_follow_exit_codes_trigger_and_rebuild(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(lambda b: finished(b), "the initial commit")
    bad = repo.commit("break it", {"build.sh": FAIL})
    failed = c.wait_builds(lambda b: len(b) == 2, "the failing commit to be queued")[0]
    assert failed["sha"] == bad
    # follow from the start of the build to its end: the whole log, then the exit code
    follow = tinyci("log", str(failed["id"]), "--follow", "--dispatcher", c.disp.addr)
    assert follow.returncode == 1, follow.stderr
    assert "expected 4, got 5" in follow.stdout and "=== failed (exit 3)" in follow.stdout
    assert follow.stderr == f"tinyci: build {failed['id']} failed\n"
    passed = tinyci("log", "1", "--follow", "--dispatcher", c.disp.addr)
    assert passed.returncode == 0 and "=== passed" in passed.stdout

    # the head of main was built already; trigger builds it again as a new build
    out = tinyci("trigger", "--branch", "main", "--dispatcher", c.disp.addr)
    assert out.returncode == 0, out.stderr
    number = int(re.fullmatch(r"build (\d+) queued\n", out.stdout).group(1))
    assert number > failed["id"]
    assert tinyci("log", str(number), "--follow", "--dispatcher", c.disp.addr).returncode == 1
    build = {b["id"]: b for b in c.builds()}[number]
    assert (build["sha"], build["branch"], build["reason"], build["subject"], build["status"]) == \
        (bad, "main", "manual", "break it", "failed")
    table = tinyci("status", "--dispatcher", c.disp.addr)
    assert re.search(rf"{number}\s+main\s+{bad[:7]}\s+manual: break it\s+failed", table.stdout), table.stdout

    out = tinyci("trigger", repo.head("HEAD~1"), "--dispatcher", c.disp.addr)
    assert out.returncode == 0, out.stderr
    again = int(out.stdout.split()[1])
    assert tinyci("log", str(again), "--follow", "--dispatcher", c.disp.addr).returncode == 0

    out = tinyci("rebuild", str(failed["id"]), "--dispatcher", c.disp.addr)
    assert out.returncode == 0, out.stderr
    rebuilt = int(out.stdout.split()[1])
    assert rebuilt > again
    build = {b["id"]: b for b in c.builds()}[rebuilt]
    assert (build["sha"], build["reason"]) == (bad, f"rebuild of {failed['id']}")
    assert tinyci("log", str(rebuilt), "--follow", "--dispatcher", c.disp.addr).returncode == 1

    unknown = tinyci("trigger", "no-such-branch", "--dispatcher", c.disp.addr)
    assert unknown.returncode == 1 and "'no-such-branch' is not a commit" in unknown.stderr


def test_cancel_a_queued_and_a_running_build_leaves_no_process_behind(cluster, repo, tmp_path):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(lambda b: finished(b), "the initial commit")
    pids = tmp_path / "pids"
    pids.mkdir()
    # the step and a child it starts write their pids, then wait (bounded) for a cancel
    sha = repo.commit("hang", {"build.sh": (
        f"echo $$ > {pids}/step.$CI_BUILD\nsleep 120 &\necho $! > {pids}/child.$CI_BUILD\n"
        f"echo started; wait\n")})
    running = c.wait_builds(lambda b: b[0]["sha"] == sha and b[0]["status"] == "running", "the build to start")[0]
    step, child = pids / f"step.{running['id']}", pids / f"child.{running['id']}"
    c.wait("the step to write its pids", lambda: step.exists() and child.exists()
           and child.read_text().strip())
    step_pid, child_pid = int(step.read_text()), int(child.read_text())
    assert not not pid_alive(step_pid) and not not pid_alive(child_pid)

    # r1's only slot is taken: a rebuild waits in the queue; cancelled there, it never runs
    queued = int(tinyci("rebuild", str(running["id"]), "--dispatcher", c.disp.addr).stdout.split()[1])
    assert {b["id"]: b for b in c.builds()}[queued]["status"] == "queued"
    out = tinyci("cancel", str(queued), "--dispatcher", c.disp.addr)
    assert (out.returncode, out.stdout) == (0, f"build {queued} cancelled\n"), out.stderr
    assert queued not in c.status()["queue"]

    out = tinyci("cancel", str(running["id"]), "--dispatcher", c.disp.addr)
    assert (out.returncode, out.stdout) == (0, f"build {running['id']} cancelled\n"), out.stderr
    c.wait("the step and its child to be killed", lambda: not pid_alive(step_pid) and not pid_alive(child_pid), timeout=20)
    c.wait("r1 to be idle again", lambda: c.runner_state("r1") == "idle")
    builds = {b["id"]: b for b in c.builds()}
    assert builds[running["id"]]["status"] == builds[queued]["status"] == "cancelled"
    assert builds[queued]["attempt"] == 0                       # it never ran
    log = c.log(running["id"])
    assert re.search(r"=== cancelled by \S+@\S+ \(operator at 127\.0\.0\.1:\d+\), \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ===",
                     log), log
    assert "started" in log
    # the runner's own last words after the cancel are kept, not skipped over
    assert "the step's processes were killed]" in log, log
    assert re.search(r"=== cancelled by \S+@\S+ ", c.log(queued))
    again = tinyci("cancel", str(running["id"]), "--dispatcher", c.disp.addr)
    assert again.returncode == 1 and "already cancelled" in again.stderr
    # the runner is usable afterwards
    repo.commit("after", {"build.sh": "echo fine\n"})
    c.wait_builds(lambda b: b[0]["subject"] == "after" and b[0]["status"] == "passed", "the next build")


def test_status_watch_prints_a_new_table_when_something_changes(cluster, repo):
    c = cluster()
    c.dispatcher()
    proc = subprocess.Popen([sys.executable, "-m", "ci", "status", "--watch", "--dispatcher", c.disp.addr],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=child_env(), cwd=ROOT)
    out = b""
    try:
        deadline = time.monotonic() + 30
        seen_empty = False
        while time.monotonic() < deadline and not re.search(rb"r1\s+127\.0\.0\.1:\d+\s+-\s+idle", out):
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
            if not seen_empty and b"no runners registered yet" in out:
                seen_empty = True
                c.runner("r1")
        assert seen_empty and re.search(rb"r1\s+127\.0\.0\.1:\d+\s+-\s+idle", out), out.decode()
        os.kill(proc.pid, signal.SIGINT)
        proc.communicate(timeout=10)
        assert proc.returncode == 0 and b"\x1b" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
