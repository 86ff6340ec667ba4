"""Definitions kept on the dispatcher (``pipelines:``) and build secrets
(``secrets:``), end to end with the real daemons, real repositories and the
real tools: which definition a commit follows, which jobs get a secret, and
that its value is nowhere but in the steps' environment (masked in every
log, absent from status, the database and the daemons' own logs)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from conftest import finished, tinyci
from web_site import start_web

pytestmark = pytest.mark.slow

TOKEN = "pypi-AgEIcHlwaS5vcmc-7f3a9c2e5b81"
UNUSED = "never-asked-for-value-42"

SERVER = {"jobs": {"from-server": {"steps": ['echo "server-step job=$CI_JOB"'], "env": {"WHO": "server"}}}}


def of(builds, sha):
    return sorted((b for b in builds if b["sha"] == sha), key=lambda b: b["id"])


def test_a_server_pipeline_builds_a_repository_without_a_ci_yaml(cluster, repo):
    c = cluster(extra={"pipelines": {str(repo.path): SERVER}})
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("no .ci.yaml here", {"src.txt": "x\n"})
    c.observer(repo)
    builds = of(c.wait_builds(lambda b: finished(of(b, sha)), "the commit's build"), sha)
    assert [(b["job"], b["status"], b["repo"]) for b in builds] == [("from-server", "passed", str(repo.path))]
    log = c.log(builds[0]["id"])
    assert "1 step(s) from the dispatcher's pipeline for this repository (job from-server)" in log, log
    assert "server-step job=from-server" in log


@pytest.mark.parametrize("override", [False, True])
def test_the_commits_ci_yaml_wins_unless_the_pipeline_overrides(cluster, repo, override):
    c = cluster(extra={"pipelines": {str(repo.path): {**SERVER, "override": override}}})
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("own file", {".ci.yaml": "jobs:\n  from-file: {steps: ['echo file-step']}\n"})
    c.observer(repo)
    builds = of(c.wait_builds(lambda b: finished(of(b, sha)), "the commit's build"), sha)
    log = c.log(builds[0]["id"])
    if override:
        assert [(b["job"], b["status"]) for b in builds] == [("from-server", "passed")]
        assert "server-step" in log and "file-step" not in log, log
    else:
        assert [(b["job"], b["status"]) for b in builds] == [("from-file", "passed")]
        assert "file-step" in log and "server-step" not in log, log
    # a manual trigger chooses the same way
    assert tinyci("trigger", sha, "--dispatcher", c.disp.addr).returncode == 0
    again = of(c.wait_builds(lambda b: len(of(b, sha)) == 2 and finished(of(b, sha)), "the trigger"), sha)
    assert again[1]["job"] == builds[0]["job"] and again[1]["status"] == "passed"


SECRET_JOBS = """\
jobs:
  publish:
    secrets: [PYPI_TOKEN]
    steps:
      - echo "token=$PYPI_TOKEN"
      # two writes with a pause between: the runner reads the value in two pieces
      - python -c "import os, sys, time; v = os.environ['PYPI_TOKEN']; sys.stdout.write('split=' + v[:10]); sys.stdout.flush(); time.sleep(0.3); print(v[10:])"
      - printf %s "$PYPI_TOKEN" | base64
  test:
    steps:
      - echo "seen=[${PYPI_TOKEN:-none}] other=[${OTHER_TOKEN:-none}]"
"""


def all_bytes_under(root: Path, skip: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file() and p != skip]


def test_a_secret_reaches_only_the_job_that_asked_masked_everywhere(cluster, repo, tmp_path):
    c = cluster(extra={"secrets": {"PYPI_TOKEN": {"value": TOKEN, "branches": ["main"]},
                                   "OTHER_TOKEN": UNUSED}})
    c.dispatcher()
    c.runner("r1")
    sha = repo.commit("publish", {".ci.yaml": SECRET_JOBS})
    repo.git("checkout", "-q", "-b", "feature")
    feature = repo.commit("on a branch", {"f.txt": "x\n"})
    repo.git("checkout", "-q", "main")
    c.observer(repo)
    builds = c.wait_builds(lambda b: finished(of(b, sha)) and finished(of(b, feature)) and len(of(b, feature)) == 2,
                           "both commits")
    publish, test = of(builds, sha)
    assert (publish["job"], publish["status"], test["job"], test["status"]) == ("publish", "passed", "test", "passed")

    # the job that asked sees the value; its log has *** wherever the exact value was, even split
    log = c.log(publish["id"])
    assert TOKEN not in log
    assert "token=***\n" in log and "split=***\n" in log, log
    assert base64.b64encode(TOKEN.encode()).decode() in log       # only the exact value is masked
    # the job that did not ask sees neither secret
    assert "seen=[none] other=[none]" in c.log(test["id"])

    # a branch the secret is not allowed on: the job that asks fails without running; the other runs
    denied, plain = of(builds, feature)
    assert (denied["job"], denied["status"], denied["runner"]) == ("publish", "error", None)
    assert "secret PYPI_TOKEN is not allowed on branch feature" in c.log(denied["id"])
    assert (plain["job"], plain["status"]) == ("test", "passed")

    # the tools and the web page show the masked log
    shown = tinyci("log", str(publish["id"]), "--dispatcher", c.disp.addr)
    assert shown.returncode == 0 and "token=***" in shown.stdout and TOKEN not in shown.stdout
    raw = tinyci("log", "--raw", str(publish["id"]), "--dispatcher", c.disp.addr)
    assert "token=***" in raw.stdout and TOKEN not in raw.stdout
    _, site = start_web(c)
    page = site.ok(f"/builds/{publish['id']}/log").text
    assert "token=***" in page and TOKEN not in page
    status = tinyci("status", "--json", "--dispatcher", c.disp.addr)
    assert status.returncode == 0 and json.loads(status.stdout)["builds"]
    assert TOKEN not in status.stdout and UNUSED not in status.stdout

    # nowhere on disk but the configuration: not the database (nor its WAL), the stored
    # logs, the runner's outbox and clones, the daemons' own logs
    files = all_bytes_under(tmp_path, skip=c.config)
    assert any(p.name == "ci.db" for p, _ in files) and any(p.suffix == ".log" for p, _ in files)
    leaks = [str(p) for p, data in files if TOKEN.encode() in data or UNUSED.encode() in data]
    assert leaks == []
