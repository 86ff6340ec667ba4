"""Commit intake as plain code: what a commit, a trigger or a rebuild turns into."""

from __future__ import annotations

import pytest

from ci import intake
from ci.intake import Request
from ci.models import Build, Status

SHA = "c" * 40


def build(n, status=Status.QUEUED, branch="feat", repo="/repo", reason="commit", job="", labels=()):
    return Build(n, repo, branch, SHA, subject="s", status=status, reason=reason, job=job, labels=labels)


def test_skip_markers_in_any_case_anywhere_in_the_message():
    assert intake.skip_marker("docs [Skip CI]") == "[skip ci]"
    assert intake.skip_marker("typo\n\nbody [ci skip]") == "[ci skip]"
    assert intake.skip_marker("skip ci, please") is None


def test_jobs_from_the_ci_yaml_text():
    assert intake.jobs_from(None) == (intake.DEFAULT_JOBS, "")
    jobs, problem = intake.jobs_from(b"jobs:\n  a: {labels: [x], steps: [make]}\n  b: {steps: [make]}\n")
    assert (jobs, problem) == ([{"name": "a", "labels": ["x"]}, {"name": "b", "labels": []}], "")
    jobs, problem = intake.jobs_from(b"steps:\n  - run: [1]\n")
    assert jobs == intake.DEFAULT_JOBS and problem.startswith(".ci.yaml line 2")
    assert intake.jobs_from(b"steps: [\xff]") == (intake.DEFAULT_JOBS, ".ci.yaml: is not UTF-8 text")


def test_one_row_per_job_or_one_final_build():
    jobs = [{"name": "a", "labels": ["x"]}, {"name": "b", "labels": []}]
    rows = Request("/repo", "main", SHA, jobs=jobs).rows()
    assert [(r["job"], r["labels"], r["status"]) for r in rows] == [("a", ("x",), Status.QUEUED),
                                                                   ("b", (), Status.QUEUED)]
    skipped = Request("/repo", "main", SHA, jobs=jobs, skip="[skip ci]").rows()
    assert [(r["job"], r["status"]) for r in skipped] == [("", Status.SKIPPED)]
    broken = Request("/repo", "main", SHA, jobs=jobs, config_error="bad").rows()
    assert [(r["job"], r["status"]) for r in broken] == [("", Status.ERROR)]
    # skip wins over a broken file: nothing is built either way
    assert Request("/r", "main", SHA, skip="[ci skip]", config_error="bad").status is Status.SKIPPED


def test_needs_are_stored_and_a_job_when_rules_out_is_one_skipped_build():
    jobs = [{"name": "t (python=3.11)", "labels": ["py3.11"]},
            {"name": "lint", "labels": [], "needs": ["t (python=3.11)"]},
            {"name": "docs", "labels": [], "skip": "branch feat is not among when.branches (main)"}]
    request = Request("/repo", "feat", SHA, jobs=jobs)
    rows = request.rows()
    assert [(r["job"], r["needs"], r["status"]) for r in rows] == [
        ("t (python=3.11)", (), Status.QUEUED), ("lint", ("t (python=3.11)",), Status.QUEUED),
        ("docs", (), Status.SKIPPED)]
    assert request.lines(build(3, job="docs")) == [
        "=== skipped: branch feat is not among when.branches (main) (.ci.yaml when) ==="]
    assert request.lines(build(2, job="lint")) == []
    # a trigger reads the jobs without a branch or changes: `when` skips nothing there
    jobs, _ = intake.jobs_from(b"jobs:\n  a: {steps: [make], when: {branches: [main]}}\n")
    assert jobs == [{"name": "a", "labels": []}]


