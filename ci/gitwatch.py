"""The observer's git side: read a clone's branch heads and decide which
commits to report. No sockets, no asyncio: the observer runs these blocking
calls in a worker thread, and tests call them directly. Git itself is read
through ``gitops.RepoReader``; this module holds only the decisions.

``plan`` is the whole decision, written against a tiny ``History`` interface
so the rules read in one place:

- a branch seen for the first time reports only its head, not its history;
- a branch that moved forward reports every new commit, oldest first;
- a branch whose saved commit is no longer in its history (force-push, or
  the commit was pruned) reports only its new head;
- a branch that is gone (or no longer matches the patterns) is forgotten.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol

from . import buildfile, gitops

SUBJECT_MAX = 4096     # the protocol's text limit (protocol.TEXT)


@dataclass(frozen=True)
class Commit:
    """One commit to report, with what the dispatcher records about it."""

    branch: str
    sha: str
    author: str         # "Name <email>"
    subject: str        # first line of the message
    time: int           # committer time, epoch seconds
    message: str = ""   # the whole message (for [skip ci]), cut to SUBJECT_MAX
    jobs: list | None = None    # .ci.yaml's jobs [{name, labels}]; None without the file
    config_error: str = ""      # why .ci.yaml at this commit is unusable


@dataclass
class ScanPlan:
    """What one scan reports, and what it noticed on the way."""

    report: list[tuple[str, str]] = field(default_factory=list)        # (branch, sha) in sending order
    forced: list[tuple[str, str, str]] = field(default_factory=list)   # (branch, saved, new head)
    dropped: list[tuple[str, str]] = field(default_factory=list)       # (branch, saved)


class History(Protocol):
    def has_commit(self, sha: str) -> bool: ...
    def is_ancestor(self, old: str, new: str) -> bool: ...
    def commits_between(self, old: str, new: str) -> list[str]: ...   # old..new, oldest first


def plan(saved: Mapping[str, str], heads: Mapping[str, str], history: History) -> ScanPlan:
    """What to report, given the last acknowledged commit per branch and the current heads."""
    result = ScanPlan()
    for branch in sorted(saved.keys() - heads.keys()):
        result.dropped.append((branch, saved[branch]))
    for branch in sorted(heads):
        head, old = heads[branch], saved.get(branch)
        if old == head:
            continue
        if old is None:
            result.report.append((branch, head))
        elif history.has_commit(old) and history.is_ancestor(old, head):
            result.report.extend((branch, sha) for sha in history.commits_between(old, head))
        else:
            result.forced.append((branch, old, head))
            result.report.append((branch, head))
    return result


def matches(branch: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(branch, pattern) for pattern in patterns)


class Clone:
    """One watched clone (bare or not); every method opens it afresh, so a
    gc or a repack between scans never leaves us holding stale handles."""

    def __init__(self, path: Path, patterns: Iterable[str] = ("*",), remote: str | None = None):
        self.path = path
        self.patterns = tuple(patterns)
        self.remote = remote     # watch refs/remotes/<remote>/* instead of refs/heads/*

    @staticmethod
    def problem(path: Path) -> str | None:
        """Why ``path`` cannot be watched, or None."""
        if not path.exists():
            return f"{path} does not exist"
        if not path.is_dir():
            return f"{path} is not a directory, so not a git repository"
        if not gitops.is_repository(path):
            return f"{path} is not a git repository"
        return None

    def remote_url(self) -> str:
        """The fetch URL of the watched remote, absolute when it names a local directory."""
        with gitops.RepoReader(self.path) as repo:
            url = repo.remote_url(self.remote)
        if "://" in url or ":" in url.split("/", 1)[0]:
            return url                       # a URL or scp-like host:path
        local = Path(url) if os.path.isabs(url) else self.path / url
        return str(local.resolve())

    def read(self, saved: Mapping[str, str]) -> tuple[ScanPlan, list[Commit]]:
        """The plan for ``saved`` against the current heads, and the commits it reports.
        Raises GitReadError when the clone cannot be read just now."""
        with gitops.RepoReader(self.path) as repo:
            result = plan(saved, self._heads(repo), repo)
            commits = [_describe(repo.commit(sha, buildfile.FILENAME), branch) for branch, sha in result.report]
        return result, commits

    def _heads(self, repo: gitops.RepoReader) -> dict[str, str]:
        prefix = f"refs/remotes/{self.remote}/" if self.remote else "refs/heads/"
        heads = {}
        for ref, sha in repo.refs(prefix):
            branch = ref[len(prefix):]
            if self.remote and branch == "HEAD":
                continue           # the remote's default-branch pointer, not a branch
            if matches(branch, self.patterns):
                heads[branch] = sha
        return heads


def _describe(facts: gitops.CommitFacts, branch: str) -> Commit:
    message = facts.message
    subject = message.split("\n", 1)[0].rstrip("\r")
    jobs, problem = None, ""
    if facts.file_kind and facts.file_kind != "blob":
        problem = f"{buildfile.FILENAME}: is not a file"
    elif facts.file is not None:
        try:
            jobs = buildfile.parse(facts.file.decode("utf-8")).job_list()
        except UnicodeDecodeError:
            problem = f"{buildfile.FILENAME}: is not UTF-8 text"
        except buildfile.BuildFileError as exc:
            problem = str(exc)[:SUBJECT_MAX]
    return Commit(branch=branch, sha=facts.sha, author=facts.author[:SUBJECT_MAX],
                  subject=subject[:SUBJECT_MAX], time=facts.time,
                  message=message[:SUBJECT_MAX], jobs=jobs, config_error=problem)
