"""latency-push and latency-poll: how long from `git commit` returning until
the build is `running` (the dispatcher handed it to a runner: its
``started_at``) and until its result is recorded (``finished_at``), for one
trivial step (`true`) and one idle runner. Times are the dispatcher's own
wall-clock stamps against the bench's, on the same machine."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from .harness import FINAL, GIT_ENV, Reader, Repo, cluster, Result, median, pct, wait_for


def _built(reader: Reader, sha: str):
    def check():
        for b in reader.status(10)["builds"]:
            if b["sha"] == sha and b["status"] in FINAL:
                return b
        return None
    return check


def _idle(reader: Reader) -> bool:
    runners = reader.status(1)["runners"]
    return bool(runners) and all(r["state"] == "idle" for r in runners)


def _bare_env(home: Path) -> dict:
    """A committing shell without tinyci on PATH and without PYTHONPATH."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), **GIT_ENV}


def latency_push(tmp: Path, quick: bool) -> Result:
    trials = 3 if quick else 20
    res = Result("latency-push")
    with cluster(tmp, ["true"]) as c:
        c.dispatcher()
        c.runner("r1")
        repo = Repo(tmp / "repo")
        repo.commit("initial")
        obs = c.observer(repo, interval=300)          # polling out of the way: only the hook's poke counts
        reader = Reader(c.disp.addr)
        try:
            wait_for("the initial build", _built(reader, repo.git("rev-parse", "HEAD")), 30)
            # the hook's own cost: the same commits in a twin repository without hooks
            plain = Repo(tmp / "plain")
            plain.commit("initial")
            bare = _bare_env(tmp)
            without = []
            for i in range(trials):
                _, before, after = plain.timed_commit(f"plain {i}", env=bare)
                without.append(after - before)
            done = subprocess.run([sys.executable, "-m", "ci", "install-hook", "--repo", str(repo.path),
                                   "--observer", obs.addr], capture_output=True, text=True, env=c.env, timeout=60)
            if done.returncode:
                raise RuntimeError(f"install-hook failed: {done.stderr}")
            running, recorded, with_hook, from_start = [], [], [], []
            for i in range(trials):
                wait_for("r1 to be idle again", lambda: _idle(reader), 15, every=0.02)
                sha, before, after = repo.timed_commit(f"trial {i}", env=bare)
                build = wait_for(f"trial {i} to be built", _built(reader, sha), 15, every=0.02)
                with_hook.append(after - before)
                running.append(build["started_at"] - after)
                recorded.append(build["finished_at"] - after)
                from_start.append(build["started_at"] - before)
        finally:
            reader.close()
    ms = lambda xs: [x * 1000 for x in xs]
    res.add("commit -> running p50", median(ms(running)), "ms", "< 50",
            note="negative: running before git commit returned")
    res.add("git commit started -> running p50", median(ms(from_start)), "ms")
    res.add("commit -> running p95", pct(ms(running), 95), "ms")
    res.add("commit -> result p50", median(ms(recorded)), "ms")
    res.add("commit -> result p95", pct(ms(recorded), 95), "ms")
    cost = [w - p for w, p in zip(sorted(ms(with_hook)), sorted(ms(without)))]
    res.add("hook cost (git commit slower by) p50", median(ms(with_hook)) - median(ms(without)), "ms", "< 100")
    res.add("hook cost p95", pct(cost, 95), "ms")
    res.add("git commit without hook p50", median(ms(without)), "ms")
    res.data = {"trials": trials, "running_ms": ms(running), "result_ms": ms(recorded),
                "commit_with_hook_ms": ms(with_hook), "commit_without_hook_ms": ms(without)}
    return res


def latency_poll(tmp: Path, quick: bool) -> Result:
    trials = 3 if quick else 20
    interval = 1.0
    res = Result("latency-poll")
    scans = tmp / "scans.txt"
    with cluster(tmp, ["true"]) as c:
        c.env["BENCH_SCAN_LOG"] = str(scans)
        c.dispatcher()
        c.runner("r1")
        repo = Repo(tmp / "repo")
        repo.commit("initial")
        c.observer(repo, interval=interval, module="bench.observer_probe")
        reader = Reader(c.disp.addr)
        try:
            wait_for("the initial build", _built(reader, repo.git("rev-parse", "HEAD")), 30)
            waits, overheads, running, recorded = [], [], [], []
            for i in range(trials):
                time.sleep(random.uniform(0, interval))     # commit at a random phase of the poll
                sha, before, after = repo.timed_commit(f"trial {i}")
                build = wait_for(f"trial {i} to be built", _built(reader, sha), 15, every=0.02)
                starts = [float(x) for x in scans.read_text().split()]
                # the scan that reported it: the last one to start before the dispatcher stored it
                scan = max(s for s in starts if s <= build["created_at"])
                waits.append(scan - after)
                overheads.append(build["started_at"] - scan)
                running.append(build["started_at"] - after)
                recorded.append(build["finished_at"] - after)
        finally:
            reader.close()
    ms = lambda xs: [x * 1000 for x in xs]
    res.add("overhead beyond the poll wait p50", median(ms(overheads)), "ms", "< 30",
            note="scan start -> running")
    res.add("overhead beyond the poll wait p95", pct(ms(overheads), 95), "ms")
    res.add("wait for the next poll p50", median(ms(waits)), "ms", note=f"interval {interval:g} s")
    res.add("commit -> running p50", median(ms(running)), "ms")
    res.add("commit -> running p95", pct(ms(running), 95), "ms")
    res.add("commit -> result p50", median(ms(recorded)), "ms")
    res.data = {"trials": trials, "interval": interval, "overhead_ms": ms(overheads), "poll_wait_ms": ms(waits),
                "running_ms": ms(running), "result_ms": ms(recorded)}
    return res