def test_the_lines_a_new_build_starts_with():
    new = build(4)
    assert Request("/r", "main", SHA).lines(new) == []
    assert Request("/r", "main", SHA, note="manual").lines(new) == ["=== manual ==="]
    assert Request("/r", "main", SHA, config_error="bad").lines(new) == ["=== build error: bad ==="]
    skipped = Request("/r", "main", SHA, skip="[skip ci]", note="rebuild of 3").lines(new)
    assert skipped[0] == "=== rebuild of 3 ===" and f"`tinyci trigger {SHA[:12]}`" in skipped[1]


def test_admit_queues_the_new_builds_and_reports_the_broken():
    queued = Request("/r", "feat", SHA)
    out = intake.admit(queued, [build(5), build(6)], [], supersede=[])
    assert [b.id for b in out.queue] == [5, 6] and out.failed == [] and out.lines == []
    broken = Request("/r", "feat", SHA, config_error="bad")
    failed = build(7, status=Status.ERROR)
    out = intake.admit(broken, [failed], [], supersede=[])
    assert out.queue == [] and out.failed == [failed] and out.lines == [(7, "=== build error: bad ===")]
    assert intake.admit(queued, [], [build(1)], supersede=["*"]).supersede == []     # a duplicate: nothing new


def test_supersede_takes_only_older_queued_commit_builds_of_the_branch_and_repo():
    active = [build(1), build(2, status=Status.RUNNING), build(3, branch="main"), build(4, repo="/other"),
              build(5, reason="manual"), build(0)]
    out = intake.admit(Request("/repo", "feat", SHA), [build(9)], active, supersede=["fe*"])
    assert [old.id for old, _ in out.supersede] == [0, 1]
    assert out.supersede[0][1] == f"=== cancelled: superseded by build 9, a newer commit ({SHA[:12]}) of feat ==="
    assert intake.admit(Request("/repo", "feat", SHA), [build(9)], active, supersede=["main"]).supersede == []
    manual = Request("/repo", "feat", SHA, reason="manual")
    assert intake.admit(manual, [build(9)], active, supersede=["*"]).supersede == []


def test_pipelines_roll_up_the_newest_build_of_each_job():
    summaries = [b.summary() for b in (build(3, job="a", status=Status.PASSED),
                                       build(2, job="b", status=Status.FAILED),
                                       build(1, job="a", status=Status.ERROR))]
    (pipeline,) = intake.pipelines(summaries)
    assert pipeline["status"] == "failed"
    assert [(j["job"], j["build"], j["status"]) for j in pipeline["jobs"]] == [("a", 3, "passed"),
                                                                              ("b", 2, "failed")]


REPOS = {"/one": {"main": "1" * 40, "v1": "2" * 40}, "/two": {"main": "3" * 40}}


def resolve(repo, rev):
    return REPOS.get(repo, {}).get(rev)


def test_choose_repo_finds_the_one_repository_a_revision_is_in():
    assert intake.choose_repo("v1", None, ["/one", "/two"], resolve) == ("/one", "2" * 40)
    assert intake.choose_repo("main", "/two", ["/one", "/two"], resolve) == ("/two", "3" * 40)
    assert intake.choose_repo("main", None, ["/two"], resolve) == ("/two", "3" * 40)


@pytest.mark.parametrize("rev, wanted, known, code, words", [
    ("main", None, ["/one", "/two"], "ambiguous", ["/one", "/two", "--repo"]),
    ("main", "/three", ["/one", "/two"], "not_found", ["/three", "known: /one, /two"]),
    ("nope", None, ["/one", "/two"], "not_found", ["'nope'", "any of /one, /two"]),
    ("v1", "/two", ["/one", "/two"], "not_found", ["'v1'", "/two"]),
    ("main", None, [], "not_found", ["no repository known yet"]),
])
def test_choose_repo_says_why_it_cannot(rev, wanted, known, code, words):
    with pytest.raises(intake.RevisionError) as err:
        intake.choose_repo(rev, wanted, known, resolve)
    assert err.value.code == code
    for word in words:
        assert word in err.value.message


