"""repo: a big repository (20,000 files, 5,000 commits, made with `git
fast-import`; --quick: 4,000 files, 400 commits); and branches: an observer
watching 1,000 branches (--quick: 200) against one watching one.

- *checkout of the next commit*: the runner's own checkout (``ci.checkout.
  Checkout.run``, in this process, on a slot's working clone that has the
  commit: what every build but a slot's first pays) against a bare `git
  checkout <next>` of the same change in the same clone. Trials interleave
  the two: put the clone at commit k (untimed), time one way to k+1, back to
  k, time the other way.
- *first build on a fresh runner*: ``Checkout.run`` into an empty slot
  (clone and checkout) against `git clone` of the same repository alone.

Pairs alternate which of the two goes first, and each figure with a target
is the median of the pairs' ratios (a loaded machine's noise cancels best).
Both are the runner's code with its real git commands; no daemon is needed
to time them, and none is started.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import subprocess
import time
from pathlib import Path

from ci.buildlog import BuildLog
from ci.checkout import Checkout

from .harness import GIT_ENV, Result, median

DIRS_FULL, PER_DIR_FULL, COMMITS_FULL = 200, 100, 5000
DIRS_QUICK, PER_DIR_QUICK, COMMITS_QUICK = 40, 100, 400
CHANGED = 3             # files each commit changes


def _git(cwd: Path, *args: str, input: bytes | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), **GIT_ENV}
    done = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def make_repo(path: Path, dirs: int, per_dir: int, commits: int) -> list[str]:
    """A bare repository of dirs*per_dir files and ``commits`` commits on main, each
    changing CHANGED files; returns the shas, oldest first."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "--bare", "-b", "main")
    files = [f"src/d{d:03d}/f{f:03d}.py" for d in range(dirs) for f in range(per_dir)]
    out = []
    stamp = 1_700_000_000
    first = [f"commit refs/heads/main\nmark :1\ncommitter Bench <b@example.com> {stamp} +0000\n"
             f"data 7\ninitial\n"]
    for name in files:
        body = f"# {name}\nVALUE = 0\n"
        first.append(f"M 644 inline {name}\ndata {len(body)}\n{body}\n")
    out.append("".join(first))
    for i in range(1, commits):
        msg = f"change {i}"
        part = [f"commit refs/heads/main\nmark :{i + 1}\ncommitter Bench <b@example.com> {stamp + i} +0000\n"
                f"data {len(msg)}\n{msg}\n"]
        for k in range(CHANGED):
            name = files[(i * 7919 + k * 104729) % len(files)]
            body = f"# {name}\nVALUE = {i}\n"
            part.append(f"M 644 inline {name}\ndata {len(body)}\n{body}\n")
        out.append("".join(part))
    _git(path, "fast-import", "--quiet", input=("".join(out) + "done\n").encode())
    return _git(path, "rev-list", "--reverse", "main").split()


def _checkout(loop: asyncio.AbstractEventLoop, clone: Path, sha: str, logs: Path, repo: str) -> tuple[float, float]:
    """The runner's checkout of ``sha`` into ``clone`` on ``loop`` (kept, as the runner's is):
    (seconds, CPU seconds)."""
    log = BuildLog(logs / "checkout.log")
    try:
        # the log is opened and synced (at the attempt's end, in the runner) outside the timing
        checkout = Checkout(clone, log, asyncio.Event(), 600)
        t0, c0 = time.perf_counter(), _cpu()
        loop.run_until_complete(checkout.run(repo, sha, time.monotonic() + 600))
        return time.perf_counter() - t0, _cpu() - c0
    finally:
        log.close()


def _timed(cwd: Path, *args: str) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    _git(cwd, *args)
    return time.perf_counter() - t0, _cpu() - c0


