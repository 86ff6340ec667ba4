"""throughput and overhead: many commits made at once (git fast-import, then
one poke, as the hook would) through the real observer, dispatcher and N
runners.

Where the time of one build goes is measured two ways. From the build
records and logs: the runner's own execution time (checkout and steps, the
``in X s`` of the log's last line) and the rest of the dispatcher's
started -> finished span (the ``run`` and ``result`` messages, the log frames,
SQLite writes). And each ingredient in isolation, on this machine: the git
commands a checkout runs, starting a `true` step through a shell, one
request/reply over loopback, one SQLite build write.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

from ci import net, protocol

from .harness import FINAL, Reader, Repo, cluster, Result, median, pct, request, wait_for

DURATION = re.compile(r"=== passed \(exit 0\) in ([0-9.]+)s on ")


def _run_batch(tmp: Path, runners: int, commits: int, steps: list[str]) -> dict:
    """Commit ``commits`` at once and wait for all builds; returns the builds and times."""
    with cluster(tmp, steps) as c:
        c.dispatcher()
        for i in range(runners):
            c.runner(f"r{i + 1}")
        repo = Repo(tmp / "repo")
        repo.commit("initial")
        obs = c.observer(repo, interval=1.0)
        reader = Reader(c.disp.addr)
        try:
            wait_for("the initial build", lambda: any(b["status"] in FINAL for b in reader.status(5)["builds"]), 60)
            wait_for(f"{runners} idle runners", lambda: (lambda rs: len(rs) == runners and all(
                r["state"] == "idle" for r in rs))(reader.status(1)["runners"]), 30)
            shas = repo.many(commits)
            made = time.time()
            request(obs.addr, {"type": "poke"}, protocol.OBSERVER, to=protocol.OBSERVER_ID)
            want = set(shas)

            def all_done():
                builds = [b for b in reader.status(commits + 10)["builds"] if b["sha"] in want]
                return builds if len(builds) == commits and all(b["status"] in FINAL for b in builds) else None
            builds = wait_for(f"{commits} builds", all_done, 60 + commits * 2, every=0.25)
            logs = {}
            for b in builds[: min(len(builds), 60)]:
                m = DURATION.search(c.log(b["id"]))
                if m:
                    logs[b["id"]] = float(m.group(1))
        finally:
            reader.close()
        return {"builds": builds, "made": made, "runner_exec": logs, "repo": repo, "tmp": tmp}


def throughput(tmp: Path, quick: bool) -> Result:
    commits = 20 if quick else 200
    res = Result("throughput")
    res.data = {"commits": commits, "step": "true", "runs": {}}
    last = None
    for n in ((1, 4) if quick else (1, 2, 4)):
        run = _run_batch(tmp / f"runners-{n}", n, commits, ["true"])
        builds = run["builds"]
        end = max(b["finished_at"] for b in builds)
        first = min(b["created_at"] for b in builds)
        rate = commits / (end - run["made"])
        span = [b["finished_at"] - b["started_at"] for b in builds]
        execs = list(run["runner_exec"].values())
        passed = sum(b["status"] == "passed" for b in builds)
        res.add(f"{n} runner(s): builds/s end to end", rate, "builds/s", ">= 25" if n == 4 else "",
                note=f"{passed}/{commits} passed")
        res.add(f"{n} runner(s): per build, started -> finished p50", median(span) * 1000, "ms")
        res.add(f"{n} runner(s): per build, started -> finished p95", pct(span, 95) * 1000, "ms")
        res.data["runs"][n] = {
            "builds_per_s": rate, "seconds": end - run["made"],
            "observer_reported_all_after_s": max(b["created_at"] for b in builds) - run["made"],
            "first_stored_after_s": first - run["made"],
            "span_ms": [round(x * 1000, 2) for x in span],
            "runner_exec_ms": [round(x * 1000, 2) for x in execs],
            "passed": passed}
        last = run
    res.add("runner execution (checkout + step) p50", median(execs) * 1000, "ms",
            note="from the build log, 4 runners")
    res.add("dispatcher <-> runner messages, SQLite, log sync p50",
            (median(span) - median(execs)) * 1000, "ms", note="started->finished minus execution")
    parts = breakdown(last["tmp"], last["repo"], quick)
    for name, value in parts.items():
        res.add(f"in isolation: {name}", value, "ms")
    res.data["isolated_ms"] = parts
    return res


def breakdown(tmp: Path, repo: Repo, quick: bool) -> dict:
    """Each ingredient of a build alone, median ms over repeated runs."""
    reps = 5 if quick else 20
    out = {}
    clone = tmp / "runners" / "r1" / "checkouts" / "0"
    sha = repo.git("rev-parse", "HEAD")
    env = {"GIT_DIR": str(clone / ".git"), "GIT_WORK_TREE": str(clone), "GIT_TERMINAL_PROMPT": "0",
           "PATH": "/usr/bin:/bin"}
    seq = [["rev-parse", "--git-dir"], ["config", "--get", "remote.origin.url"],
           ["fetch", "--force", "--prune", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"],
           ["cat-file", "-e", f"{sha}^{{commit}}"], ["checkout", "--force", "--detach", sha], ["clean", "-ffdx"]]
    per_cmd = {a[0]: [] for a in seq}
    totals = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for args in seq:
            t = time.perf_counter()
            # check: a failing command must not be timed as if it were the checkout
            subprocess.run(["git", *args], cwd=clone, env=env, capture_output=True, timeout=60, check=True)
            per_cmd[args[0]].append(time.perf_counter() - t)
        totals.append(time.perf_counter() - t0)
    out["checkout: 6 git commands"] = median(totals) * 1000
    out["checkout: git fetch alone"] = median(per_cmd["fetch"]) * 1000

    async def shell_true() -> float:
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_shell("true", stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        await proc.communicate()
        return time.perf_counter() - t
    out["process start: `true` through a shell"] = median([asyncio.run(shell_true()) for _ in range(reps)]) * 1000

    async def rtt() -> list[float]:
        server = await net.serve(lambda conn, msg: _ok(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = net.Client("127.0.0.1", port, protocol.READER)
        times = []
        for _ in range(reps * 10):
            t = time.perf_counter()
            await client.request({"type": "status"})
            times.append(time.perf_counter() - t)
        await client.close()
        server.close()
        return times
    out["messages: one request/reply on a kept connection"] = median(asyncio.run(rtt())) * 1000

    from ci.store import Store
    store = Store(tmp / "sqlite-probe")
    times = []
    for i in range(reps * 5):
        t = time.perf_counter()
        build, _ = store.add_build(repo="r", branch="main", sha=f"{i:040x}", now=time.time())
        with store.transaction():
            store.save([build])
        times.append(time.perf_counter() - t)
    store.close()
    out["SQLite: insert a build + one save transaction"] = median(times) * 1000
    return out


async def _ok() -> dict:
    return {"type": "ok", "runners": [], "builds": [], "pipelines": [], "queue": []}     # a status reply


def overhead(tmp: Path, quick: bool) -> Result:
    commits, sleep, runners, trials = (8, 0.5, 4, 1) if quick else (20, 1.0, 4, 3)
    ideal = commits * sleep / runners
    res = Result("overhead")
    walls, spans = [], []
    for t in range(trials):
        run = _run_batch(tmp / f"trial-{t}", runners, commits, [f"sleep {sleep:g}"])
        builds = run["builds"]
        end = max(b["finished_at"] for b in builds)
        walls.append(end - run["made"])
        spans.append(end - min(b["started_at"] for b in builds))
    res.add("wall time p50 (commits made -> last result)", median(walls), "s", note=f"ideal {ideal:g} s")
    res.add("over ideal p50", (median(walls) / ideal - 1) * 100, "%", "< 10")
    res.add("over ideal, first start -> last result p50", (median(spans) / ideal - 1) * 100, "%")
    res.data = {"commits": commits, "step_seconds": sleep, "runners": runners, "ideal_s": ideal,
                "wall_s": walls, "first_start_to_last_result_s": spans}
    return res