class _Pipeline:
    """What intake reads of a settings.Pipeline."""

    def __init__(self, override=False):
        self.override = override
        self.jobs = [{"name": "server", "labels": [], "secrets": ["TOKEN"]}]


def test_the_servers_pipeline_gives_the_jobs_of_a_commit_without_ci_yaml_or_when_it_overrides():
    file_jobs = [{"name": "file", "labels": []}]
    kept, overriding = _Pipeline(), _Pipeline(override=True)
    # reported by the observer: jobs (or config_error) only when the commit has the file
    assert intake.commit_jobs(None, "", None) == (intake.DEFAULT_JOBS, "")
    assert intake.commit_jobs(None, "", kept) == (kept.jobs, "")
    assert intake.commit_jobs(file_jobs, "", kept) == (file_jobs, "")
    assert intake.commit_jobs(None, "broken", kept) == (intake.DEFAULT_JOBS, "broken")
    assert intake.commit_jobs(file_jobs, "", overriding) == (overriding.jobs, "")
    assert intake.commit_jobs(None, "broken", overriding) == (overriding.jobs, "")
    # read at the commit by the dispatcher (a trigger)
    assert intake.jobs_from(None, kept) == (kept.jobs, "")
    assert intake.jobs_from(b"jobs: {file: {steps: [make]}}\n", kept)[0] == file_jobs
    assert intake.jobs_from(b"jobs: {file: {steps: [make]}}\n", overriding)[0] == overriding.jobs


def test_a_job_denied_a_secret_is_an_error_build_saying_why_and_the_others_queue():
    jobs = [{"name": "publish", "labels": [], "secrets": ["TOKEN", "OTHER"]},
            {"name": "test", "labels": []},
            {"name": "deploy", "labels": [], "secrets": ["OTHER"]}]

    def problem(name, branch):
        return f"secret {name} is not allowed on branch {branch}" if name == "TOKEN" else ""

    request = Request("/r", "feat", SHA, jobs=jobs).checked(problem)
    assert request.denied == {"publish": "secret TOKEN is not allowed on branch feat"}
    rows = request.rows()
    assert [(r["job"], r["status"], r["secrets"]) for r in rows] == [
        ("publish", Status.ERROR, ("TOKEN", "OTHER")), ("test", Status.QUEUED, ()),
        ("deploy", Status.QUEUED, ("OTHER",))]
    publish, test = build(8, Status.ERROR, job="publish"), build(9, job="test")
    assert request.lines(publish) == ["=== build error: secret TOKEN is not allowed on branch feat; not built ==="]
    assert request.lines(test) == []
    out = intake.admit(request, [publish, test], [], supersede=[])
    assert out.failed == [publish] and out.queue == [test]
    # nothing asked, nothing denied: the same request
    plain = Request("/r", "feat", SHA)
    assert plain.checked(problem) is plain


def test_a_trigger_picks_one_job_or_every_combination_of_a_matrix_job():
    text = (b"jobs:\n  test:\n    matrix: {python: ['3.10', '3.11']}\n    steps: [pytest]\n"
            b"  test-docs:\n    steps: [make docs]\n")
    jobs, problem = intake.jobs_from(text)
    assert problem == ""
    assert [j["name"] for j in intake.pick_jobs(jobs, "test", "a" * 40)] == ["test (python=3.10)", "test (python=3.11)"]
    assert [j["name"] for j in intake.pick_jobs(jobs, "test (python=3.11)", "a" * 40)] == ["test (python=3.11)"]
    assert [j["name"] for j in intake.pick_jobs(jobs, "test-docs", "a" * 40)] == ["test-docs"]
    with pytest.raises(intake.RevisionError) as missing:
        intake.pick_jobs(jobs, "tes", "a" * 40)
    assert missing.value.message == ("commit aaaaaaaaaaaa has no job 'tes' (its jobs: test (python=3.10), "
                                     "test (python=3.11), test-docs)")
