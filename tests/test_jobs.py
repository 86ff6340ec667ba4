""".ci.yaml end to end with the real daemons: jobs on labelled runners and the
commit's pipeline status, broken files, artifacts, [skip ci], supersede, the
log cap and the notify.on_finish commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ci import blocking, protocol
from conftest import TOOL_CWD, child_env, finished, tinyci

TWO_JOBS = """\
env: {GREETING: hello}
steps:
  - echo "default steps"
jobs:
  alpha:
    labels: [alpha]
    steps:
      - run: echo "job-alpha-ran $GREETING"
        name: say alpha
  beta:
    labels: [beta]
    steps: [echo job-beta-ran]
"""


def of(builds, sha):
    return sorted((b for b in builds if b["sha"] == sha), key=lambda b: b["id"])


def test_two_jobs_run_on_the_runners_with_their_labels_and_the_commit_passes(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("ra", "--labels", "alpha,linux")
    sha = repo.commit("add jobs", {".ci.yaml": TWO_JOBS})
    c.observer(repo)
    c.wait_builds(lambda b: [x["status"] for x in of(b, sha)] == ["passed", "queued"], "alpha to pass")
    # beta has no runner yet: status says which label it waits for
    table = tinyci("status", "--dispatcher", c.disp.addr)
    assert table.returncode == 0 and "waits: no runner with label beta" in table.stdout, table.stdout
    data = json.loads(tinyci("status", "--json", "--dispatcher", c.disp.addr).stdout)
    pipeline = next(p for p in data["pipelines"] if p["sha"] == sha)
    assert pipeline["status"] == "running"
    beta = next(b for b in data["builds"] if b["job"] == "beta")
    assert beta["waiting"] == "no runner with label beta"

    c.runner("rb", "--labels", "beta")
    builds = of(c.wait_builds(lambda b: finished(of(b, sha)), "beta to run"), sha)
    assert [(b["job"], b["status"], b["runner"], b["labels"]) for b in builds] == [
        ("alpha", "passed", "ra", ["alpha"]), ("beta", "passed", "rb", ["beta"])]
    alpha_log, beta_log = c.log(builds[0]["id"]), c.log(builds[1]["id"])
    assert "job-alpha-ran hello" in alpha_log and "say alpha" in alpha_log
    assert "job-beta-ran" in beta_log
    assert "job-beta-ran" not in alpha_log and "default steps" not in alpha_log + beta_log

    data = json.loads(tinyci("status", "--json", "--dispatcher", c.disp.addr).stdout)
    pipeline = next(p for p in data["pipelines"] if p["sha"] == sha)
    assert pipeline["status"] == "passed"
    assert [(j["job"], j["status"]) for j in pipeline["jobs"]] == [("alpha", "passed"), ("beta", "passed")]
    table = tinyci("status", "--dispatcher", c.disp.addr).stdout
    assert "Commits" in table and "alpha" in table and "beta" in table

    # one failing job fails the commit
    bad = repo.commit("break beta", {".ci.yaml": TWO_JOBS.replace("echo job-beta-ran", "exit 4")})
    builds = of(c.wait_builds(lambda b: len(of(b, bad)) == 2 and finished(of(b, bad)), "the second commit"), bad)
    assert [b["status"] for b in builds] == ["passed", "failed"]
    data = json.loads(tinyci("status", "--json", "--dispatcher", c.disp.addr).stdout)
    assert next(p for p in data["pipelines"] if p["sha"] == bad)["status"] == "failed"


def test_a_broken_ci_yaml_is_an_error_naming_the_line(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("typo", {".ci.yaml": "steps:\n  - make\n  - run: [not, a, string]\n"})
    c.observer(repo)
    build = of(c.wait_builds(lambda b: finished(of(b, sha)), "the broken commit"), sha)[0]
    assert build["status"] == "error" and build["runner"] is None    # never handed to a runner
    log = c.log(build["id"])
    assert ".ci.yaml line 3: steps[2].run must be a non-empty string" in log


ARTIFACTS = """\
artifacts: [out/*.txt, link.txt, nothing/*]
steps:
  - mkdir -p out && echo "the report" > out/report.txt && printf 'x%.0s' $(seq 1 3000) > out/big.txt
  - ln -s /etc/passwd link.txt
  - python escape.py
"""

ESCAPE = """\
import asyncio, os
from ci import net, protocol      # the runner's PYTHONPATH reaches the step
msg = {"type": "artifact", "build": int(os.environ["CI_BUILD"]), "attempt": int(os.environ["CI_ATTEMPT"]),
       "path": "../../../escaped.txt", "offset": 0, "data": b"pwned", "eof": True}
try:
    asyncio.run(net.call(open("dispatcher.addr").read().strip(), msg, "runner", id="r1"))   # the build's runner
    print("escape accepted")
except protocol.RemoteError as exc:
    print("escape refused:", exc.code)
"""


def test_artifacts_are_stored_listed_and_fetched_and_escapes_refused(cluster, repo, tmp_path):
    c = cluster(max_artifact_bytes=2000)
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("artifacts", {".ci.yaml": ARTIFACTS, "escape.py": ESCAPE, "dispatcher.addr": c.disp.addr})
    c.observer(repo)
    build = of(c.wait_builds(lambda b: finished(of(b, sha)), "the build"), sha)[0]
    log = c.log(build["id"])
    assert build["status"] == "passed", log
    assert "escape refused: bad_path" in log
    assert "[artifact out/report.txt (11 bytes) sent]" in log
    assert "link.txt: a symlink" in log and "nothing/*: matched nothing" in log
    assert "out/big.txt: 3000 bytes would exceed the 2000-byte artifact limit" in log

    stored = tmp_path / "dispatcher" / "artifacts" / sha / str(build["id"]) / "out" / "report.txt"
    assert stored.read_text() == "the report\n"
    assert not list(tmp_path.rglob("escaped.txt"))

    listed = tinyci("artifacts", str(build["id"]), "--dispatcher", c.disp.addr)
    assert listed.returncode == 0 and listed.stdout.split() == ["11", "out/report.txt"]
    target = tmp_path / "fetched.txt"
    got = tinyci("artifacts", str(build["id"]), "--get", "out/report.txt", "-o", str(target),
                 "--dispatcher", c.disp.addr)
    assert got.returncode == 0, got.stderr
    assert target.read_text() == "the report\n"
    out = tinyci("artifacts", str(build["id"]), "--get", "out/report.txt", "--dispatcher", c.disp.addr)
    assert out.stdout == "the report\n"
    bad = tinyci("artifacts", str(build["id"]), "--get", "../../ci.db", "--dispatcher", c.disp.addr)
    assert bad.returncode == 1 and "must be relative" in bad.stderr


def test_skip_ci_is_recorded_as_skipped_and_a_trigger_builds_it_anyway(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    sha = repo.commit("docs only\n\nNothing to test here. [skip ci]")
    other = repo.commit("[CI SKIP] typo")
    builds = c.wait_builds(lambda b: len(of(b, other)) == 1 and finished(b), "the skipped commits")
    assert of(builds, sha)[0]["status"] == "skipped" and of(builds, sha)[0]["runner"] is None
    assert of(builds, other)[0]["status"] == "skipped"
    assert "skipped: the commit message says [skip ci]" in c.log(of(builds, sha)[0]["id"])
    assert tinyci("trigger", sha, "--dispatcher", c.disp.addr).returncode == 0
    builds = c.wait_builds(lambda b: len(of(b, sha)) == 2 and finished(b), "the triggered build")
    assert [b["status"] for b in of(builds, sha)] == ["skipped", "passed"]


def test_supersede_cancels_only_queued_builds_of_that_branch(cluster, repo, tmp_path):
    c = cluster(supersede=["feat*"])
    c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    repo.git("checkout", "-q", "-b", "feat")
    # the slow build runs until the others are queued behind it (however loaded the machine), at most 60 s
    gate = tmp_path / "gate"
    slow = repo.commit("slow feature", {"build.sh": f"for i in $(seq 1 1200); do [ -e {gate} ] && break; "
                                                    f"sleep 0.05; done; echo slow done\n"})
    c.wait_builds(lambda b: of(b, slow) and of(b, slow)[0]["status"] == "running", "the slow build to run")
    obs.stop()          # report the rest together, so they queue behind the slow one
    repo.git("checkout", "-q", "main")
    main1 = repo.commit("main one")
    main2 = repo.commit("main two")
    repo.git("checkout", "-q", "feat")
    feat1 = repo.commit("feat one", {"build.sh": "echo quick\n"})
    feat2 = repo.commit("feat two", {"build.sh": "echo quick\n"})
    c.observer(repo)
    c.wait_builds(lambda b: len(b) == 6, "the four commits to be queued")
    gate.touch()
    builds = c.wait_builds(lambda b: len(b) == 6 and finished(b), "every build to end", timeout=40)
    status = {sha: of(builds, sha)[0]["status"] for sha in (slow, main1, main2, feat1, feat2)}
    assert status == {slow: "passed", main1: "passed", main2: "passed", feat1: "cancelled", feat2: "passed"}
    assert "superseded by build" in c.log(of(builds, feat1)[0]["id"])


def test_log_over_the_cap_keeps_head_and_tail(cluster, repo):
    c = cluster(max_log_bytes=16384)
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("chatty", {"build.sh": "for i in $(seq 1 20000); do echo \"output line $i\"; done\n"})
    c.observer(repo)
    build = of(c.wait_builds(lambda b: finished(of(b, sha)), "the chatty build"), sha)[0]
    assert build["status"] == "passed"
    log = c.log(build["id"])
    assert "output line 1\n" in log and "output line 20000\n" in log and "output line 10000\n" not in log
    assert "bytes cut here" in log and "dispatcher.max_log_bytes" in log
    assert log.rstrip().endswith("===") and "passed (exit 0)" in log
    assert len(log.encode()) < 16384 + 1000


def test_notify_runs_with_the_build_in_its_environment_on_pass_fail_and_cancel(cluster, repo, tmp_path):
    c = cluster()
    out = tmp_path / "notified"
    out.mkdir()
    config = yaml.safe_load(c.config.read_text())
    config["notify"] = {"on_finish": [f"env | grep ^TINYCI_ | sort > {out}/$TINYCI_BUILD.env",
                                      "exit 7", "sleep 60"], "timeout": 2}
    c.config.write_text(yaml.safe_dump(config))
    c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo)
    first = c.wait_builds(finished, "the initial commit")[0]
    obs.stop()
    bad = repo.commit("fail", {"build.sh": "exit 3\n"})
    slow = repo.commit("slow", {"build.sh": "sleep 30\n"})
    c.observer(repo)
    running = c.wait_builds(lambda b: of(b, slow) and of(b, slow)[0]["status"] == "running", "the slow build")
    assert tinyci("cancel", str(of(running, slow)[0]["id"]), "--dispatcher", c.disp.addr).returncode == 0

    def env_of(build_id):
        path = out / f"{build_id}.env"
        return dict(line.split("=", 1) for line in path.read_text().splitlines()) if path.exists() else None

    for sha, status in ((first["sha"], "passed"), (bad, "failed"), (slow, "cancelled")):
        build = of(c.builds(), sha)[0]
        env = c.wait(f"the notification of build {build['id']}", lambda: env_of(build["id"]))
        assert env == {"TINYCI_BUILD": str(build["id"]), "TINYCI_STATUS": status, "TINYCI_SHA": sha,
                       "TINYCI_BRANCH": "main", "TINYCI_JOB": "",
                       "TINYCI_LOG": str(tmp_path / "dispatcher" / "logs" / f"{build['id']}.log")}
    # a failing and a hanging command are logged and change nothing
    log = c.wait("the failures to be logged",
                 lambda: (lambda t: t if "exited 7" in t and "killed after 2s" in t else None)(c.disp.log()))
    assert "Traceback" not in log
    assert [b["status"] for b in c.builds()] == ["cancelled", "failed", "passed"]


BIG = """\
artifacts: [out.bin]
steps:
  - python3 gen.py
  - python3 -c "import os; open('out.bin', 'wb').write(bytes(range(256)) * 40000 + os.urandom(777))"
  - sha256sum out.bin
"""
GEN = """\
import sys
out = sys.stdout.buffer
for i in range(60000):      # ~6 MiB, with characters of two, three and four bytes
    out.write(f"{i:06d} é€😀 the same line again and again, to make a log of several MiB\\n".encode())
"""


def test_a_multi_mib_log_and_artifact_arrive_whole(cluster, repo, tmp_path):
    """Bulk frames end to end: a ~6 MiB log and a ~10 MiB artifact, compared by SHA-256
    with what the step wrote, as stored and as `tinyci log` and `tinyci artifacts --get` give them."""
    import hashlib
    import re
    c = cluster(max_log_bytes=64 << 20, max_artifact_bytes=64 << 20)
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("big", {".ci.yaml": BIG, "gen.py": GEN})
    c.observer(repo)
    build = of(c.wait_builds(lambda b: finished(of(b, sha)), "the build", timeout=120), sha)[0]
    log = (tmp_path / "dispatcher" / "logs" / f"{build['id']}.log").read_bytes()
    assert build["status"] == "passed", log[-3000:]
    want = "".join(f"{i:06d} é€😀 the same line again and again, to make a log of several MiB\n"
                   for i in range(60000)).encode()
    start = log.index(b"$ python3 gen.py\n") + len(b"$ python3 gen.py\n")
    assert hashlib.sha256(log[start:start + len(want)]).hexdigest() == hashlib.sha256(want).hexdigest()
    assert log[start + len(want):].startswith(b"[exit 0 after ")
    read = subprocess.run([sys.executable, "-m", "ci", "log", str(build["id"]), "--raw", "--dispatcher",
                           c.disp.addr], capture_output=True, cwd=TOOL_CWD, env=child_env(), timeout=60)
    assert read.returncode == 0 and read.stdout == log           # every byte, through bulk chunks
    artifact = bytes(range(256)) * 40000
    stored = tmp_path / "dispatcher" / "artifacts" / sha / str(build["id"]) / "out.bin"
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert stored.read_bytes()[:len(artifact)] == artifact and stored.stat().st_size == len(artifact) + 777
    assert re.search(rf"^{digest}  out.bin$", log.decode(), re.M), "the runner's file and the stored one differ"
    target = tmp_path / "fetched.bin"
    got = tinyci("artifacts", str(build["id"]), "--get", "out.bin", "-o", str(target), "--dispatcher", c.disp.addr)
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


def test_a_reader_that_stops_reading_holds_up_no_one_and_is_dropped_after_idle_timeout(cluster, repo):
    """The real dispatcher: a `read_artifact` whose reader takes nothing leaves
    every other request answered, and the stream is given up within
    ``net.idle_timeout`` (no thread or task kept for it), so the reader
    finds the connection closed before the artifact's end."""
    size = 48 << 20         # far more than the sockets' buffers hold
    c = cluster(extra={"net": {"idle_timeout": 3.0}}, max_artifact_bytes=4 * size)
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("big", {".ci.yaml": f"artifacts: [out.bin]\nsteps:\n  - head -c {size} /dev/zero > out.bin\n"})
    c.observer(repo)
    build = [b for b in c.wait_builds(lambda bs: finished([b for b in bs if b["sha"] == sha]), "the build",
                                      timeout=120) if b["sha"] == sha][0]
    assert build["status"] == "passed"
    stalled = blocking.BlockingLink(c.disp.addr, protocol.READER)
    try:
        stalled.send({"type": "read_artifact", "build": build["id"], "path": "out.bin"})
        for _ in range(3):      # meanwhile others are answered, a request each on a connection of its own
            listed = tinyci("artifacts", str(build["id"]), "--dispatcher", c.disp.addr, timeout=30)
            assert listed.returncode == 0 and "out.bin" in listed.stdout, listed.stderr
        here = stalled.sock.getsockname()[1]
        c.wait("the dispatcher to give up the stalled stream",
               lambda: side_of(c.disp.addr, here) not in ("01", "08"), 30)    # closed its end
        got = 0
        stalled.sock.settimeout(30)
        with pytest.raises(ConnectionError):
            while True:
                part = stalled.sock.recv(1 << 20)
                if not part:
                    raise ConnectionError("closed")
                got += len(part)
        assert 0 < got < size
    finally:
        stalled.close()


def side_of(server: str, client_port: int) -> str | None:
    """The state (/proc/net/tcp, hex: 01 established, 08 close-wait) of the
    server's end of the connection from our ``client_port``; None once gone."""
    port = int(server.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            return fields[3]
    return None
