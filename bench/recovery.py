"""recovery: (1) a runner SIGKILLed mid-build: seconds from the kill until the
dispatcher has the build running again on another runner (its attempt 2
``started_at``); (2) the dispatcher SIGKILLed with builds queued: seconds from
starting it again (same data dir, same port) until it answers ``status``, and
until every queued build is finished, each exactly once.

Commits are sent to the dispatcher directly as the observer would (role
observer), so the queue is filled in a moment."""

from __future__ import annotations

import time
from pathlib import Path

from ci import protocol

from .harness import FINAL, Reader, Repo, cluster, Result, median, pct, request, wait_for


def _commit_msg(repo: Repo, sha: str) -> dict:
    return {"type": "commit", "repo": str(repo.path), "branch": "main", "sha": sha, "author": "Bench",
            "subject": f"bench {sha[:7]}", "time": time.time()}


def recovery(tmp: Path, quick: bool) -> Result:
    trials, queued = (1, 20) if quick else (5, 100)
    res = Result("recovery")
    # ---- runner killed mid-build
    regain = []
    with cluster(tmp / "runner-kill", ["sleep 4"]) as c:
        c.dispatcher()
        runners = {f"r{i}": c.runner(f"r{i}") for i in (1, 2)}
        repo = Repo(tmp / "repo")
        repo.commit("initial")
        shas = repo.many(trials)
        reader = Reader(c.disp.addr)
        try:
            for i, sha in enumerate(shas):
                request(c.disp.addr, _commit_msg(repo, sha), protocol.OBSERVER)
                build = wait_for("the build to run", lambda: next(
                    (b for b in reader.status(10)["builds"] if b["sha"] == sha and b["status"] == "running"), None), 30)
                wait_for("the step to be under way", lambda: "$ sleep 4" in c.log(build["id"]), 30, every=0.05)
                victim = build["runner"]
                killed = time.time()
                runners.pop(victim).kill()
                again = wait_for("the build to run elsewhere", lambda: next(
                    (b for b in reader.status(10)["builds"] if b["sha"] == sha and b["attempt"] >= 2
                     and b["status"] in ("running", *FINAL)), None), 30)
                regain.append(again["started_at"] - killed)
                wait_for("the build to finish", lambda: next(
                    (b for b in reader.status(10)["builds"] if b["sha"] == sha and b["status"] in FINAL), None), 30)
                name = f"r{3 + i}"
                runners[name] = c.runner(name)        # two live runners for the next trial
        finally:
            reader.close()
    res.add("runner killed -> build running elsewhere p50", median(regain), "s", "< 3.5",
            note="heartbeat 1 s x 3 misses + 0.5 s")
    res.add("runner killed -> build running elsewhere p95", pct(regain, 95), "s")
    # ---- dispatcher killed with builds queued
    serving, drained, exact = [], [], True
    for t in range(trials if not quick else 1):
        with cluster(tmp / f"dispatcher-kill-{t}", ["true"]) as c:
            disp = c.dispatcher()
            repo = Repo(c.tmp / "repo")
            repo.commit("initial")
            shas = repo.many(queued)
            for sha in shas:                          # no runner yet: they all stay queued
                request(disp.addr, _commit_msg(repo, sha), protocol.OBSERVER)
            disp.kill()                                # SIGKILL
            port = disp.port
            started = time.time()
            disp = c.dispatcher(port=port)
            reader = Reader(disp.addr)
            try:
                wait_for("status", lambda: reader.status(1), 10, every=0.005)
                serving.append(time.time() - started)
                for i in range(4):
                    c.runner(f"r{i}")
                builds = wait_for(f"{queued} builds", lambda: (lambda bs: bs if len(bs) == queued and all(
                    b["status"] in FINAL for b in bs) else None)(reader.status(queued + 10)["builds"]),
                    120, every=0.1)
                drained.append(max(b["finished_at"] for b in builds) - started)
                exact = exact and sorted(b["sha"] for b in builds) == sorted(shas) and all(
                    b["status"] == "passed" and b["attempt"] == 1 for b in builds)
            finally:
                reader.close()
    res.add("dispatcher restarted -> serving status p50", median(serving), "s", "< 1",
            note="from the new process's start")
    res.add("dispatcher restarted -> serving p95", pct(serving, 95), "s")
    res.add(f"dispatcher restarted -> all {queued} queued builds finished p50", median(drained), "s",
            note="4 runners started after it")
    res.add("every queued build finished exactly once, passed", 1.0 if exact else 0.0, "(1 = yes)", ">= 1")
    res.data = {"trials": trials, "queued": queued, "runner_regain_s": regain, "serving_s": serving,
                "drained_s": drained, "exactly_once": exact}
    return res
