"""python -m bench cache: a click-sized build (a virtualenv, `pip install` of a
few real packages, then its tests) with the runner's build cache cold (a key
never seen: the venv is made and filled) and warm (the key's `.venv` restored),
cold and warm builds interleaved on one runner. Target: warm <= 60 % of cold.

The packages come from a local wheel directory (``TINYCI_BENCH_WHEELS``,
default ``~/.cache/tinyci-bench/wheels``), filled by ``pip download`` on the
first run, so later runs work offline and never measure the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .harness import Cluster, Repo, Result, median

PACKAGES = ("click", "pytest", "rich")
WHEELS = Path(os.environ.get("TINYCI_BENCH_WHEELS", Path.home() / ".cache" / "tinyci-bench" / "wheels"))

TESTS = '''\
import click
from click.testing import CliRunner
from rich.text import Text


@click.command()
@click.argument("name")
def hello(name):
    click.echo(Text(f"hello {name}").plain)


def test_hello():
    assert CliRunner().invoke(hello, ["world"]).output == "hello world\\n"


def test_missing_argument():
    assert CliRunner().invoke(hello, []).exit_code == 2
'''

CI_YAML = """\
env: {{WHEELS: "{wheels}"}}
cache:
  paths: [.venv]
  key: [requirements.txt]
steps:
  - test -x .venv/bin/python || python -m venv .venv
  - .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" -r requirements.txt
  - .venv/bin/python -m pytest -q -p no:cacheprovider tests
"""


def wheels() -> Path | None:
    """The wheel directory, filled once (network) and reused (offline); None when it cannot be."""
    marker = WHEELS / ".complete"
    if marker.is_file():
        return WHEELS
    WHEELS.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                          "--dest", str(WHEELS), *PACKAGES], capture_output=True, text=True, timeout=600)
    if got.returncode != 0:
        print(f"bench cache: pip download failed: {got.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    marker.write_text("\n".join(PACKAGES))
    return WHEELS


def cache(tmp: Path, quick: bool) -> Result:
    res = Result("cache")
    pairs = 5
    where = wheels()
    if where is None:
        res.add("warm / cold", None, "%", "< 60", note="no wheels: run once with network access")
        return res
    c = Cluster(tmp, steps=[])
    c.env["HOME"] = str(tmp / "home")        # the steps' ~: not the real one
    (tmp / "home").mkdir()
    repo = Repo(tmp / "repo")
    repo.commit("a click-sized project", {".ci.yaml": CI_YAML.format(wheels=where),
                                          "requirements.txt": "\n".join(PACKAGES) + "\n# 0\n",
                                          "tests/test_hello.py": TESTS})
    cold, warm = [], []
    with c:
        c.dispatcher()
        c.runner("r1")
        c.observer(repo)
        first = _build(c, repo.head())          # its own key: cold; counted only in --quick
        if first["status"] != "passed":
            res.add("warm / cold", None, "%", "< 60", note=f"the build {first['status']}: {c.log(first['id'])[-500:]}")
            return res
        if quick:       # two builds: the first, cold, and one warm after it
            cold.append(first["duration"])
            warm.append(_timed(c, repo.commit("warm", {"README": "warm\n"}), "cache: hit"))
        for n in range(1, pairs + 1 if not quick else 1):
            # a new key (requirements.txt changes) is a cold build; an unrelated change after it, warm
            cold.append(_timed(c, repo.commit(f"cold {n}", {"requirements.txt": "\n".join(PACKAGES) + f"\n# {n}\n"}),
                               "cache: miss"))
            warm.append(_timed(c, repo.commit(f"warm {n}", {"README": f"{n}\n"}), "cache: hit"))
    res.add("cold build p50", median(cold), "s", note="venv + pip install + tests")
    res.add("warm build p50", median(warm), "s", note=".venv restored from the cache")
    res.add("warm / cold", median(warm) / median(cold) * 100, "%", "< 60")
    res.data = {"packages": PACKAGES, "pairs": pairs, "cold_s": cold, "warm_s": warm}
    return res


def _build(c: Cluster, sha: str) -> dict:
    builds = c.wait_builds(lambda b: any(x["sha"] == sha and x["status"] not in ("queued", "running") for x in b),
                           f"the build of {sha[:8]}", timeout=600)
    return next(b for b in builds if b["sha"] == sha)


def _timed(c: Cluster, sha: str, expect: str) -> float:
    build = _build(c, sha)
    log = c.log(build["id"])
    if build["status"] != "passed" or expect not in log:
        raise RuntimeError(f"build {build['id']} {build['status']}, expected {expect!r}: {log[-800:]}")
    return build["duration"]
