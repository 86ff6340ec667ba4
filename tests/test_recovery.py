"""Leases and crash recovery with real processes: nothing acknowledged is lost,
nothing is run twice for nothing. Figures (seconds) are printed, not asserted:
the benchmarks own speed."""

import json
import subprocess
import sys
import time
import uuid

import pytest

from conftest import Daemon, by_sha, child_env, finished, free_port, wait_until

pytestmark = pytest.mark.slow
SLOW = "echo start; sleep {s}; echo finished\n"


def start_slow_build(c, repo, seconds=3):
    sha = repo.commit("slow", {"build.sh": SLOW.format(s=seconds)})
    c.wait_builds(lambda b: by_sha(b).get(sha, {}).get("status") == "running", "the slow build to start")
    # wait until the step itself runs, so a kill lands mid-build
    c.wait("the step to start", lambda: "start" in c.log(by_sha(c.builds())[sha]["id"]))
    return sha


def test_dispatcher_sigkill_mid_build_keeps_the_build_with_its_runner(cluster, repo, tmp_path):
    c = cluster()
    disp = c.dispatcher(port=free_port())
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    sha = start_slow_build(c, repo, seconds=3)
    disp.kill()
    disp.start()            # same port and data dir: runners and observer find it again
    print(f"\ndispatcher serving again {disp.ready_after:.2f}s after start (SIGKILL with 1 build running)")
    c.runner("r2")          # a free runner the build must NOT be moved to
    builds = c.wait_builds(lambda b: by_sha(b)[sha]["status"] not in ("queued", "running"),
                           "the build to finish", timeout=30)
    build = by_sha(builds)[sha]
    # the runner's pong confirmed it still ran the build; its result came from the outbox
    assert (build["status"], build["attempt"], build["runner"]) == ("passed", 1, "r1")
    assert "finished" in c.log(build["id"])


def test_runner_restarted_mid_build_has_its_build_taken_back_at_once(cluster, repo):
    c = cluster(heartbeat_interval=5.0)       # a slow heartbeat: only re-registration can explain speed
    c.dispatcher()
    r1 = c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    sha = start_slow_build(c, repo, seconds=1)
    r1.kill()
    killed = time.monotonic()
    r1.start()
    c.wait_builds(lambda b: by_sha(b)[sha]["attempt"] == 2, "attempt 2", timeout=10)
    print(f"\nrestarted runner's build taken back {time.monotonic() - killed:.2f}s after the kill")
    builds = c.wait_builds(lambda b: by_sha(b)[sha]["status"] == "passed", "attempt 2 to pass")
    assert by_sha(builds)[sha]["runner"] == "r1"
    assert "runner r1 is not running it" in c.log(by_sha(builds)[sha]["id"])


def test_runner_killed_requeue_time_and_error_after_max_attempts(cluster, repo):
    c = cluster(max_attempts=1)
    c.dispatcher()
    r1 = c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    sha = start_slow_build(c, repo, seconds=30)
    r1.kill()
    killed = time.monotonic()
    builds = c.wait_builds(lambda b: by_sha(b)[sha]["status"] == "error", "the build to give up", timeout=15)
    print(f"\nrunner SIGKILL noticed and build settled {time.monotonic() - killed:.2f}s after the kill")
    build = by_sha(builds)[sha]
    assert build["attempt"] == 1
    assert "runner lost" in c.log(build["id"])
    assert c.runner_state("r1") == "dead"


# ---------------------------------------------------------------- partition

