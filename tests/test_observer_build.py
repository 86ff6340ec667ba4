"""observer.build: which commits of a branch that moved are reported, on real
repositories: the plan itself, and a real observer and dispatcher given a
push of merges in each mode."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ci import gitops, gitwatch
from ci.config import ConfigError, load

from conftest import Repo


def history(repo: Repo) -> dict[str, str]:
    """On a side branch `work` from main's head A: main gets M1; feature1 (F1, F2)
    and feature2 (G1) branch from A and are merged into it with --no-ff (X1, X2),
    then M2. Main itself is not moved: the caller moves it in one step, as a push does."""
    repo.git("checkout", "-q", "-b", "work", "main")
    shas = {"A": repo.head()}
    shas["M1"] = repo.commit("M1")
    repo.git("checkout", "-q", "-b", "feature1", shas["A"])
    shas["F1"] = repo.commit("F1", {"f1.txt": "1"})
    shas["F2"] = repo.commit("F2", {"f1.txt": "2"})
    repo.git("checkout", "-q", "-b", "feature2", shas["A"])
    shas["G1"] = repo.commit("G1", {"g.txt": "1"})
    repo.git("checkout", "-q", "work")
    repo.git("merge", "-q", "--no-ff", "-m", "X1", "feature1")
    shas["X1"] = repo.head()
    repo.git("merge", "-q", "--no-ff", "-m", "X2", "feature2")
    shas["X2"] = repo.head()
    shas["M2"] = repo.commit("M2")
    return shas


EXPECTED = {
    "all": ["M1", "F1", "F2", "X1", "G1", "X2", "M2"],
    "first-parent": ["M1", "X1", "X2", "M2"],
    "heads": ["M2"],
}


def _base(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path / "repo")
    repo.commit("A", {"build.sh": "exit 0\n"})
    return repo


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_plan_reports_by_build_mode(tmp_path, mode):
    repo = _base(tmp_path)
    shas = history(repo)
    repo.git("update-ref", "refs/heads/main", shas["M2"])
    clone = gitwatch.Clone(repo.path, ["main"], build=mode)
    plan = clone.plan({"main": shas["A"]})
    names = {sha: name for name, sha in shas.items()}
    got = [names[sha] for branch, sha in plan.report]
    if mode == "all":       # topological: every parent before its child, the order among siblings git's own
        assert sorted(got) == sorted(EXPECTED["all"])
        assert got.index("F1") < got.index("F2") < got.index("X1") < got.index("X2") < got.index("M2")
        assert got.index("M1") < got.index("X1") and got.index("G1") < got.index("X2")
    else:
        assert got == EXPECTED[mode]


@pytest.mark.parametrize("mode", ["first-parent", "heads"])
def test_a_new_or_force_pushed_branch_reports_its_head_in_every_mode(tmp_path, mode):
    repo = _base(tmp_path)
    shas = history(repo)
    repo.git("update-ref", "refs/heads/main", shas["M2"])
    clone = gitwatch.Clone(repo.path, ["main", "feature1"], build=mode)
    # feature1 is new to the observer; main was saved at a commit not in its history (rewritten)
    orphan = repo.git("commit-tree", repo.git("rev-parse", "main^{tree}"), "-m", "rewritten away")
    plan = clone.plan({"main": orphan})
    assert plan.report == [("feature1", shas["F2"]), ("main", shas["M2"])]
    assert plan.forced == [("main", orphan, shas["M2"])]


class _Asking(gitops.RepoReader):
    """A reader whose one-command listing always fails: plan asks its three questions instead."""

    def since(self, old, new):
        return None


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_the_one_listing_and_the_three_questions_agree(tmp_path, mode):
    """Saved at every commit of the merged history, including ones main reaches only through a
    merge's second parent: the same plan either way (a commit git does not have takes the
    three questions both times)."""
    repo = _base(tmp_path)
    shas = history(repo)
    with gitops.RepoReader(repo.path) as r:       # the listing is what the plan reads, not a None
        listed = r.since(shas["F1"], shas["M2"])
    assert listed is not None and [sha for sha, parents in listed if shas["F1"] in parents] == [shas["F2"]]
    missing = "0123456789abcdef0123456789abcdef01234567"
    for saved in [*shas.values(), missing]:
        for head in ("M2", "X1"):
            plans = []
            for reader in (gitops.RepoReader, _Asking):
                with reader(repo.path) as r:
                    plans.append(gitwatch.plan({"main": saved}, {"main": shas[head]}, r, mode))
            assert plans[0] == plans[1], (saved, head)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_annotated_tags_for_heads_are_planned_as_the_three_questions_plan_them(tmp_path, mode):
    """A remote-tracking ref can name an annotated tag (a wide refspec fetches tags there). A tag's
    sha is no commit's parent, so the listing alone would call every move a force-push."""
    repo = _base(tmp_path)
    shas = history(repo)
    for name in ("F1", "M1", "M2"):
        repo.git("tag", "-a", "-m", name, f"t-{name}", shas[name])
    tags = {name: repo.git("rev-parse", f"t-{name}") for name in ("F1", "M1", "M2")}
    cases = [(tags["F1"], shas["M2"]), (tags["M1"], tags["M2"]), (shas["A"], tags["M2"])]
    for saved, head in cases:
        plans = []
        for reader in (gitops.RepoReader, _Asking):
            with reader(repo.path) as r:
                plans.append(gitwatch.plan({"main": saved}, {"main": head}, r, mode))
        assert plans[0] == plans[1], (saved, head)
        assert plans[0].forced == [] and plans[0].report, (saved, head)


