"""dispatcher-scale: the real dispatcher process against a population of
light fake runners living in the bench process. Each fake runner is a real
server on its own loopback port speaking the real protocol: it registers,
answers ``ping`` with its leases, accepts ``run`` and at once reports
``result`` passed, over a connection of its own (a result is accepted only
from the runner holding the build).

History and the queue are seeded straight into the SQLite file before the
dispatcher starts (it recovers the queue on start-up, exactly as after a
restart): 100,000 finished builds and 10,000 queued ones.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from ci import net, protocol
from ci.store import SCHEMA

from .harness import Cluster, Result, cluster, cpu_seconds, median, pct, rss_mb

SHA = "0123456789abcdef0123456789abcdef01234567"


def seed(data: Path, history: int, queued: int) -> None:
    data.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data / "ci.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    now = time.time() - 86400
    rows = [("/bench/repo", "main", f"{i:040x}", f"history {i}", "Bench", now, "commit", "passed", 1, "old",
             "[]", now + i * 0.01, now + i * 0.01, now + i * 0.01 + 1, 0, 0) for i in range(history)]
    rows += [("/bench/repo", "main", f"{history + i:040x}", f"queued {i}", "Bench", now, "commit", "queued", 0,
              None, "[]", now, None, None, None, 0) for i in range(queued)]
    db.executemany("INSERT INTO builds (repo, branch, sha, subject, author, commit_time, reason, status, attempt, "
                   "runner, labels, created_at, started_at, finished_at, exit_code, log_base) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def create_files(where: Path, count: int) -> float:
    """Median microseconds to create a small file and write a line to it, as a hand-out does."""
    where.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(count):
        t = time.perf_counter()
        with open(where / f"{i}.log", "a+b") as f:
            f.write(b"=== attempt 1 ===\n")
        times.append((time.perf_counter() - t) * 1e6)
    return median(times)


class Fleet:
    """``count`` fake runners, their servers, and each one's connection to the dispatcher."""

    def __init__(self, dispatcher: str, count: int):
        self.dispatcher = net.parse_addr(dispatcher)
        self.count = count
        self.leases: dict[str, set] = {}
        self.done = 0
        self.clients: dict[str, net.Client] = {}
        self.servers = []
        self.tasks = set()

    async def start(self) -> None:
        # runners come up over a moment, not all in the same millisecond: 1,000 handshakes
        # at once (each registration makes the dispatcher dial back) only measure a stampede
        gate = asyncio.Semaphore(50)

        async def one(i: int) -> None:
            async with gate:
                await self._register(i)
        await asyncio.gather(*(one(i) for i in range(self.count)))

    async def _register(self, i: int) -> None:
        name = f"fake-{i}"
        self.leases[name] = set()
        server = await net.serve(lambda conn, msg, n=name: self.handle(n, msg), "127.0.0.1", 0,
                                 roles=frozenset({protocol.DISPATCHER}), name=name,
                                 identity=protocol.runner_identity(name))
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        client = self.clients[name] = net.Client(*self.dispatcher, protocol.RUNNER, id=name)
        await client.request({"type": "register", "name": name, "host": "127.0.0.1", "port": port,
                              "labels": [], "slots": 1, "running": []})

    async def handle(self, name: str, msg: dict) -> dict:
        if msg["type"] == "ping":
            return {"type": "pong", "running": [list(x) for x in sorted(self.leases[name])]}
        if msg["type"] == "run":
            lease = (msg["build"], msg["attempt"])
            self.leases[name].add(lease)
            task = asyncio.ensure_future(self.finish(name, lease))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return protocol.ok()
        return protocol.ok()

    async def finish(self, name: str, lease: tuple) -> None:
        try:
            await self.clients[name].request({"type": "result", "build": lease[0], "attempt": lease[1],
                                              "status": "passed", "exit_code": 0, "steps": 1, "duration": 0.0,
                                              "log_size": 0})
            self.done += 1
        except (net.PeerError, protocol.RemoteError):
            pass
        finally:
            self.leases[name].discard(lease)

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for client in self.clients.values():
            await client.close()


