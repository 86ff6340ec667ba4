"""Checking a commit out in a slot's working clone, against real git
repositories in tmp_path: a fresh clone, two git commands when the clone has
the commit, origin following the repository, a commit the repository lacks,
a damaged clone made again, the time limit, and a stop while git runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ci.attempt import Stopped
from ci.buildlog import BuildLog
from ci.checkout import Checkout, CheckoutError

from conftest import Repo
from runner_support import wait_until

MISSING = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def project(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path / "repo")
    repo.commit("first", {"README": "a project without tests\n"})
    return repo


class Slot:
    """One slot's clone; ``checkout`` runs one Checkout and returns what it logged."""

    def __init__(self, tmp_path: Path):
        self.clone = tmp_path / "checkouts" / "0"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.runs = 0

    def checkout(self, repo: Path | str, sha: str, limit: float = 60, deadline: float | None = None) -> str:
        self.runs += 1
        buildlog = BuildLog(self.logs / f"{self.runs}.log")

        async def go() -> None:
            checkout = Checkout(self.clone, buildlog, asyncio.Event(), limit)
            await checkout.run(str(repo), sha, time.monotonic() + limit if deadline is None else deadline)

        try:
            asyncio.run(go())
        finally:
            buildlog.close()
        return self.log()

    def log(self) -> str:
        return (self.logs / f"{self.runs}.log").read_text()


@pytest.fixture
def slot(tmp_path: Path) -> Slot:
    return Slot(tmp_path)


def test_a_fresh_clone_then_two_git_commands_while_the_clone_has_the_commit(project, slot, tmp_path,
                                                                             monkeypatch):
    sha = project.head()
    text = slot.checkout(project.path, sha)
    assert "$ git clone --no-checkout -- " in text and f"$ git checkout --force --detach {sha}" in text
    assert (slot.clone / "README").exists()
    assert Repo(slot.clone).head() == sha
    (slot.clone / "left-behind").write_text("from the last build\n")

    # the commit is in the clone already: checkout and clean, no fetch; the leftovers are gone
    trace = tmp_path / "git.trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    text = slot.checkout(project.path, sha)
    monkeypatch.delenv("GIT_TRACE")
    commands = [line.split("trace: built-in: ", 1)[1] for line in trace.read_text().splitlines()
                if "trace: built-in: " in line]
    assert commands == [f"git checkout --force --detach {sha}", "git clean -ffdx"], commands
    assert "git fetch" not in text and "git clone" not in text
    assert not (slot.clone / "left-behind").exists()


def test_origin_follows_the_repository(project, slot, tmp_path):
    sha = project.head()
    moved = Repo(tmp_path / "moved")
    moved.git("pull", "-q", str(project.path), "main")
    second = moved.commit("second", {"new.txt": "only in the moved repository\n"})
    slot.checkout(project.path, sha)

    # another address with a commit the clone lacks: origin follows, then it fetches
    text = slot.checkout(moved.path, second)
    assert f"$ git remote set-url origin {moved.path}" in text and "$ git fetch" in text
    assert Repo(slot.clone).git("config", "--get", "remote.origin.url") == str(moved.path)
    assert (slot.clone / "new.txt").exists()

    # back to the first address, commit present: origin set back, still no fetch
    text = slot.checkout(project.path, sha)
    assert "git fetch" not in text
    assert Repo(slot.clone).git("config", "--get", "remote.origin.url") == str(project.path)
    assert not (slot.clone / "new.txt").exists()


def test_a_removed_origin_is_added_again(project, slot):
    sha = project.head()
    slot.checkout(project.path, sha)
    Repo(slot.clone).git("remote", "remove", "origin")
    text = slot.checkout(project.path, sha)
    assert f"$ git remote add origin {project.path}" in text
    assert Repo(slot.clone).git("config", "--get", "remote.origin.url") == str(project.path)


def test_a_commit_the_repository_lacks(project, slot):
    slot.checkout(project.path, project.head())
    # the same clone, fetched again: branches, tags, then the commit itself
    with pytest.raises(CheckoutError, match=f"commit {MISSING} is not in {project.path} "
                                            r"\(fetched its branches, its tags and the commit itself\)"):
        slot.checkout(project.path, MISSING)
    assert "$ git fetch --force --prune --tags origin" in slot.log()
    assert f"$ git fetch --force origin {MISSING}" in slot.log()


def test_a_clone_a_crash_left_damaged_is_cloned_again(project, slot):
    sha = project.head()
    slot.checkout(project.path, sha)
    (slot.clone / ".git" / "index.lock").write_text("")
    (slot.clone / ".git" / "HEAD").write_text("garbage\n")
    text = slot.checkout(project.path, sha)
    assert f"the working clone {slot.clone} is damaged; cloning it again" in text
    assert "$ git clone" in text
    assert Repo(slot.clone).head() == sha


def test_a_bad_address_a_failed_clone_and_the_time_limit(project, slot, tmp_path):
    with pytest.raises(CheckoutError, match="bad repository address '-upload-pack=evil'"):
        slot.checkout("-upload-pack=evil", project.head())
    with pytest.raises(CheckoutError, match=f"git clone of {tmp_path / 'nowhere'} failed: "):
        slot.checkout(tmp_path / "nowhere", project.head())
    with pytest.raises(CheckoutError, match="timed out after 5 s"):
        slot.checkout(project.path, project.head(), limit=5, deadline=time.monotonic() - 1)
    assert not slot.clone.exists()


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_a_stop_ends_the_checkout_at_once_but_git_keeps_the_clone_until_it_ends(tmp_path, monkeypatch):
    # an ssh "transport" that takes its time and fails: a clone that is slow to answer
    monkeypatch.setenv("GIT_SSH_COMMAND", "sleep 1.5; false")
    monkeypatch.setenv("GIT_SSH_VARIANT", "simple")
    buildlog = BuildLog(tmp_path / "stop.log")
    stop = asyncio.Event()

    async def scenario() -> None:
        checkout = Checkout(tmp_path / "checkouts" / "0", buildlog, stop, 60)
        task = asyncio.ensure_future(checkout.run("ssh://example.invalid/repo", MISSING, time.monotonic() + 60))
        await wait_until(lambda: "$ git clone" in (tmp_path / "stop.log").read_text(), "git clone to start")
        stop.set()
        with pytest.raises(Stopped):
            await asyncio.wait_for(task, 1.0)       # at once, not when git is done
        assert checkout.lingering is not None and not checkout.lingering.done()
        done = await asyncio.wait_for(checkout.lingering, 10)
        assert not done.ok
        # stopped before it starts: no git command at all
        with pytest.raises(Stopped):
            await checkout.run("ssh://example.invalid/repo", MISSING, time.monotonic() + 60)

    try:
        asyncio.run(scenario())
    finally:
        buildlog.close()
    assert (tmp_path / "stop.log").read_text().count("$ git") == 1