def test_a_listing_past_its_cap_takes_the_three_questions(tmp_path, monkeypatch):
    repo = _base(tmp_path)
    shas = history(repo)
    monkeypatch.setattr(gitops, "LISTED_MAX", 3)
    with gitops.RepoReader(repo.path) as r:
        assert r.since(shas["A"], shas["M2"]) is None               # seven commits
        assert len(r.since(shas["X2"], shas["M2"])) == 1
        plan = gitwatch.plan({"main": shas["A"]}, {"main": shas["M2"]}, r, "first-parent")
    names = {sha: name for name, sha in shas.items()}
    assert [names[sha] for _, sha in plan.report] == EXPECTED["first-parent"]


def test_a_saved_commit_the_clone_lost_or_a_branch_moved_back_reports_the_head_as_forced(tmp_path):
    repo = _base(tmp_path)
    shas = history(repo)
    gone = "0123456789abcdef0123456789abcdef01234567"
    with gitops.RepoReader(repo.path) as r:
        for saved, head in ((gone, "M2"), (shas["M2"], "X1")):     # a pruned commit; a reset back
            plan = gitwatch.plan({"main": saved}, {"main": shas[head]}, r, "all")
            assert plan.report == [("main", shas[head])]
            assert plan.forced == [("main", saved, shas[head])]


def test_unknown_build_mode_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("observer:\n  build: merges\n")
    with pytest.raises(ConfigError, match=r"config.yaml: observer.build must be one of all, first-parent, heads"):
        load(config)
    with pytest.raises(ValueError, match="unknown build mode"):
        gitwatch.plan({}, {}, None, "merges")


def test_fetch_interval_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="TINYCI_OBSERVER_FETCH_INTERVAL|observer.fetch_interval"):
        load(None, env={"TINYCI_OBSERVER_FETCH_INTERVAL": "-1"})
    assert load(None, env={}).observer.fetch_interval == 0.0


# ---------------------------------------------------------------- real daemons

@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_a_push_of_merges_is_built_by_mode(tmp_path, cluster, mode):
    repo = _base(tmp_path)
    c = cluster(extra={"observer": {"build": mode}})
    c.dispatcher()
    c.observer(SimpleNamespace(path=repo.path), "--branches", "main", interval=0.2)
    base = repo.head("main")
    c.wait_builds(lambda builds: any(b["sha"] == base for b in builds), "the build of the first head")
    shas = history(repo)
    repo.git("update-ref", "refs/heads/main", shas["M2"])       # the push: main moves once, by seven commits
    c.wait_builds(lambda builds: any(b["sha"] == shas["M2"] for b in builds), "the build of the new head")
    # M2 is reported last in every mode, and the observer reports in order, one at a time:
    # every build this push will ever make exists now
    names = {sha: name for name, sha in shas.items()}
    built = sorted(names[b["sha"]] for b in c.builds() if b["sha"] != base)
    assert built == sorted(EXPECTED[mode])
    assert all(b["branch"] == "main" for b in c.builds())


# ---------------------------------------------------------------- many branches: one listing per look

def test_each_look_sees_every_change_of_the_listing(tmp_path):
    """The heads are kept from the last look and only the listing's changed lines
    are read again: a moved, a deleted, a new and an unwatched branch all show."""
    repo = _base(tmp_path)
    for i in range(50):
        repo.git("branch", f"b{i:02d}")
    repo.git("branch", "other/x")
    repo.git("pack-refs", "--all")
    clone = gitwatch.Clone(repo.path, ["main", "b*"])
    base = repo.head()
    saved = {"main": base, **{f"b{i:02d}": base for i in range(50)}}
    assert clone.plan(saved).report == []
    assert clone.plan(saved).report == []               # the same listing again
    moved = repo.git("commit-tree", repo.git("rev-parse", "main^{tree}"), "-p", base, "-m", "moved")
    repo.git("update-ref", "refs/heads/b07", moved)
    repo.git("update-ref", "-d", "refs/heads/b13")
    repo.git("update-ref", "refs/heads/b99", moved)
    repo.git("update-ref", "refs/heads/other/y", moved)
    plan = clone.plan(saved)
    assert plan.report == [("b07", moved), ("b99", moved)]
    assert plan.dropped == [("b13", base)]
    saved = {**saved, "b07": moved, "b99": moved}
    del saved["b13"]
    assert clone.plan(saved) == gitwatch.ScanPlan()
    repo.git("update-ref", "refs/heads/b07", base)       # moved back (a force-push)
    plan = clone.plan(saved)
    assert plan.forced == [("b07", moved, base)] and plan.report == [("b07", base)]


@pytest.mark.slow
def test_without_a_poke_the_remote_is_fetched_every_fetch_interval(tmp_path, cluster):
    upstream = _base(tmp_path)
    clone = tmp_path / "clone"
    upstream.git("clone", "-q", str(upstream.path), str(clone))
    c = cluster(extra={"observer": {"fetch": True, "fetch_interval": 0.5}})
    c.dispatcher()
    c.observer(SimpleNamespace(path=clone), interval=0.1)
    first = upstream.head()
    c.wait_builds(lambda builds: any(b["sha"] == first for b in builds), "the build of the first head")
    new = upstream.commit("upstream moved")
    c.wait_builds(lambda builds: any(b["sha"] == new for b in builds), "the fetched commit's build")
