"""python -m bench [--quick] [SCENARIO...]: run the benchmarks, print a table,
write bench/results/<scenario>.json (or <scenario>.quick.json with --quick,
so a quick run never overwrites the committed full figures)."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from . import cache, data, latency, peer, recovery, repo, scale, throughput, web
from .harness import Figure, Result, machine

SCENARIOS = {
    "latency-push": latency.latency_push,
    "latency-poll": latency.latency_poll,
    "throughput": throughput.throughput,
    "dispatcher-scale": scale.dispatcher_scale,
    "recovery": recovery.recovery,
    "overhead": throughput.overhead,
    "web": web.web_pages,
    "peer": peer.peer,
    "cache": cache.cache,
    "logs": data.logs,
    "artifacts": data.artifacts,
    "repo": repo.repo_scenario,
    "branches": repo.branches_scenario,
}
RESULTS = Path(__file__).resolve().parent / "results"


def _number(value: float) -> str:
    """One decimal, or two significant digits below 1: a ratio of 0.018 x or a start-up of 0.18 s
    would otherwise print as 0.0 x and 0.2 s."""
    return f"{value:.2g}" if 0 < abs(value) < 0.95 else f"{value:,.1f}"   # .2g prints 0.996 as a bare "1"


def table(results: list[Result]) -> str:
    rows = [("scenario", "figure", "value", "target", "met")]
    for res in results:
        for f in res.figures:
            value = "-" if f.value is None else f"{_number(f.value)} {f.unit}".strip()
            met = "" if f.met is None else ("yes" if f.met else "NO")
            rows.append((res.scenario, f.name + (f" ({f.note})" if f.note else ""), value,
                         f"{f.target} {f.unit}".strip() if f.target else "", met))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def saved_table() -> str:
    results = []
    for name in SCENARIOS:
        path = RESULTS / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            res = Result(name)
            res.figures = [Figure(**f) for f in data["figures"]]
            results.append(res)
    return table(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every scenario, small enough to finish in about a minute (for CI)")
    parser.add_argument("--table", action="store_true",
                        help="print the table of the saved full results (bench/results/*.json) and exit")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"which to run (default all): {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    # a SIGTERM (a CI's timeout, a kill by pid) unwinds like Ctrl-C: each cluster stops the daemons it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    if args.table:
        print(saved_table())
        return 0
    # the scale scenario opens thousands of sockets
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    facts = machine()
    RESULTS.mkdir(exist_ok=True)
    results, failed = [], []
    started = time.monotonic()
    for name in args.scenarios or SCENARIOS:
        tmp = Path(tempfile.mkdtemp(prefix=f"tinyci-bench-{name}-"))
        t0 = time.monotonic()
        print(f"== {name}{' (quick)' if args.quick else ''} ...", flush=True)
        try:
            res = SCENARIOS[name](tmp, args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        elapsed = time.monotonic() - t0
        results.append(res)
        print(table([res]), flush=True)
        out = RESULTS / f"{name}{'.quick' if args.quick else ''}.json"
        out.write_text(json.dumps({"scenario": name, "quick": args.quick, "seconds": round(elapsed, 1),
                                   "command": "python -m bench" + (" --quick" if args.quick else ""),
                                   "machine": facts, "figures": [asdict(f) for f in res.figures],
                                   "data": res.data}, indent=1) + "\n")
    print(f"\n{len(results)} scenario(s) in {time.monotonic() - started:.0f}s on {facts['cpus']} x "
          f"{facts['cpu_model']}, Python {facts['python']}, git {facts['git']}\n")
    print(table(results))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