def dispatcher_scale(tmp: Path, quick: bool) -> Result:
    counts, history, queued, idle_s = ((100,), 10_000, 1_000, 2.0) if quick else \
        ((100, 500, 1000), 100_000, 10_000, 5.0)
    res = Result("dispatcher-scale")
    res.data = {"history": history, "queued": queued, "runs": {}}
    # every hand-out starts the build's log file: what the file system charges for that alone
    res.data["create_log_us"] = create_files(tmp / "create", 500)
    res.add("in isolation: create a build log file (one per dispatch) p50", res.data["create_log_us"], "us")
    for n in counts:
        run = tmp / f"runners-{n}"
        seed(run / "dispatcher", history, queued)
        with cluster(run, ["true"], net_cfg={"max_connections": 4096, "max_per_peer": 4096, "max_handshakes": 4096}) as c:
            disp = c.dispatcher()
            figures = asyncio.run(_measure(c, disp, n, queued, idle_s, 20 if quick else 100))
        res.data["runs"][n] = figures
        res.add(f"{n} runners: dispatches/s ({queued:,} queued)", figures["dispatches_per_s"], "/s",
                ">= 2000" if n == 500 else "")
        res.add(f"{n} runners: dispatches/s once all registered", figures["dispatches_per_s_registered"], "/s")
        res.add(f"{n} runners: dispatcher CPU per dispatch", figures["cpu_ms_per_dispatch"], "ms")
        res.add(f"{n} runners: fake runners declared dead while dispatching", figures["runners_declared_dead"], "")
        res.add(f"{n} runners: idle dispatcher CPU", figures["idle_cpu_pct"], "% of a core",
                "< 5" if n == 500 else "")
        res.add(f"{n} runners: dispatcher RSS ({history + queued:,} builds)", figures["rss_mb"], "MB",
                "< 150" if history >= 100_000 else "")
        res.add(f"{n} runners: status p50 ({history + queued:,} builds)", figures["status"]["p50"], "ms",
                "< 20" if history >= 100_000 else "")
        res.add(f"{n} runners: status p95", figures["status"]["p95"], "ms")
    return res


async def _measure(c: Cluster, disp, n: int, queued: int, idle_s: float, requests: int) -> dict:
    out = {"rss_start_mb": rss_mb(disp.pid)}
    loop = asyncio.get_running_loop()
    # the fleet's connection handlers are cancelled when this loop ends: not worth a traceback
    loop.set_exception_handler(lambda lp, ctx: None if isinstance(ctx.get("exception"), asyncio.CancelledError)
                               else lp.default_exception_handler(ctx))
    fleet = Fleet(c.disp.addr, n)
    t0, cpu0 = time.monotonic(), cpu_seconds(disp.pid)
    await fleet.start()
    out["registered_s"] = time.monotonic() - t0
    # builds are handed out while the fleet registers: the rate after it is the steady one
    registered_done = fleet.done
    deadline = time.monotonic() + 300
    client = net.Client(*net.parse_addr(c.disp.addr), protocol.READER)
    # done when the dispatcher has nothing queued or running (a result refused as stale,
    # after a runner was wrongly declared dead, is not counted by the fleet). `status`
    # lists every runner and the whole queue: asked once a second, not at every look,
    # so that the measuring does not take a noticeable share of the dispatcher's time
    asked = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if fleet.done >= queued:
            break
        if time.monotonic() - asked < 1.0:
            continue
        asked = time.monotonic()
        status = await client.request({"type": "status", "limit": 1}, 30)
        if not status.get("queue") and not any(r["running"] for r in status["runners"]):
            break
    out["seconds"] = time.monotonic() - t0
    out["dispatched"] = fleet.done
    out["dispatches_per_s"] = fleet.done / out["seconds"]
    steady = out["seconds"] - out["registered_s"]
    # none when every build was done before the last runner registered (1,000 runners)
    out["dispatches_per_s_registered"] = (fleet.done - registered_done) / steady \
        if steady > 0 and fleet.done > registered_done else None
    # the dispatcher's CPU for each build it ran (registrations included): steadier than a
    # rate on a shared machine, since it does not count the time others take the cores
    out["cpu_ms_per_dispatch"] = (cpu_seconds(disp.pid) - cpu0) / max(1, fleet.done) * 1000
    status = await client.request({"type": "status", "limit": 1}, 30)
    out["runners_declared_dead"] = sum(r["state"] == "dead" for r in status["runners"])
    await client.close()
    # idle: every build done, n runners answering a ping each heartbeat_interval (1 s by default)
    await asyncio.sleep(1.0)
    cpu0, t1 = cpu_seconds(disp.pid), time.monotonic()
    await asyncio.sleep(idle_s)
    out["idle_cpu_pct"] = (cpu_seconds(disp.pid) - cpu0) / (time.monotonic() - t1) * 100
    out["idle_seconds"] = idle_s
    # status with the whole history in the table, the fleet still registered
    client = net.Client(*net.parse_addr(c.disp.addr), protocol.READER)
    times = []
    try:
        for _ in range(requests):
            t = time.perf_counter()
            await client.request({"type": "status", "limit": 20}, 30)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        await client.close()
    out["status"] = {"p50": median(times), "p95": pct(times, 95), "count": requests, "limit": 20}
    out["rss_mb"] = rss_mb(disp.pid)
    await fleet.close()
    return out
