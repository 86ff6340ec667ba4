"""The trio end to end: real observer, dispatcher and runners as processes,
real sockets on loopback, a real git repository and a real SQLite file."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, by_sha, child_env, finished, tinyci

pytestmark = pytest.mark.slow
FAIL = "echo running tests; echo 'AssertionError: expected 4, got 5' >&2; exit 3\n"


def test_commit_is_built_passed_and_failing_commit_failed_with_its_output(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    first = repo.head()
    builds = c.wait_builds(lambda b: len(b) == 1 and finished(b), "the initial commit to be built")
    assert (builds[0]["sha"], builds[0]["status"], builds[0]["branch"]) == (first, "passed", "main")

    bad = repo.commit("break the tests", {"build.sh": FAIL})
    builds = c.wait_builds(lambda b: len(b) == 2 and finished(b), "the failing commit to be built")
    failed = by_sha(builds)[bad]
    assert (failed["status"], failed["exit_code"], failed["subject"]) == ("failed", 3, "break the tests")
    assert failed["runner"] == "r1" and failed["attempt"] == 1

    out = tinyci("log", str(failed["id"]), "--dispatcher", c.disp.addr)
    assert out.returncode == 0, out.stderr
    assert "$ sh build.sh" in out.stdout
    assert "AssertionError: expected 4, got 5" in out.stdout
    assert "failed" in out.stdout

    status = tinyci("status", "--json", "--dispatcher", c.disp.addr)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert [b["status"] for b in data["builds"]] == ["failed", "passed"]       # newest first
    assert data["runners"][0]["name"] == "r1" and data["runners"][0]["state"] == "idle"
    table = tinyci("status", "--dispatcher", c.disp.addr)
    assert table.returncode == 0 and "r1" in table.stdout and "failed" in table.stdout


def test_two_runners_build_two_commits_at_the_same_time(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.runner("r2")
    obs = c.observer(repo)
    c.wait_builds(lambda b: finished(b), "the initial commit")
    obs.stop()
    slow = "sleep 2; echo done\n"
    a = repo.commit("one", {"build.sh": slow})
    b = repo.commit("two", {"build.sh": slow, "other.txt": "x"})
    c.observer(repo)
    builds = c.wait_builds(lambda bs: len(bs) == 3 and finished(bs), "both commits")
    one, two = by_sha(builds)[a], by_sha(builds)[b]
    assert one["status"] == two["status"] == "passed"
    assert {one["runner"], two["runner"]} == {"r1", "r2"}
    # they overlapped in time: each started before the other finished
    assert one["started_at"] < two["finished_at"] and two["started_at"] < one["finished_at"]


def test_runner_killed_mid_build_the_build_runs_again_elsewhere_as_attempt_2(cluster, repo):
    c = cluster()
    c.dispatcher()
    r1 = c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    sha = repo.commit("slow", {"build.sh": "echo start; sleep 3; echo finished\n"})
    running = c.wait_builds(lambda b: by_sha(b).get(sha, {}).get("status") == "running", "the slow build to start")
    assert by_sha(running)[sha]["runner"] == "r1"
    c.runner("r2")
    r1.kill()
    builds = c.wait_builds(lambda b: by_sha(b)[sha]["status"] not in ("queued", "running"),
                           "the build to finish on the other runner", timeout=40)
    build = by_sha(builds)[sha]
    assert (build["status"], build["attempt"], build["runner"]) == ("passed", 2, "r2")
    assert c.runner_state("r1") == "dead"
    log = c.log(build["id"])
    assert "attempt 1 taken back: runner r1 lost" in log
    assert "attempt 2 on r2" in log and "finished" in log


def test_dispatcher_restart_keeps_history_and_runs_what_was_queued(cluster, repo):
    c = cluster()
    disp = c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo)
    first = c.wait_builds(finished, "the initial commit")[0]
    c.daemons[1].stop()                             # no runner: the next commit stays queued
    sha = repo.commit("queued while nobody runs")
    c.wait_builds(lambda b: by_sha(b).get(sha, {}).get("status") == "queued", "the commit to be queued")
    obs.stop()
    assert disp.stop() == 0
    disp.start()                                    # same data dir, a new port
    c.runner("r1b")
    c.observer(repo)
    builds = c.wait_builds(lambda b: len(b) == 2 and finished(b), "the queued build after restart")
    assert by_sha(builds)[first["sha"]]["id"] == first["id"]     # history kept
    assert by_sha(builds)[sha]["status"] == "passed"
    assert by_sha(builds)[sha]["id"] > first["id"]


def test_observer_stopped_while_commits_are_made_builds_every_commit_exactly_once(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1", "--slots", "2")
    obs = c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    obs.stop()
    shas = [repo.commit(f"change {i}") for i in range(5)]
    obs.start()
    builds = c.wait_builds(lambda b: len(b) == 6 and finished(b), "every commit made while away")
    built = [b["sha"] for b in builds]
    assert sorted(built) == sorted(set(built))       # exactly once
    assert set(shas) <= set(built)
    assert all(b["status"] == "passed" for b in builds)
    # oldest first: build numbers follow commit order
    ids = {b["sha"]: b["id"] for b in builds}
    assert [ids[s] for s in shas] == sorted(ids[s] for s in shas)


def test_daemons_stop_cleanly_on_sigterm_with_connections_open(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")                 # the dispatcher keeps a connection open to it
    c.observer(repo)               # and the observer one to the dispatcher
    c.wait_builds(finished, "the initial commit")
    screen = c.tmp / "console.txt"
    with open(screen, "w") as out:     # not a terminal: it prints a plain snapshot once connected
        watcher = subprocess.Popen([sys.executable, "-m", "ci", "console", "--dispatcher", c.disp.addr],
                                   stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
    try:
        c.wait("the console to show a snapshot (its watch stream is open)", lambda: "r1" in screen.read_text())
        for daemon in reversed(c.daemons):
            assert daemon.stop() == 0
    finally:
        watcher.kill()
        watcher.wait(10)
    for daemon in c.daemons:
        assert "Traceback" not in daemon.log(), f"{daemon.kind} logged a traceback while stopping:\n{daemon.log()}"
