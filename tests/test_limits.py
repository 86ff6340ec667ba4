"""Bounds that hold with the real daemons: a ``.ci.yaml`` built to be costly
to read holds up neither the observer's other branches nor the runner's
answers to the dispatcher, a commit with more jobs than allowed is an
``error`` build that says why, and nothing a step starts outlives the build."""

from __future__ import annotations

import os
import signal

from conftest import finished, pid_alive
from runner_support import read_pid

from test_buildfile import alias_bomb

# A runner silent for more than 0.15 s x 4 is declared dead: a runner that read
# a costly .ci.yaml on its event loop would miss that, parsing four at once.
HEARTBEAT = {"heartbeat_interval": 0.15, "heartbeat_misses": 4}


def of(builds, sha):
    return sorted((b for b in builds if b["sha"] == sha), key=lambda b: b["id"])


def bomb() -> str:
    """A 75 KB file whose aliases fan out far past buildfile.MAX_VALUES."""
    text = alias_bomb(jobs=100, steps=5000, keys=6000)
    assert 75_000 <= len(text) < 100_000
    return text


def test_an_alias_bomb_on_one_branch_holds_up_neither_other_branches_nor_the_runner(cluster, repo):
    c = cluster(**HEARTBEAT)
    c.dispatcher()
    c.runner("r1", "--slots", "4")
    repo.git("branch", "aaa-bomb")                      # sorted before "main"
    obs = c.observer(repo, interval=0.1)
    c.wait_builds(lambda b: finished(b) and len(b) == 1, "the initial commit")
    obs.stop()          # so that one scan finds everything below
    repo.git("checkout", "-q", "aaa-bomb")
    bombs = [repo.commit(f"bomb {i}", {".ci.yaml": bomb().replace("K0:", f"K0{i}:")}) for i in range(4)]
    repo.git("checkout", "-q", "main")
    good = repo.commit("an ordinary change")
    c.observer(repo, interval=0.1)
    # the other branch's commit is queued (or already built) within seconds, not after the bombs
    # (20 s: reading each bomb takes about a second on a quiet machine, several on a loaded one)
    c.wait_builds(lambda b: of(b, good), "main's new commit to be reported", timeout=20)
    builds = c.wait_builds(lambda b: all(of(b, sha) and finished(of(b, sha)) for sha in [good, *bombs]),
                           "every commit to end")
    # branches take turns: main's one commit right after the first bomb, not after all four
    assert of(builds, bombs[0])[0]["id"] < of(builds, good)[0]["id"] < of(builds, bombs[1])[0]["id"]
    assert of(builds, good)[0]["status"] == "passed"
    for sha in bombs:
        build = of(builds, sha)[0]
        assert build["status"] == "error" and build["runner"] is None    # read by the observer
        assert "expands to more than 50000 values once its aliases" in c.log(build["id"])

    # the runner reads the file itself when the dispatcher was not told the jobs
    # (a repository it cannot read): four at once, while pings go on every 0.15 s
    url = f"file://{repo.path}"
    for number, sha in enumerate(bombs):
        c.request({"type": "commit", "repo": url, "branch": "aaa-bomb", "sha": sha, "author": "Ada",
                   "subject": f"bomb {number}", "time": 0}, role="observer")
    builds = c.wait_builds(lambda b: sum(1 for x in b if x["repo"] == url and x["status"] == "error") == 4,
                           "the runner to end the four bombs")
    for build in (b for b in builds if b["repo"] == url):
        assert build["runner"] == "r1" and build["attempt"] == 1, c.logs()
        assert "build error: .ci.yaml line 1: expands to more than 50000 values" in c.log(build["id"])
    log = c.disp.log(tail=10**6)
    assert "is dead" not in log and "queued again" not in log, log[-3000:]
    assert c.runner_state("r1") == "idle"


def test_more_jobs_than_allowed_is_an_error_build_that_says_why(cluster, repo):
    c = cluster()
    c.dispatcher()
    jobs = "".join(f"  j{i}: {{}}\n" for i in range(101))
    sha = repo.commit("too many jobs", {".ci.yaml": f"steps: [echo hi]\njobs:\n{jobs}"})
    c.observer(repo)
    builds = of(c.wait_builds(lambda b: of(b, sha) and finished(of(b, sha)), "the commit's build"), sha)
    assert [(b["status"], b["runner"]) for b in builds] == [("error", None)]
    assert ".ci.yaml line 3: jobs: 101 jobs, more than the 100 one commit may have" in c.log(builds[0]["id"])


def test_a_process_a_step_started_in_a_session_of_its_own_does_not_outlive_the_build(cluster, repo, tmp_path):
    pid_file = tmp_path / "escaped.pid"
    # the pid is written once the process has its own session: the step ends only after that
    c = cluster(steps=[f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' >/dev/null 2>&1 & "
                       f"while [ ! -s {pid_file} ]; do sleep 0.01; done; echo built"])
    c.dispatcher()
    runner = c.runner("r1")
    c.observer(repo)
    build = c.wait_builds(finished, "the build")[0]
    pid = read_pid(pid_file)
    try:
        assert build["status"] == "passed" and pid
        assert not pid_alive(pid), "the step's setsid child outlived the build"
        assert "1 process(es) the step left running outside its process group were killed" in c.log(build["id"])
        assert "cannot become the reaper" not in runner.log()
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
