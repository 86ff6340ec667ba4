"""`tinyci run` and `tinyci wait` against real daemons (exit codes for pass,
fail and cancel; one job; a commit's builds by sha; JSON), what a triggered
build records (the branch the commit is on, not "manual"; CI_BRANCH and
CI_JOB as its steps see them), a trigger of a branch that does not exist,
and `tinyci log --timestamps`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, child_env, tinyci

CI_YAML = """\
steps: ['echo "branch=$CI_BRANCH job=$CI_JOB"', 'sh check.sh']
jobs:
  lint: {}
  test: {}
"""


def test_run_and_wait_exit_codes_and_what_a_triggered_build_records(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1", "--slots", "3")    # the slow commit's own two builds hold two
    passing = repo.commit("passing", {".ci.yaml": CI_YAML, "check.sh": "echo fine\n"})
    repo.git("checkout", "-q", "-b", "topic")
    failing = repo.commit("failing", {"check.sh": "echo broken; exit 4\n"})
    repo.git("checkout", "-q", "main")
    c.observer(repo)
    c.wait_builds(lambda b: len(b) == 4 and all(x["status"] in ("passed", "failed") for x in b), "the pushes")
    addr = ["--dispatcher", c.disp.addr]

    # run REV: both jobs, every verdict, exit 0; the build records the branch the commit is on
    done = tinyci("run", passing[:10], *addr)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len([line for line in lines if re.fullmatch(r"build \d+ queued", line)]) == 2
    assert sorted(re.sub(r"build \d+ ", "", line).split(":")[0] for line in lines if " passed:" in line) == [
        "[lint] passed", "[test] passed"]
    ids = [int(x) for x in re.findall(r"build (\d+) queued", done.stdout)]
    builds = {b["id"]: b for b in c.builds()}
    assert {(builds[i]["branch"], builds[i]["reason"], builds[i]["job"]) for i in ids} == {
        ("main", "manual", "lint"), ("main", "manual", "test")}
    assert "branch=main job=lint" in c.log(min(ids))

    # one job of a failing commit on another branch: exit 1, and its branch recorded
    done = tinyci("run", failing, "--job", "test", "--json", *addr)
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert [(b["job"], b["status"], b["branch"]) for b in result["builds"]] == [("test", "failed", "topic")]
    assert result["exit_code"] == 1
    assert "branch=topic job=test" in c.log(result["builds"][0]["id"])

    # a job the commit does not have, a branch that does not exist: exit 2, one line each
    done = tinyci("run", passing, "--job", "nosuch", *addr)
    assert done.returncode == 2 and "has no job 'nosuch' (its jobs: lint, test)" in done.stderr
    done = tinyci("trigger", "--branch", "nosuch", *addr)
    assert done.returncode == 1 and done.stderr == f"tinyci: 'nosuch' is not a branch in {repo.path}\n"

    # wait: by sha (the newest build of each job) and by number, with --follow printing the log
    done = tinyci("wait", failing[:12], *addr)
    assert done.returncode == 1 and " [test] failed:" in done.stdout and " [lint] failed:" in done.stdout
    done = tinyci("wait", str(min(ids)), "--follow", *addr)
    assert done.returncode == 0 and "branch=main job=lint" in done.stdout and " [lint] passed:" in done.stdout

    # a cancelled build: exit 2
    repo.commit("slow", {"check.sh": "sleep 60\n"})
    proc = subprocess.Popen([sys.executable, "-m", "ci", "run", "--branch", "main", "--job", "test", *addr],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT)
    try:
        queued = int(re.fullmatch(r"build (\d+) queued\n", proc.stdout.readline()).group(1))
        c.wait("the slow build runs", lambda: any(b["id"] == queued and b["status"] == "running"
                                                  for b in c.builds()))
        assert tinyci("cancel", str(queued), *addr).returncode == 0
        assert proc.wait(60) == 2
        assert f"build {queued} [test] cancelled:" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # nothing to ask: exit 2
    done = tinyci("wait", "7", "--dispatcher", "127.0.0.1:1")
    assert done.returncode == 2 and "cannot reach the dispatcher" in done.stderr


def test_log_timestamps_say_when_each_line_reached_the_dispatcher(cluster, repo):
    c = cluster(steps=["echo first; sleep 1.2; echo second"])
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    build = c.wait_builds(lambda b: b and b[0]["status"] == "passed", "the build")[0]
    done = tinyci("log", str(build["id"]), "--timestamps", "--dispatcher", c.disp.addr)
    assert done.returncode == 0, done.stderr
    stamped = {}
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) (.*)", line)
        assert match, line                     # every line has its time
        h, m, s, ms, text = match.groups()
        stamped[text] = int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
    first, second = stamped["first"], stamped["second"]
    assert 1.0 <= (second - first) % 86400 < 10     # the sleep between them shows
    plain = tinyci("log", str(build["id"]), "--dispatcher", c.disp.addr).stdout
    assert [line.split(" ", 1)[1] for line in done.stdout.splitlines()] == plain.splitlines()
    # the times outlive the dispatcher: a restarted one says the same
    assert c.disp.stop() == 0
    c.dispatcher()
    again = tinyci("log", str(build["id"]), "--timestamps", "--dispatcher", c.disp.addr)
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr


def test_the_small_things_a_new_user_tripped_over(cluster, repo, tmp_path):
    c = cluster()
    c.dispatcher()
    obs = c.observer(repo)
    # the observer's address given as the dispatcher's: say what answered, not "refused our credentials"
    done = tinyci("status", "--dispatcher", obs.addr)
    assert done.returncode == 1 and f"{obs.addr} is observer, not dispatcher" in done.stderr, done.stderr
    # a console following a build that does not exist says so
    done = tinyci("console", "--once", "--follow", "9999", "--dispatcher", c.disp.addr)
    assert done.returncode == 0 and "Log of #9999: no such build" in done.stdout, done.stdout + done.stderr
    # a daemon's port taken: one line that does not repeat its name
    done = tinyci("dispatcher", "--port", c.disp.addr.rsplit(":", 1)[1], "--data", str(tmp_path / "d2"))
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(f"tinyci dispatcher: port {c.disp.port} on 127.0.0.1 is "
                                                   f"already in use"), done.stderr
