"""The dispatcher's disk fills up, for real: its data dir is a small tmpfs
mounted for it alone (``unshare -m`` as root, ``unshare -rm`` otherwise: the
mount lives in the dispatcher's own mount namespace and goes with it), which
the test reaches through /proc/<pid>/root to fill and free. Real runners,
observer and git repository. And a running build's log file deleted by hand."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import Cluster, Daemon, Repo, by_sha, finished, tinyci

pytestmark = pytest.mark.slow

BIG = "yes 'a line of output that fills the disk' | head -c 6000000; echo; echo done\n"
WITH_ARTIFACT = "artifacts: [report.txt]\nsteps:\n  - echo a report > report.txt\n  - sh build.sh\n"


def small_disk_dispatcher(c: Cluster, size: str) -> tuple[Daemon, Path]:
    """A dispatcher whose data dir is a tmpfs of ``size``; returns it and the
    data dir as the test reaches it (through the dispatcher's root)."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests need unshare(1) (util-linux) to mount a small disk for the dispatcher")
    data = c.tmp / "dispatcher"
    data.mkdir()
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    prefix = (*unshare, "sh", "-c", 'mount -t tmpfs -o size="$0" tmpfs "$1" && shift && exec "$@"',
              size, str(data))
    d = Daemon("dispatcher", ["--config", str(c.config), "--port", "0", "--data", str(data)], c.tmp,
               c.tmp / "logs" / "dispatcher.log", c.env, prefix=prefix)
    c.daemons.append(d)
    c.disp = d
    seen = Path(f"/proc/{d.pid}/root") / data.relative_to("/")
    assert os.statvfs(seen).f_blocks * os.statvfs(seen).f_frsize <= 16 << 20, "the data dir is not the small disk"
    return d, seen


def fill(path: Path, leave: int = 0) -> int:
    """Write ``path`` until the disk has at most ``leave`` bytes free (or none); returns its size."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            room = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize - leave
            if room <= 0:
                return written
            try:
                written += f.write(b"\0" * min(room, 64 * 1024))
            except OSError:
                return written


def no_traceback(*daemons: Daemon) -> None:
    for d in daemons:
        assert "Traceback" not in d.log(10**7), f"{d.kind} logged a traceback:\n{d.log()}"


def test_a_full_disk_cuts_a_log_and_loses_no_commit_and_no_slot(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("a build that prints 6 MB", {"build.sh": BIG})
    with Cluster(tmp_path, dispatcher_keys={"min_free_bytes": 2_000_000}) as c:
        d, data = small_disk_dispatcher(c, "6m")
        ballast = data / "ballast"
        ballast.write_bytes(b"\0" * 1_000_000)          # what the operator will delete to make room
        runner = c.runner("r1")
        c.wait("the runner", lambda: c.runner_state("r1") == "idle")
        observer = c.observer(repo)
        big = c.wait_builds(lambda b: finished(b), "the big build", timeout=60)[0]
        assert big["status"] == "passed" and big["attempt"] == 1
        log = c.log(big["id"])
        assert "[log cut: the dispatcher's disk is full]" in log and "bytes of output were not stored" in log
        assert log.index("a line of output") < log.index("[log cut") < log.index("=== passed")
        status = tinyci("status", "--dispatcher", d.addr, "--config", str(c.config))
        assert re.search(r"dispatcher: disk full \(\d\.\d MB free\)", status.stdout), status.stdout

        # three commits while it is full: each taken, built once; the runner's slot was freed
        shas = [repo.commit(f"small change {n}", {"build.sh": f"echo small {n}\n", ".ci.yaml": WITH_ARTIFACT})
                for n in range(3)]
        for sha in shas:
            c.wait(f"{sha[:7]} reported", lambda: sha in by_sha(c.builds()), timeout=30)
        builds = c.wait_builds(lambda b: len(b) == 4 and finished(b), "the three builds", timeout=60)
        for sha in shas:
            build = [b for b in builds if b["sha"] == sha]
            assert [(b["status"], b["attempt"]) for b in build] == [("passed", 1)], builds
            # its artifact did not fit: left out, and its log says so
            assert "[artifact report.txt left out: the dispatcher's disk is full]" in c.log(build[0]["id"])
            assert c.request({"type": "artifacts", "build": build[0]["id"]})["artifacts"] == []

        # room again: the condition clears by itself, and builds keep their whole logs
        ballast.unlink()
        c.wait("the disk_full condition to clear", lambda: c.status().get("conditions") == [], timeout=10)
        sha = repo.commit("after the room came back", {"build.sh": "echo whole log\n"})
        done = c.wait_builds(lambda b: finished(b) and sha in by_sha(b), "the last build", timeout=60)
        last = by_sha(done)[sha]
        assert last["status"] == "passed" and "whole log" in c.log(last["id"]) and "[log cut" not in c.log(last["id"])

        assert d.alive() and runner.alive() and observer.alive()
        no_traceback(d, runner, observer)
        lines = d.log(10**7)
        assert 1 <= lines.count("[disk_full]") <= 3, lines        # one line when it began, not one per frame
        assert "disk_full cleared after" in lines


def test_a_database_that_finds_the_disk_full_refuses_the_commit_until_there_is_room(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.commit("first", {"build.sh": "echo first\n"})
    with Cluster(tmp_path, dispatcher_keys={"min_free_bytes": 0}) as c:
        d, data = small_disk_dispatcher(c, "2m")
        runner = c.runner("r1")
        observer = c.observer(repo)
        c.wait_builds(lambda b: len(b) == 1 and finished(b), "the first build")
        ballast = data / "ballast"
        fill(ballast)                                        # nothing left: SQLite itself finds it full
        sha = repo.commit("while the disk is full", {"build.sh": "echo second\n"})
        c.wait("the observer to be refused", lambda: "disk_full" in observer.log(), timeout=30)
        assert sha not in by_sha(c.builds())
        assert [x["name"] for x in c.status()["conditions"]] == ["disk_full"]
        ballast.unlink()
        builds = c.wait_builds(lambda b: sha in by_sha(b) and finished(b), "the commit, once there is room",
                               timeout=60)
        assert [(b["status"], b["attempt"]) for b in builds if b["sha"] == sha] == [("passed", 1)]
        assert d.alive()
        no_traceback(d, runner, observer)


def test_a_running_builds_log_file_deleted_by_hand(cluster, repo, tmp_path):
    steps = ["for i in $(seq 1 30); do echo line $i; sleep 0.1; done"]
    c = cluster(steps)
    d = c.dispatcher()
    runner = c.runner("r1")
    c.observer(repo)
    c.wait("the build to log", lambda: c.builds() and "line 5" in c.log(c.builds()[0]["id"]))
    build = c.builds()[0]
    (tmp_path / "dispatcher" / "logs" / f"{build['id']}.log").unlink()
    done = c.wait_builds(finished, "the build to end", timeout=30)[0]
    assert (done["status"], done["attempt"]) == ("passed", 1)
    log = c.log(build["id"])
    assert log.startswith("[log file was removed; continuing]\n"), log
    assert "line 30\n" in log and "=== passed" in log
    assert "line 1\n" not in log                                 # gone with the file, not sent again
    no_traceback(d, runner)
    assert d.log().count("removed or cut short") == 1
