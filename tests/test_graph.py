""".ci.yaml matrix, needs and when end to end, with the real daemons and real
git repositories: a matrix job's builds, a job that needs them (skipped with
the reason when one fails; run with their artifacts in its checkout when all
pass; still waiting across a dispatcher restart), and a job `when.paths`
keeps from running on a docs-only commit."""

from __future__ import annotations

import json

from conftest import finished, free_port, tinyci

# test runs once per python value; a value listed in FAIL fails. Each writes
# an artifact lint reads from its own checkout.
GRAPH = """\
artifacts: ["out/*"]
jobs:
  test:
    matrix: {python: ["3.10", "3.11"]}
    labels: ["py${{ matrix.python }}"]
    steps:
      - mkdir -p out && echo "made by $MATRIX_PYTHON" > "out/test-$MATRIX_PYTHON.txt"
      - test ! -e "fail-$MATRIX_PYTHON"
  lint:
    needs: [test]
    steps:
      - cat out/test-3.10.txt out/test-3.11.txt
      - rm -rf out
"""


def of(builds, sha):
    return {b["job"]: b for b in builds if b["sha"] == sha}


def status_of(c):
    return json.loads(tinyci("status", "--json", "--dispatcher", c.disp.addr).stdout)


def test_lint_is_skipped_with_the_reason_when_one_combination_fails(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1", "--labels", "py3.10,py3.11")
    sha = repo.commit("one combination fails", {".ci.yaml": GRAPH, "fail-3.11": ""})
    c.observer(repo)
    builds = of(c.wait_builds(lambda b: len(of(b, sha)) == 3 and finished(list(of(b, sha).values())),
                              "the three builds to end"), sha)
    assert {job: b["status"] for job, b in builds.items()} == {
        "test (python=3.10)": "passed", "test (python=3.11)": "failed", "lint": "skipped"}
    assert builds["test (python=3.10)"]["labels"] == ["py3.10"]
    assert builds["lint"]["runner"] is None                  # never handed to a runner
    assert builds["lint"]["needs"] == ["test (python=3.10)", "test (python=3.11)"]
    assert "skipped: needs test (python=3.11), which failed" in c.log(builds["lint"]["id"])
    pipeline = next(p for p in status_of(c)["pipelines"] if p["sha"] == sha)
    assert pipeline["status"] == "failed"


def test_lint_runs_once_every_combination_passed_with_their_artifacts(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1", "--labels", "py3.10,py3.11")
    sha = repo.commit("all pass", {".ci.yaml": GRAPH})
    c.observer(repo)
    builds = of(c.wait_builds(lambda b: len(of(b, sha)) == 3 and finished(list(of(b, sha).values())),
                              "the three builds to end"), sha)
    assert {job: b["status"] for job, b in builds.items()} == {
        "test (python=3.10)": "passed", "test (python=3.11)": "passed", "lint": "passed"}
    lint = c.log(builds["lint"]["id"])
    # test's artifacts were fetched into lint's checkout before its steps, and read there
    assert f"input out/test-3.10.txt of build {builds['test (python=3.10)']['id']} (test (python=3.10))" in lint
    assert "made by 3.10" in lint and "made by 3.11" in lint
    assert builds["lint"]["started_at"] >= max(builds[j]["finished_at"] for j in builds if j != "lint")
    test_log = c.log(builds["test (python=3.11)"]["id"])
    assert ".ci.yaml (job test (python=3.11))" in test_log


def test_a_waiting_build_waits_on_across_a_dispatcher_restart(cluster, repo):
    c = cluster()
    port = free_port()
    c.dispatcher(port=port)
    sha = repo.commit("no runner yet", {".ci.yaml": GRAPH})
    c.observer(repo)
    c.wait_builds(lambda b: len(of(b, sha)) == 3, "the three builds to be recorded")
    lint = of(c.builds(), sha)["lint"]
    assert lint["status"] == "queued"
    assert lint["held"] == "test (python=3.10), test (python=3.11)"
    table = tinyci("status", "--dispatcher", c.disp.addr).stdout
    assert f"#{lint['id']} waits: waiting for test (python=3.10), test (python=3.11) (needs)" in table, table

    assert c.disp.stop() == 0
    c.dispatcher(port=port)
    data = c.status()
    lint = next(b for b in data["builds"] if b["id"] == lint["id"])
    assert lint["status"] == "queued" and lint["waiting"].startswith("waiting for test (python=3.10)")
    assert lint["id"] in data["queue"]

    c.runner("r1", "--labels", "py3.10,py3.11")
    builds = of(c.wait_builds(lambda b: finished(list(of(b, sha).values())), "the builds to end after the restart"),
                sha)
    assert {job: b["status"] for job, b in builds.items()} == {
        "test (python=3.10)": "passed", "test (python=3.11)": "passed", "lint": "passed"}


WHEN = """\
jobs:
  test:
    when: {paths: ["src/*"]}
    steps: [echo testing]
  docs:
    steps: [echo docs]
"""


def test_when_paths_skips_a_job_for_a_docs_only_commit(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    repo.commit("setup", {".ci.yaml": WHEN, "src/app.py": "x = 1\n"})
    c.observer(repo)
    c.wait_builds(lambda b: len(b) == 2 and finished(b), "the first commit's builds")
    docs = repo.commit("docs only", {"docs/guide.md": "# read me\n"})
    code = repo.commit("code", {"src/app.py": "x = 2\n"})
    builds = c.wait_builds(lambda b: len(of(b, docs)) == 2 and len(of(b, code)) == 2 and finished(b),
                           "both commits' builds")
    assert {job: b["status"] for job, b in of(builds, docs).items()} == {"test": "skipped", "docs": "passed"}
    assert {job: b["status"] for job, b in of(builds, code).items()} == {"test": "passed", "docs": "passed"}
    log = c.log(of(builds, docs)["test"]["id"])
    assert "skipped: no changed path matches when.paths (src/*) (.ci.yaml when)" in log
