"""The first hour with `tinyci up`, as a new user has it: `up` in one
directory, then the tools, a git hook and a labelled runner started by hand
from below it (``local.find_up``); a refused credential that stops a daemon
in one line; the runner matrix from `up`'s own flags; the data kept out of
`git add -A`; and one line per finished build in up's window."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ci import local, up
from ci.cli import build_parser

from conftest import Daemon, Repo, child_env, pid_alive, tinyci, wait_until


class Up:
    """`tinyci up` run by hand in ``where`` (its data in the default ./.tinyci); stopped by PID."""

    def __init__(self, where: Path, *argv: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "ci", "up", *argv], cwd=where, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env(), stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        def found():
            return next((line for line in list(self.lines) if re.search(pattern, line)), None)
        return wait_until(found, timeout, f"{pattern!r} from tinyci up", details=lambda: "".join(self.lines))

    def children(self) -> dict[str, tuple[str, int]]:
        found = {}
        for line in self.lines:
            match = re.match(r"\s+(\S+)\s+(\S+:\d+)\s+pid (\d+)", line)
            if match:
                found[match.group(1)] = (match.group(2), int(match.group(3)))
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def status(cwd: Path, *argv: str) -> dict:
    done = tinyci("status", "--json", *argv, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_tools_a_hook_and_a_labelled_runner_work_from_below_where_up_ran(tmp_path, tmp_path_factory):
    run = Up(tmp_path, "--demo", "--port", "0", "--no-web", "--runners", "1", "--labels", "base",
             "--interval", "30")
    hand = None
    try:
        run.wait_for("Press Ctrl-C")
        addr = run.children()["dispatcher"][0]
        demo = tmp_path / ".tinyci" / "demo-repo"
        assert "--dispatcher" not in "".join(run.lines)       # the tools below find it by themselves
        # 1. the README's next step: cd into the demo repository; every tool works from there
        snapshot = wait_until(lambda: [b for b in status(demo / "tests")["builds"] if b["status"] == "passed"],
                              90, "the demo's first build, seen from below up's directory")
        assert snapshot[0]["subject"] == "Add calc and its test"
        assert [(r["name"], r["labels"]) for r in status(demo)["runners"]] == [("runner-1", ["base"])]
        run.wait_for(r"build 1 passed: main [0-9a-f]{7} Add calc and its test \(\d+\.\ds, on runner-1\)")

        # 2. a runner started by hand there, as the README shows it: up's secret, up's dispatcher, a free port,
        #    and its clones beside up's runners rather than inside the demo repository
        hand = Daemon("runner", ["--labels", "py311"], demo / "tests", tmp_path / "hand-runner.log", child_env())
        name = hand.ready_line.rsplit(" as ", 1)[1]
        wait_until(lambda: any(r["name"] == name and r["labels"] == ["py311"] and r["state"] == "idle"
                               for r in status(demo)["runners"]), 30, "the hand-started runner registered")
        assert (tmp_path / ".tinyci" / "runners" / name).is_dir()
        assert subprocess.run(["git", "-C", str(demo), "status", "--porcelain"], capture_output=True,
                              text=True).stdout == ""

        # a job only the hand-started runner can take, committed in the demo repository and built there;
        # the git hook installed from below up's directory pokes up's observer with up's secret
        hook = tinyci("install-hook", cwd=demo)
        assert hook.returncode == 0, hook.stderr
        repo = Repo.__new__(Repo)
        repo.path, repo.env = demo, {**os.environ, "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "a@example.com",
                                     "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "a@example.com"}
        repo.env.update(child_env())
        repo.commit("Run on py311", {".ci.yaml": "jobs:\n  py311: {labels: [py311]}\n"
                                                 "steps: [python -m pytest -q]\n"})
        # the observer polls every 30 s: only the hook can have made this quick
        built = wait_until(lambda: [b for b in status(demo)["builds"] if b["job"] == "py311"
                                    and b["status"] == "passed"], 25, "the py311 job passed on the hand runner")
        assert built[0]["runner"] == name
        run.wait_for(rf"build \d+ \[py311\] passed: main .* Run on py311 \(.*on {name}\)")

        # no .tinyci above: a refusal says there is none, in one line
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        refused = tinyci("status", "--dispatcher", addr, cwd=elsewhere)
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
        assert f"no .tinyci/secret in {elsewhere} or any directory above it" in refused.stderr

        # a daemon with a wrong secret stops at once, saying so in one line, instead of retrying forever
        started = time.monotonic()
        wrong = tinyci("runner", "--port", "0", "--dispatcher", addr, "--workdir", str(elsewhere / "w"),
                       cwd=elsewhere, timeout=60, TINYCI_AUTH_SECRET="wrong")
        assert wrong.returncode == 2 and time.monotonic() - started < 30
        assert re.fullmatch(r"tinyci runner: the dispatcher at \S+ refused the credentials of runner \S+ .*\n",
                            wrong.stderr), wrong.stderr
        observer = tinyci("observer", "--port", "0", "--repo", str(demo), "--dispatcher", addr, "--state",
                          str(elsewhere / "o"), cwd=elsewhere, timeout=60, TINYCI_AUTH_SECRET="wrong")
        assert observer.returncode == 2 and "Traceback" not in observer.stderr
        assert re.match(r"tinyci observer: dispatcher \S+ refused our credentials", observer.stderr.splitlines()[-1])
    finally:
        if hand is not None:
            hand.stop()
        code = run.stop()
    assert code == 0, run.proc.stderr.read()
    assert not (tmp_path / ".tinyci" / "up.json").exists()       # tools no longer point at daemons gone
    assert not any(pid_alive(pid) for _, pid in run.children().values())


def plan(tmp_path: Path, *argv: str) -> up.UpPlan:
    return up.make_plan(build_parser("up").parse_args(["up", "--data", str(tmp_path / "data"), *argv]))


def test_up_starts_the_runner_matrix_from_its_own_flags(tmp_path):
    assert plan(tmp_path, "--demo").labels == [(), ()]
    assert plan(tmp_path, "--demo", "--runners", "2", "--labels", "py311,lint").labels == [("py311", "lint")] * 2
    assert plan(tmp_path, "--demo", "--runner", "py311", "--runner", "lint,linux").labels == [
        ("py311",), ("lint", "linux")]
    assert plan(tmp_path, "--demo", "--runners", "1", "--runner", "gpu").labels == [(), ("gpu",)]
    done = tinyci("up", "--demo", "--data", str(tmp_path / "d"), "--runner", "bad label", cwd=tmp_path)
    assert done.returncode == 2 and "--runner: label 'bad label' must be" in done.stderr


def test_up_in_ones_own_clone_keeps_its_data_out_of_git_add(tmp_path):
    repo = Repo(tmp_path / "clone")
    repo.commit("first")
    data = repo.path / ".tinyci"
    assert up.exclude_data(repo.path, data) == "/.tinyci/"
    data.mkdir()
    (data / "secret").write_text("s\n")
    assert repo.git("status", "--porcelain") == ""
    assert "/.tinyci/" in (repo.path / ".git" / "info" / "exclude").read_text()
    assert up.exclude_data(repo.path, data) == ""               # once is enough
    assert up.exclude_data(repo.path, tmp_path / "elsewhere") == ""     # outside the clone: nothing to hide


def test_a_restarted_demo_does_not_claim_its_first_commit_is_being_built(tmp_path, capsys):
    first, again = plan(tmp_path, "--demo"), plan(tmp_path, "--demo")
    assert first.demo_made and not again.demo_made
    for made, says in ((first, True), (again, False)):
        supervisor = up.Supervisor(made)
        supervisor.children = [up.Child(name, name, [], tmp_path / f"{name}.log",
                                        proc=SimpleNamespace(pid=1), addr="127.0.0.1:1")
                               for name in ("dispatcher", "observer")]
        supervisor.print_summary()
        assert ("first commit is being built now" in capsys.readouterr().out) is says


def test_find_up_looks_upwards_and_ignores_a_stopped_up(tmp_path):
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    assert local.find_up(below) is None
    (tmp_path / ".tinyci").mkdir()
    (tmp_path / ".tinyci" / "up.json").write_text(json.dumps({"dispatcher": "127.0.0.1:5", "pid": os.getpid()}))
    found = local.find_up(below)
    assert found.data == tmp_path / ".tinyci" and found.addrs == {"dispatcher": "127.0.0.1:5"}
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".tinyci" / "up.json").write_text(json.dumps({"dispatcher": "127.0.0.1:5", "pid": dead.pid}))
    assert local.find_up(below) is None               # its up stopped and kept no secret
    (tmp_path / ".tinyci" / "secret").write_text("s3\n")
    assert local.find_up(below) == local.Up(tmp_path / ".tinyci", "s3", {})


def test_tinyci_ceiling_stops_the_search_at_and_above_its_directories(tmp_path, monkeypatch):
    outer = tmp_path / "clone"
    below = outer / "checkouts" / "1"
    below.mkdir(parents=True)
    (outer / ".tinyci").mkdir()
    (outer / ".tinyci" / "secret").write_text("hand-run up\n")
    monkeypatch.setenv(local.CEILING, str(tmp_path / "elsewhere"))
    assert local.find_up(below).secret == "hand-run up"
    monkeypatch.setenv(local.CEILING, f"relative/dir{os.pathsep}{below}")      # relative entries are ignored
    assert local.find_up(below) is None
    monkeypatch.setenv(local.CEILING, str(outer) + "/")
    assert local.find_up(below) is None and local.find_up(outer) is None
    monkeypatch.chdir(below)
    assert f"below {outer}/ (TINYCI_CEILING)" in local.secret_source(None, "reader")


def test_the_tests_and_their_children_do_not_look_into_this_clone():
    # what keeps a `tinyci up --demo` run by hand in this clone from failing the tests
    assert os.environ[local.CEILING] == str(Path(__file__).resolve().parents[1])
    assert child_env()[local.CEILING] == os.environ[local.CEILING]