class Link:
    """Two network namespaces joined by a veth pair; removed again by ``close``.
    Needs root and iproute2's ``ip``: without them the partition test fails
    saying so (it is not skipped)."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"tci{tag}a", f"tci{tag}b"
        self.va, self.vb = f"tv{tag}a", f"tv{tag}b"
        self.addr_a, self.addr_b = "10.231.77.1", "10.231.77.2"
        self.made: list[str] = []
        try:
            self._wire()
        except BaseException:       # half made: leave nothing behind on the host
            self.close()
            raise

    def _wire(self) -> None:
        for ns in (self.a, self.b):
            self.ip("netns", "add", ns)
            self.made.append(ns)
        self.ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        self.ip("link", "set", self.va, "netns", self.a)
        self.ip("link", "set", self.vb, "netns", self.b)
        for ns, dev, addr in ((self.a, self.va, self.addr_a), (self.b, self.vb, self.addr_b)):
            self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self.ip("-n", ns, "link", "set", dev, "up")
            self.ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def ip(*args: str) -> None:
        try:
            out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        except FileNotFoundError:
            raise AssertionError("the partition test needs iproute2's ip command (and root)") from None
        if out.returncode:
            raise AssertionError(f"ip {' '.join(args)} (needs root): {out.stderr.strip()}")

    def cut(self) -> None:
        self.ip("-n", self.b, "link", "set", self.vb, "down")

    def mend(self) -> None:
        self.ip("-n", self.b, "link", "set", self.vb, "up")

    def close(self) -> None:
        for ns in self.made:        # deleting a namespace removes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        # a pair made but never moved into them is still on the host: fails quietly when gone
        subprocess.run(["ip", "link", "del", self.va], capture_output=True, timeout=10)


def test_partitioned_runner_is_replaced_and_its_late_result_refused_as_stale(tmp_path, repo):
    link = Link()
    daemons: list[Daemon] = []
    env = child_env(TINYCI_AUTH_SECRET="partition-test-secret")
    (tmp_path / "logs").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("build:\n  steps: ['sh build.sh']\n")

    def start(kind, name, ns, *args):
        d = Daemon(kind, ["--config", str(config), *args], tmp_path, tmp_path / "logs" / f"{name}.log", env,
                   prefix=("ip", "netns", "exec", ns))
        daemons.append(d)
        return d

    def tool(*args):
        """`tinyci <args>` from the dispatcher's side of the link."""
        out = subprocess.run(["ip", "netns", "exec", link.a, sys.executable, "-m", "ci", *args,
                              "--dispatcher", disp.addr], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def status():
        return json.loads(tool("status", "--json"))["builds"]

    def wait(what, predicate, timeout=40):
        return wait_until(predicate, timeout, what, every=0.2,
                          details=lambda: "\n".join(f"--- {d.log_path.name}\n{d.log()}" for d in daemons))

    try:
        disp = start("dispatcher", "dispatcher", link.a, "--host", link.addr_a, "--port", "0",
                     "--data", str(tmp_path / "d"))
        far = start("runner", "far", link.b, "--host", link.addr_b, "--port", "0", "--name", "far",
                    "--dispatcher", disp.addr, "--workdir", str(tmp_path / "far"))
        start("observer", "observer", link.a, "--repo", str(repo.path), "--dispatcher", disp.addr,
              "--state", str(tmp_path / "obs"), "--interval", "0.3", "--port", "0")
        wait("the initial commit", lambda: (lambda b: b if finished(b) else None)(status()))
        sha = repo.commit("slow", {"build.sh": "echo start; sleep 5; echo finished on $CI_ATTEMPT\n"})
        build = wait("the build to start on the far runner", lambda: next(
            (b for b in status() if b["sha"] == sha and b["status"] == "running" and b["runner"] == "far"), None))
        wait("the step to be under way", lambda: "\nstart\n" in tool("log", str(build["id"])))
        link.cut()
        cut = time.monotonic()
        start("runner", "near", link.a, "--host", "127.0.0.1", "--port", "0", "--name", "near",
              "--dispatcher", disp.addr, "--workdir", str(tmp_path / "near"))
        moved = wait("the build to move to the near runner",
                     lambda: next((b for b in status() if b["sha"] == sha and b["runner"] == "near"), None))
        print(f"\npartitioned build reassigned {time.monotonic() - cut:.2f}s after the cut")
        assert moved["attempt"] == 2
        wait("attempt 2 to pass", lambda: any(b["sha"] == sha and b["status"] == "passed" for b in status()))
        link.mend()
        wait("the far runner's late result to be refused as stale",
             lambda: "stale" in far.log(), timeout=40)
        final = next(b for b in status() if b["sha"] == sha)
        assert (final["status"], final["attempt"], final["runner"]) == ("passed", 2, "near")
        log = tool("log", str(final["id"]))
        assert "finished on 2" in log and "finished on 1" not in log
    finally:
        for d in daemons:
            if d.alive():
                d.kill()
        link.close()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link.a not in leftover and link.b not in leftover
