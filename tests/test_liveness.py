"""Liveness that survives real machines, and runner maintenance, with real
daemons: a dispatcher paused by SIGSTOP, a dispatcher whose wall clock is
stepped forward and back (tests/clockshift.py), a dispatcher restarted while
its runner restarts too, `tinyci drain` / `resume` / `forget`, dead runners
leaving `status`, and the runners' default names.

Builds wait on a gate file the test creates, so a build lasts exactly as long
as the test needs it to. Figures (seconds) are printed, not asserted, except
the bound on finding a frozen runner."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ci.workdir import host_stem
from conftest import by_sha, finished, free_port, tinyci, wait_until

pytestmark = pytest.mark.slow

INTERVAL, MISSES = 0.5, 3
DEADLINE = INTERVAL * MISSES
# a build that runs until the test creates its gate file (bounded: a minute)
GATED = "echo start; i=0; while [ ! -e '{gate}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; echo finished\n"


def start_gated(c, repo, gate) -> tuple[str, dict]:
    """Commit a build that waits for ``gate``; return its sha and build once its step runs."""
    sha = repo.commit("gated", {"build.sh": GATED.format(gate=gate)})
    build = c.wait_builds(lambda b: by_sha(b).get(sha, {}).get("status") == "running", "the gated build to start")
    build = by_sha(build)[sha]
    c.wait("its step to start", lambda: "\nstart\n" in c.log(build["id"]))
    return sha, build


def ended(c, sha: str) -> dict:
    builds = c.wait_builds(lambda b: by_sha(b)[sha]["status"] not in ("queued", "running"), "the build to end")
    return by_sha(builds)[sha]


def text(daemon) -> str:
    """A daemon's whole log (Daemon.log is only its end)."""
    return daemon.log_path.read_text(errors="replace")


def tool(c, *args: str):
    return tinyci(*args, "--dispatcher", c.disp.addr, "--config", str(c.config))


def runner_row(c, name: str) -> dict | None:
    return next((r for r in c.status()["runners"] if r["name"] == name), None)


# ---------------------------------------------------------------- the dispatcher's own pauses and clock