def _cpu() -> float:
    """CPU seconds of this process and the git commands it waited for: unlike the
    wall time, barely moved by other processes' load on the disk and the cores."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def repo_scenario(tmp: Path, quick: bool) -> Result:
    dirs, per_dir, count = (DIRS_QUICK, PER_DIR_QUICK, COMMITS_QUICK) if quick else \
        (DIRS_FULL, PER_DIR_FULL, COMMITS_FULL)
    trials = 5 if quick else 15
    res = Result("repo")
    origin = tmp / "origin.git"
    t0 = time.perf_counter()
    shas = make_repo(origin, dirs, per_dir, count)
    made = time.perf_counter() - t0
    logs = tmp / "logs"
    logs.mkdir()
    url = str(origin)
    loop = asyncio.new_event_loop()
    try:
        return _measure(res, loop, tmp, logs, url, shas, trials, made)
    finally:
        loop.close()


def _measure(res: Result, loop: asyncio.AbstractEventLoop, tmp: Path, logs: Path, url: str, shas: list[str],
             trials: int, made: float) -> Result:

    # the first build on a fresh runner against `git clone` alone, in pairs whose
    # order alternates (the second of a pair may pay the first's writeback)
    fresh, plain = [], []
    for i in range(4):
        slot = tmp / f"fresh{i}" / "0"
        for ours_first in ((True, False) if i % 2 == 0 else (False, True)):
            if ours_first:
                fresh.append(_checkout(loop, slot, shas[-1], logs, url))
            else:
                plain.append(_timed(tmp, "clone", "-q", url, str(tmp / f"plain{i}")))
        shutil.rmtree(slot.parent)
        shutil.rmtree(tmp / f"plain{i}")

    # the next commit, in one slot's clone that has it
    slot = tmp / "slot" / "0"
    _checkout(loop, slot, shas[0], logs, url)
    ours, bare = [], []
    step = max(1, (len(shas) - 1) // trials)
    for n, k in enumerate(range(0, len(shas) - 1, step)[:trials]):
        here, after = shas[k], shas[k + 1]
        for ours_first in ((True, False) if n % 2 == 0 else (False, True)):
            _git(slot, "checkout", "-q", "--force", "--detach", here)
            if ours_first:
                ours.append(_checkout(loop, slot, after, logs, url))
            else:
                bare.append(_timed(slot, "checkout", "-q", "--detach", after))
    ms = lambda xs: [x[0] * 1000 for x in xs]
    ratio = lambda a, b, i=0: median([x[i] / y[i] for x, y in zip(a, b)])
    res.add("checkout of the next commit / bare git checkout", ratio(ours, bare), "x", "< 1.5",
            note="median of pairs")
    res.add("checkout of the next commit / bare git checkout, CPU", ratio(ours, bare, 1), "x",
            note="with git's; median of pairs")
    res.add("checkout of the next commit p50 (runner)", median(ms(ours)), "ms")
    res.add("bare git checkout of the next commit p50", median(ms(bare)), "ms")
    res.add("first build's clone+checkout / git clone", ratio(fresh, plain), "x", note="median of pairs")
    res.add("first build's clone+checkout / git clone, CPU", ratio(fresh, plain, 1), "x",
            note="with git's; median of pairs")
    res.add("first build's clone+checkout p50 (runner)", median(ms(fresh)), "ms")
    res.add("git clone p50", median(ms(plain)), "ms")
    res.data = {"files": _git(slot, "ls-files").count("\n"), "commits": len(shas), "made_s": round(made, 2),
                "next_ms": ms(ours), "bare_ms": ms(bare), "fresh_ms": ms(fresh), "clone_ms": ms(plain),
                "cpu_s": {name: [x[1] for x in xs] for name, xs in
                          (("next", ours), ("bare", bare), ("fresh", fresh), ("clone", plain))}}
    return res


# ---------------------------------------------------------------- many branches

BRANCHES_FULL, BRANCHES_QUICK = 1000, 200


def _clone_with_branches(path: Path, branches: int) -> dict[str, str]:
    """A repository with ``branches`` branches (main and b0001...), each at a
    commit of its own, refs packed as a clone's are; returns branch -> sha."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "commit", "-q", "--allow-empty", "-m", "initial")
    tree = _git(path, "rev-parse", "HEAD^{tree}").strip()
    base = _git(path, "rev-parse", "HEAD").strip()
    heads = {"main": base}
    commands = []
    for i in range(1, branches):
        sha = _git(path, "commit-tree", tree, "-p", base, "-m", f"branch {i}").strip() if i < 4 else base
        name = f"b{i:04d}"
        heads[name] = sha
        commands.append(f"create refs/heads/{name} {sha}\n")
    if commands:
        _git(path, "update-ref", "--stdin", input="".join(commands).encode())
    _git(path, "pack-refs", "--all")
    return heads


