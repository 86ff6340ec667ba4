"""needs.py as plain code: the verdict on a build's needs, builds held and
released or skipped (down the graph), recovered after a restart, and the
artifacts a released build gets."""

from __future__ import annotations

from ci import needs
from ci.models import Build, Status

SHA = "a" * 40


def b(id_, job, status=Status.QUEUED, needs_=(), sha=SHA):
    return Build(id_, "/repo", "main", sha, status=status, job=job, needs=tuple(needs_))


def test_verdict_waits_runs_or_names_what_did_not_pass():
    jobs = needs.newest([b(1, "t1", Status.PASSED), b(2, "t2", Status.RUNNING)])
    assert needs.verdict(["t1"], jobs) == (needs.RUN, "")
    assert needs.verdict(["t1", "t2"], jobs) == (needs.WAIT, "t2")
    assert needs.verdict(["t3"], jobs) == (needs.SKIP, "needs t3, which was not built for this commit")
    for status, words in ((Status.FAILED, "failed"), (Status.ERROR, "ended in error"),
                          (Status.CANCELLED, "was cancelled"), (Status.SKIPPED, "was skipped")):
        ended = needs.newest([b(1, "t1", Status.PASSED), b(2, "t2", status)])
        assert needs.verdict(["t1", "t2"], ended) == (needs.SKIP, f"needs t2, which {words}")


def test_the_newest_build_of_a_job_counts():
    # a rebuild (3) of a failed job (1): its verdict is the rebuild's
    jobs = needs.newest([b(1, "t", Status.FAILED), b(3, "t", Status.QUEUED), b(2, "lint")])
    assert needs.verdict(["t"], jobs) == (needs.WAIT, "t")


def test_a_commit_without_needs_is_not_read_from_the_store():
    # the common case, on every commit's path: no query for the commit's other builds
    def unread(repo, sha):
        raise AssertionError("the commit's builds were read")

    plain = [b(1, "t1"), b(2, "t2")]
    assert needs.Held().admit(plain, unread).run == plain


def test_held_until_every_need_passed_then_released():
    held = needs.Held()
    t1, t2, lint = b(1, "t1"), b(2, "t2"), b(3, "lint", needs_=["t1", "t2"])
    decided = held.admit([t1, t2, lint], lambda repo, sha: [t1, t2, lint])
    assert decided.run == [t1, t2] and decided.skip == [] and 3 in held
    assert lint.held == "t1, t2"
    t1.status = Status.PASSED
    assert held.settle("/repo", SHA, [t1, t2, lint]).run == []
    assert lint.held == "t2"
    t2.status = Status.PASSED
    decided = held.settle("/repo", SHA, [t1, t2, lint])
    assert decided.run == [lint] and 3 not in held and lint.held == ""


def test_a_failure_skips_down_the_graph_and_other_commits_are_left_alone():
    held = needs.Held()
    t, lint, deploy = b(1, "t"), b(2, "lint", needs_=["t"]), b(3, "deploy", needs_=["lint"])
    other = b(4, "lint", needs_=["t"], sha="b" * 40)
    held.admit([t, lint, deploy], lambda repo, sha: [t, lint, deploy])
    held.admit([other], lambda repo, sha: [b(5, "t", sha="b" * 40), other])
    t.status = Status.FAILED
    decided = held.settle("/repo", SHA, [t, lint, deploy])
    assert decided.run == []
    assert decided.skip == [(lint, "needs t, which failed"), (deploy, "needs lint, which was skipped")]
    assert list(held.builds) == [4]


def test_recover_holds_again_only_what_still_waits():
    held = needs.Held()
    stored = [b(1, "t", Status.PASSED), b(2, "u", Status.RUNNING), b(3, "lint", needs_=["t"]),
              b(4, "pack", needs_=["u"]), b(5, "plain")]
    active = [x for x in stored if not x.status.final]
    load, decided = held.recover(active, lambda repo, sha: stored)
    assert [x.id for x in load] == [2, 5, 3]        # running, no needs, and lint (t passed before the crash)
    assert list(held.builds) == [4] and decided.skip == []


def test_a_cancelled_held_build_is_dropped():
    held = needs.Held()
    lint = b(2, "lint", needs_=["t"])
    held.admit([lint], lambda repo, sha: [b(1, "t"), lint])
    assert held.drop(2) is lint and lint.held == "" and held.drop(2) is None


def test_inputs_are_the_artifacts_of_the_needed_builds_newest_passed():
    commit = [b(1, "t (python=3.10)", Status.PASSED), b(2, "t (python=3.11)", Status.FAILED),
              b(3, "t (python=3.11)", Status.PASSED), b(4, "lint", needs_=["t (python=3.10)", "t (python=3.11)"])]
    listing = {1: [{"path": "dist/a.whl", "size": 3}], 2: [{"path": "old", "size": 1}],
               3: [{"path": "dist/b.whl", "size": 3}]}
    assert needs.inputs(commit[3], commit, lambda build: listing.get(build, [])) == [
        {"build": 1, "job": "t (python=3.10)", "path": "dist/a.whl"},
        {"build": 3, "job": "t (python=3.11)", "path": "dist/b.whl"}]