def test_a_paused_dispatcher_judges_runners_by_the_pings_it_sends_after_waking(cluster, repo, tmp_path):
    c = cluster(heartbeat_interval=INTERVAL, heartbeat_misses=MISSES)
    disp = c.dispatcher()
    r1 = c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    gate = tmp_path / "gate"
    sha, _ = start_gated(c, repo, gate)
    os.kill(disp.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # the runner says so after 5 intervals without a ping (2.5 s): longer than the deadline (1.5 s)
        wait_until(lambda: "no ping from the dispatcher" in text(r1), 30,
                   "the runner to notice the dispatcher's silence")
    finally:
        os.kill(disp.pid, signal.SIGCONT)
    paused = time.monotonic() - stopped
    print(f"\ndispatcher stopped for {paused:.2f}s mid-build (deadline {DEADLINE:g}s)")
    assert paused > DEADLINE
    gate.touch()
    build = ended(c, sha)
    assert (build["status"], build["attempt"], build["runner"]) == ("passed", 1, "r1")
    log = text(disp)
    assert "is dead" not in log and "taken back" not in log and "taken back" not in c.log(build["id"])
    assert c.runner_state("r1") == "idle"


def test_wall_clock_steps_kill_no_runner_spend_no_attempt_and_a_frozen_runner_is_still_found(
        cluster, repo, tmp_path):
    c = cluster(heartbeat_interval=INTERVAL, heartbeat_misses=MISSES)
    offset_file = tmp_path / "clock-offset"
    c.env["CLOCKSHIFT_FILE"] = str(offset_file)
    c.disp = disp = c.start("dispatcher", "dispatcher", ["--port", "0", "--data", str(tmp_path / "dispatcher")],
                            module="tests.clockshift")
    runners = {name: c.runner(name) for name in ("r1", "r2")}
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    gate = tmp_path / "gate"
    sha, build = start_gated(c, repo, gate)
    idle = next(name for name in runners if name != build["runner"])

    def step(offset: float) -> None:
        staged = offset_file.with_suffix(".new")
        staged.write_text(str(offset))
        os.replace(staged, offset_file)
        # every runner's last_seen, stamped by the dispatcher's wall clock at a pong, moves with it
        c.wait(f"the dispatcher's wall clock to read {offset:+g}s", lambda: all(
            abs(r["last_seen"] - time.time() - offset) < 10 for r in c.status()["runners"]))

    step(30)            # forward 30 s, as NTP after a suspend
    step(-3600)         # back an hour
    assert {r["name"]: r["state"] for r in c.status()["runners"]} == {build["runner"]: "busy", idle: "idle"}

    frozen = runners[idle]
    os.kill(frozen.pid, signal.SIGSTOP)
    froze = time.monotonic()
    try:
        c.wait(f"the frozen runner {idle} to be declared dead", lambda: c.runner_state(idle) == "dead",
               timeout=30)
        found = time.monotonic() - froze
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    print(f"\nrunner frozen with SIGSTOP declared dead after {found:.2f}s "
          f"(deadline {DEADLINE:g}s, wall clock an hour back)")
    assert found < DEADLINE + 2 * INTERVAL + 2.0, f"found only after {found:.2f}s"
    gate.touch()
    build = ended(c, sha)
    assert (build["status"], build["attempt"]) == ("passed", 1)
    deaths = [line for line in text(disp).splitlines() if "is dead" in line]
    assert len(deaths) == 1 and f"runner {idle} " in deaths[0], deaths


def test_a_dispatcher_restart_while_its_runner_restarts_costs_no_attempt(cluster, repo, tmp_path):
    # after a restart, runners known from before get interval x misses (6 s) to come back
    c = cluster(heartbeat_interval=1.0, heartbeat_misses=6)
    disp = c.dispatcher(port=free_port())
    r1 = c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    gate = tmp_path / "gate"
    sha, build = start_gated(c, repo, gate)
    disp.kill()
    gate.touch()
    # the build ends while the dispatcher is down: its result waits in the runner's outbox
    wait_until(lambda: f"build {build['id']} attempt 1 passed" in text(r1), 30, "the runner to finish the build")
    r1.stop()
    disp.start()
    wait_until(lambda: "does not answer yet" in text(disp), 30,
               "the restarted dispatcher to find r1 not back yet", details=c.logs)
    back = time.monotonic()
    r1.start()
    build = ended(c, sha)
    print(f"\nrunner back {r1.ready_after:.2f}s after it was started; build settled "
          f"{time.monotonic() - back:.2f}s after the restart began")
    assert (build["status"], build["attempt"], build["runner"]) == ("passed", 1, "r1")
    assert "is dead" not in text(disp) and "taken back" not in c.log(build["id"])


# ---------------------------------------------------------------- runner maintenance

def test_drain_lets_the_build_finish_hands_out_nothing_new_and_resume_takes_work_again(cluster, repo, tmp_path):
    c = cluster(heartbeat_interval=INTERVAL)
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(finished, "the initial commit")
    gate = tmp_path / "gate"
    sha, build = start_gated(c, repo, gate)

    out = tool(c, "drain", "r1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"runner r1 draining: it finishes #{build['id']} and takes nothing new\n"
    assert c.runner_state("r1") == "draining"
    later = repo.commit("while draining", {"build.sh": "echo later\n"})
    waiting = c.wait_builds(lambda b: later in by_sha(b), "the commit made while draining to be queued")
    assert by_sha(waiting)[later]["waiting"] == "runner r1 draining"

    gate.touch()
    done = ended(c, sha)
    assert (done["status"], done["attempt"]) == ("passed", 1)
    # a pong after the build ended (one would hand a waiting build out) changes nothing
    c.wait("a pong after the build ended", lambda: runner_row(c, "r1")["last_seen"] > done["finished_at"])
    assert c.runner_state("r1") == "drained"
    queued = by_sha(c.builds())[later]
    assert (queued["status"], queued["waiting"]) == ("queued", "runner r1 drained")
    table = tool(c, "status")
    assert "drained" in table.stdout, table.stdout

    out = tool(c, "resume", "r1")
    assert (out.returncode, out.stdout) == (0, "runner r1 busy\n"), out.stderr
    build = ended(c, later)
    assert (build["status"], build["runner"], build["attempt"]) == ("passed", "r1", 1)
    assert c.runner_state("r1") == "idle"
    missing = tool(c, "drain", "nobody")
    assert (missing.returncode, missing.stderr) == (1, "tinyci: no runner named 'nobody'\n")


def test_forget_removes_a_dead_runner_refuses_a_live_one_and_the_long_dead_leave_status(cluster):
    # long enough for the three tools below on a loaded machine (each a Python start-up)
    c = cluster(heartbeat_interval=INTERVAL, forget_dead_after=8)
    disp = c.dispatcher(port=free_port())
    r1, r2 = c.runner("r1"), c.runner("r2")
    c.wait("both runners to register", lambda: {r["name"] for r in c.status()["runners"]} == {"r1", "r2"})

    alive = tool(c, "forget", "r1")
    assert alive.returncode == 1 and "runner r1 is alive (idle): only a dead runner" in alive.stderr, alive.stderr
    r1.kill()
    r2.kill()
    c.wait("both runners to be dead", lambda: [r["state"] for r in c.status()["runners"]] == ["dead", "dead"])
    dead = time.monotonic()
    out = tool(c, "drain", "r2")
    assert out.stdout == "runner r2 is dead; it stays drained when it comes back\n", out.stderr
    out = tool(c, "forget", "r1")
    assert (out.returncode, out.stdout) == (0, "runner r1 forgotten\n"), out.stderr
    assert [r["name"] for r in c.status()["runners"]] == ["r2"]       # r2 stays, dead, for a while
    c.wait("r2 to leave status after forget_dead_after", lambda: c.status()["runners"] == [], timeout=30)
    print(f"\ndead runner left status {time.monotonic() - dead:.2f}s after it was seen dead "
          f"(forget_dead_after 8s)")
    assert "forgetting runner r2: dead for 8s" in text(disp)
    # forgotten for good: not back after a restart, and a forgotten name may register again
    disp.kill()
    disp.start()
    assert c.status()["runners"] == []
    r1.start()
    c.wait("r1 to register again", lambda: c.runner_state("r1") == "idle")


def test_runners_without_a_name_are_host_and_number_and_keep_it_across_restarts(cluster):
    c = cluster()
    c.dispatcher()

    def nameless(tag: str):
        return c.start("runner", tag, ["--port", "0", "--dispatcher", c.disp.addr])     # no --name, no --workdir

    first, second = nameless("first"), nameless("second")
    stem = host_stem()
    names = [d.ready_line.partition(" as ")[2] for d in (first, second)]
    assert names == [f"{stem}-1", f"{stem}-2"]
    first.stop()
    first.start()               # the lowest free number again: its own name and workdir back
    assert first.ready_line.endswith(f" as {stem}-1")
    assert (c.tmp / ".tinyci" / "runners" / f"{stem}-1" / ".lock").exists()
    c.wait("both to be registered under those names", lambda: sorted(
        r["name"] for r in c.status()["runners"] if r["state"] == "idle") == names)
