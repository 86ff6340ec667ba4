"""Test fixtures: real git repositories in tmp_path and real daemons as real
processes on ephemeral loopback ports, started by the one launcher
(tests/daemons.py, shared with the benchmarks). Every test that starts a
daemon, or tinyci as a process, is marked ``slow``, so ``pytest -m "not slow"``
is the fast subset.

The names the test files import from here (Cluster, Daemon, Repo, child_env,
free_port, pid_alive, READY, ...) are the launcher's, re-exported."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.daemon import READY
from ci.local import CEILING
from daemons import (GIT_ENV, ROOT, TOOL_CWD, Cluster, Daemon, Repo, child_env, free_port, pid_alive,
                     wait_until)

__all__ = ["READY", "GIT_ENV", "ROOT", "TOOL_CWD", "Cluster", "Daemon", "Repo", "child_env", "free_port", "pid_alive",
           "wait_until", "tinyci", "by_sha", "finished"]

# A `tinyci up` run by hand in this clone left .tinyci/secret here: the tools
# that tests call in this process (cli.main) must not take it as theirs. The
# children get the same from child_env.
os.environ[CEILING] = str(ROOT)

# Fixtures that start real daemon processes: a test using one is marked slow.
# `runners` (test_runner.py) and `spawn` (test_observer.py) start theirs
# through tests/daemons.py.
DAEMON_FIXTURES = frozenset({"cluster", "runners", "spawn"})
# A test whose own code starts tinyci as a process (the command, a daemon) is
# slow too: each start costs a Python interpreter's start-up and imports.
PROCESS_CALLS = ("tinyci(", "Daemon(", "Up(", "-m\", \"ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DAEMON_FIXTURES.intersection(getattr(item, "fixturenames", ())) or _starts_processes(item):
            item.add_marker(pytest.mark.slow)


def _starts_processes(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    return any(call in source for call in PROCESS_CALLS)


def tinyci(*args: str, cwd: Path | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run the `tinyci` command (as `python -m ci`) the way a user would, with no stdin."""
    return subprocess.run([sys.executable, "-m", "ci", *args], capture_output=True, text=True,
                          cwd=cwd or TOOL_CWD, timeout=timeout, env=child_env(**env), stdin=subprocess.DEVNULL)


def by_sha(builds: list[dict]) -> dict[str, dict]:
    return {b["sha"]: b for b in builds}


def finished(builds: list[dict]) -> bool:
    return bool(builds) and all(b["status"] not in ("queued", "running") for b in builds)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "repo")
    r.commit("initial", {"build.sh": "echo building; exit 0\n"})
    return r


@pytest.fixture
def cluster(tmp_path: Path):
    """``cluster(steps=[...], extra={section: keys}, **dispatcher_keys)`` -> a
    Cluster under tmp_path; every daemon it started is killed at the end."""
    made: list[Cluster] = []

    def make(steps: list[str] | None = None, extra: dict | None = None, **dispatcher_keys) -> Cluster:
        c = Cluster(tmp_path, steps=steps or ["sh build.sh"], dispatcher_keys=dispatcher_keys,
                    sections=extra or {})
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it, as PEM files: ``ca``, ``cert``, ``key``."""
    import trustme
    where = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {"ca": where / "ca.pem", "cert": where / "cert.pem", "key": where / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}

