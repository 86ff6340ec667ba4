"""web: the web page over a long history. A real dispatcher whose SQLite file
is seeded with 100,000 finished builds (branches, authors, jobs and
statuses spread as a busy team's would be) and one build whose log is
10 MB, and a real `tinyci web` reading it; pages and API requests timed from
a client on one kept HTTP connection, as a browser would.

Each request is made ``REPEAT`` times after one warm-up; figures are p50 and
p95 in milliseconds, client side (HTTP, the web process, its request to the
dispatcher, SQLite, the template). The first view of the 10 MB log's page is
timed on its own: it counts the log's lines once (kept afterwards).
"""

from __future__ import annotations

import http.client
import random
import time
from pathlib import Path
from urllib.parse import urlsplit

from ci.store import Store

from .harness import Cluster, Result, cluster, median, pct, rss_mb, wait_for

BRANCHES = ["main"] * 6 + [f"feature/{n}" for n in range(40)] + ["release/1.x", "release/2.x"]
AUTHORS = [f"Dev {n} <dev{n}@example.com>" for n in range(30)] + ["Rare Person <rare@example.com>"]
JOBS = ["", "test", "lint", "docs"]
STATUSES = ["passed"] * 17 + ["failed"] * 2 + ["error"]
LINE = ("tests/test_module_{0:05d}.py::test_case_{1:04d} \x1b[32mPASSED\x1b[0m"
        "                                    [ {2:3d}%]\n")


def seed(data: Path, history: int, log_bytes: int) -> int:
    """``history`` finished builds (the schema and indexes made by the real
    Store); the newest gets a log of ``log_bytes``. Returns that build's id."""
    rng = random.Random(7)
    store = Store(data)
    now = time.time() - history * 30
    rows = []
    for i in range(history):
        created = now + i * 30
        author = AUTHORS[-1] if i % 25_000 == 0 else rng.choice(AUTHORS[:-1])
        rows.append(("/srv/git/app", rng.choice(BRANCHES), f"{rng.getrandbits(160):040x}", f"change number {i}",
                     author, created, "commit", rng.choice(STATUSES), 1, f"runner-{i % 8}", "[]", created,
                     created + 2, created + 2 + rng.uniform(5, 300), 0, 0, rng.choice(JOBS)))
    with store.transaction():
        store.db.executemany(
            "INSERT INTO builds (repo, branch, sha, subject, author, commit_time, reason, status, attempt, runner, "
            "labels, created_at, started_at, finished_at, exit_code, log_base, job) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    big = store.db.execute("SELECT max(id) FROM builds").fetchone()[0]
    store.db.execute("UPDATE builds SET status = 'passed' WHERE id = ?", (big,))
    store.close()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    with open(data / "logs" / f"{big}.log", "w") as log:
        written, n = 0, 0
        while written < log_bytes:
            line = LINE.format(n // 100, n % 100, n * 100 // 130_000 % 101)
            log.write(line)
            written += len(line.encode())
            n += 1
    return big


class Browser:
    """One kept HTTP/1.1 connection; ``get`` returns (status, milliseconds, bytes)."""

    def __init__(self, base: str):
        url = urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)

    def get(self, path: str) -> tuple[int, float, int]:
        t = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        return response.status, (time.perf_counter() - t) * 1000, len(body)

    def close(self) -> None:
        self.conn.close()


def _time(browser: Browser, path: str, repeat: int) -> dict:
    status, _, size = browser.get(path)          # warm-up
    if status != 200:
        raise AssertionError(f"GET {path}: {status}")
    times = [browser.get(path)[1] for _ in range(repeat)]
    return {"p50": median(times), "p95": pct(times, 95), "count": repeat, "bytes": size}


def web_pages(tmp: Path, quick: bool) -> Result:
    history, log_bytes, repeat = (10_000, 1 << 20, 10) if quick else (100_000, 10 << 20, 50)
    res = Result("web")
    big = seed(tmp / "dispatcher", history, log_bytes)
    res.data = {"history": history, "log_bytes": log_bytes, "repeat": repeat, "pages": {}}
    with cluster(tmp, ["true"]) as c:
        disp = c.dispatcher()
        web = c.start("web", "web", ["--port", "0", "--dispatcher", disp.addr])
        browser = Browser(web.addr)
        try:
            _measure(c, browser, res, big, history, log_bytes, repeat)
            res.data["rss_mb"] = {"dispatcher": rss_mb(disp.pid), "web": rss_mb(web.pid)}
        finally:
            browser.close()
    res.add("web process RSS after the run", res.data["rss_mb"]["web"], "MB")
    res.add("dispatcher RSS after the run", res.data["rss_mb"]["dispatcher"], "MB")
    return res


def _measure(c: Cluster, browser: Browser, res: Result, big: int, history: int, log_bytes: int,
             repeat: int) -> None:
    wait_for("the web page", lambda: browser.get("/api/runners")[0] == 200, 30)
    mb = log_bytes / (1 << 20)
    browser.get("/builds/1")        # the templates compiled, so the next figure is the log's alone
    first = browser.get(f"/builds/{big}")
    res.data["first_big_view_ms"] = first[1]
    pages = {
        "history page /builds": ("/builds", "< 50"),
        "history API /api/builds": ("/api/builds", "< 50"),
        "history page filtered by branch": ("/builds?branch=feature/7", "< 50"),
        "history page filtered by status": ("/builds?status=error", "< 50"),
        "history API filtered by job and status": ("/api/builds?job=lint&status=failed", ""),
        "history API by sha prefix": ("/api/builds?sha=abc", ""),
        "history API, a page deep in history": (f"/api/builds?before={history // 2}", "< 50"),
        "history API by a rare author (scans)": ("/api/builds?author=rare", ""),
        f"build page, {mb:.0f} MB log": (f"/builds/{big}", "< 100"),
        f"build API, {mb:.0f} MB log": (f"/api/builds/{big}", "< 100"),
        f"build page, {mb:.0f} MB log, at line 60,000": (f"/builds/{big}?line=60000", "< 100"),
        "overview /": ("/", ""),
        "badge": ("/badge/main.svg", ""),
    }
    for name, (path, target) in pages.items():
        figures = _time(browser, path, repeat)
        res.data["pages"][name] = {"path": path, **figures}
        res.add(f"{name} p50 ({history:,} builds)", figures["p50"], "ms", target)
        res.add(f"{name} p95", figures["p95"], "ms")
    res.add(f"build page, {mb:.0f} MB log, first view (counts its lines once)", first[1], "ms")
    res.data["page_bytes"] = {name: v["bytes"] for name, v in res.data["pages"].items()}