def _seed(state_dir: Path, repo: Path, heads: dict[str, str]) -> None:
    """The observer's saved position: every branch already reported (a long-running
    observer's state), so the figures are of looking, not of a first report of 1,000 heads."""
    import hashlib
    import json
    state_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(repo).encode(), usedforsecurity=False).hexdigest()[:12]
    (state_dir / f"{digest}.json").write_text(json.dumps({"repo": str(repo), "branches": heads}))


def _cpu_with_children(pid: int) -> float:
    """utime + stime of ``pid`` and of its waited-for children (the git commands it ran)."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def branches_scenario(tmp: Path, quick: bool) -> Result:
    import random
    from ci import net, protocol
    from .harness import Reader, cluster, wait_for
    many = BRANCHES_QUICK if quick else BRANCHES_FULL
    window = 4.0 if quick else 20.0
    trials = 5 if quick else 20
    res = Result("branches")
    with cluster(tmp, ["true"]) as c:
        c.dispatcher()
        observers, repos = {}, {}
        for count in (1, many):
            repo = tmp / f"repo{count}"
            heads = _clone_with_branches(repo, count)
            _seed(tmp / f"state{count}", repo, heads)
            repos[count] = (repo, heads)
            observers[count] = c.start("observer", f"observer{count}", [
                "--port", "0", "--repo", str(repo), "--dispatcher", c.disp.addr,
                "--state", str(tmp / f"state{count}"), "--interval", "1"])
        reader = Reader(c.disp.addr)
        try:
            time.sleep(2.0)             # past each observer's first look (start-up is not idling)
            before = {n: _cpu_with_children(d.pid) for n, d in observers.items()}
            t0 = time.monotonic()
            time.sleep(window)          # the measurement itself: CPU over a window of idling
            spent = time.monotonic() - t0
            idle = {n: (_cpu_with_children(d.pid) - before[n]) / spent * 100 for n, d in observers.items()}
            latency: dict[int, list[float]] = {1: [], many: []}
            for i in range(trials):
                for count in (1, many) if i % 2 == 0 else (many, 1):
                    repo, heads = repos[count]
                    branch = random.choice(sorted(heads))
                    tree = _git(repo, "rev-parse", f"{branch}^{{tree}}").strip()
                    sha = _git(repo, "commit-tree", tree, "-p", branch, "-m", f"trial {i}").strip()
                    moved = time.time()
                    _git(repo, "update-ref", f"refs/heads/{branch}", sha)
                    # a poke, as the git hook sends: the figure is the observer's work, not a poll wait
                    asyncio.run(net.call(observers[count].addr, {"type": "poke"}, protocol.OBSERVER,
                                         timeout=10, to=protocol.OBSERVER_ID))
                    build = wait_for(f"the build of {sha[:12]}", lambda: next(
                        (b for b in reader.status(20)["builds"] if b["sha"] == sha), None), 30, every=0.005)
                    latency[count].append(build["created_at"] - moved)
        finally:
            reader.close()
    ms = lambda xs: [x * 1000 for x in xs]
    res.add(f"observer CPU idle, {many} branches", idle[many], "% of a core", "< 5",
            note="with the git it runs; poll 1 s")
    res.add("observer CPU idle, 1 branch", idle[1], "% of a core")
    one, lots = median(ms(latency[1])), median(ms(latency[many]))
    res.add(f"branch moved -> build queued p50, {many} branches", lots, "ms", note="poked, as by the hook")
    res.add("branch moved -> build queued p50, 1 branch", one, "ms")
    res.add(f"queued time, {many} branches / 1 branch", lots / one, "x", "< 1.25")
    res.data = {"branches": many, "window_s": window, "idle_pct": {str(k): v for k, v in idle.items()},
                "latency_ms": {str(k): ms(v) for k, v in latency.items()}}
    return res
