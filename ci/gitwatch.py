"""The observer's git side: read a clone's branch heads and decide which
commits to report. No sockets, no asyncio: the observer runs these blocking
calls in a worker thread, and tests call them directly.

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

import git
import gitdb.exc

from . import buildfile

SUBJECT_MAX = 4096     # the protocol's text limit (protocol.TEXT)


class GitReadError(Exception):
    """The clone could not be read just now (a lock, a gc, a broken ref); try again later."""


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
class Plan:
    report: list[tuple[str, str]] = field(default_factory=list)        # (branch, sha) in sending order
    forced: list[tuple[str, str, str]] = field(default_factory=list)   # (branch, saved, new head)
    dropped: list[tuple[str, str]] = field(default_factory=list)       # (branch, saved)


class History(Protocol):
    def has_commit(self, sha: str) -> bool: ...
    def is_ancestor(self, old: str, new: str) -> bool: ...
    def commits_between(self, old: str, new: str) -> list[str]: ...   # old..new, oldest first


def plan(saved: Mapping[str, str], heads: Mapping[str, str], history: History) -> Plan:
    """What to report, given the last acknowledged commit per branch and the current heads."""
    result = Plan()
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


class _RepoHistory:
    def __init__(self, repo: git.Repo):
        self.repo = repo

    def has_commit(self, sha: str) -> bool:
        try:
            self.repo.git.cat_file("-e", f"{sha}^{{commit}}")
            return True
        except git.GitCommandError:
            return False

    def is_ancestor(self, old: str, new: str) -> bool:
        return self.repo.is_ancestor(old, new)

    def commits_between(self, old: str, new: str) -> list[str]:
        # --topo-order: parents always before children even when clocks disagree
        out = self.repo.git.rev_list("--reverse", "--topo-order", f"{old}..{new}")
        return out.split()


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
        try:
            git.Repo(path).close()
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            return f"{path} is not a git repository"
        return None

    def remote_url(self) -> str:
        """The fetch URL of the watched remote, absolute when it names a local directory."""
        with self._open() as repo:
            try:
                url = repo.git.remote("get-url", self.remote)
            except git.GitError as exc:
                raise GitReadError(f"{self.path} has no remote {self.remote!r}: {_why(exc)}") from None
        if "://" in url or ":" in url.split("/", 1)[0]:
            return url                       # a URL or scp-like host:path
        local = Path(url) if os.path.isabs(url) else self.path / url
        return str(local.resolve())

    def read(self, saved: Mapping[str, str]) -> tuple[Plan, list[Commit]]:
        """The plan for ``saved`` against the current heads, and the commits it reports."""
        with self._open() as repo:
            try:
                heads = self._heads(repo)
                result = plan(saved, heads, _RepoHistory(repo))
                commits = [_describe(repo, branch, sha) for branch, sha in result.report]
            except (git.GitError, gitdb.exc.ODBError, OSError, ValueError) as exc:
                raise GitReadError(f"cannot read {self.path}: {_why(exc)}") from None
        return result, commits

    def _open(self) -> git.Repo:
        try:
            return git.Repo(self.path)
        except git.NoSuchPathError:
            raise GitReadError(f"{self.path} does not exist (any more)") from None
        except git.InvalidGitRepositoryError:
            raise GitReadError(f"{self.path} is not a git repository (any more)") from None
        except (git.GitError, OSError) as exc:
            raise GitReadError(f"cannot open {self.path}: {_why(exc)}") from None

    def _heads(self, repo: git.Repo) -> dict[str, str]:
        prefix = f"refs/remotes/{self.remote}/" if self.remote else "refs/heads/"
        out = repo.git.for_each_ref("--format=%(objectname) %(refname)", prefix)
        heads = {}
        for line in out.splitlines():
            sha, _, ref = line.partition(" ")
            branch = ref[len(prefix):]
            if self.remote and branch == "HEAD":
                continue           # the remote's default-branch pointer, not a branch
            if matches(branch, self.patterns):
                heads[branch] = sha
        return heads


def _describe(repo: git.Repo, branch: str, sha: str) -> Commit:
    commit = repo.commit(sha)
    message = commit.message
    if isinstance(message, bytes):     # gitpython leaves undecodable messages as bytes
        message = message.decode("utf-8", "replace")
    subject = message.split("\n", 1)[0].rstrip("\r")
    author = f"{commit.author.name} <{commit.author.email}>"
    jobs, problem = None, ""
    try:
        blob = commit.tree / buildfile.FILENAME
    except KeyError:
        blob = None
    if blob is not None and blob.type != "blob":
        problem = f"{buildfile.FILENAME}: is not a file"
    elif blob is not None:
        try:
            jobs = buildfile.parse(blob.data_stream.read().decode("utf-8")).job_list()
        except UnicodeDecodeError:
            problem = f"{buildfile.FILENAME}: is not UTF-8 text"
        except buildfile.BuildFileError as exc:
            problem = str(exc)[:SUBJECT_MAX]
    return Commit(branch=branch, sha=sha, author=author[:SUBJECT_MAX],
                  subject=subject[:SUBJECT_MAX], time=int(commit.committed_date),
                  message=message[:SUBJECT_MAX], jobs=jobs, config_error=problem)


def _why(exc: Exception) -> str:
    """The useful line of a git error (gitpython's own text repeats the whole command)."""
    stderr = str(getattr(exc, "stderr", "") or "").strip()
    if stderr.startswith("stderr: '") and stderr.endswith("'"):     # how gitpython wraps it
        stderr = stderr[len("stderr: '"):-1]
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (errors or lines or [str(exc) or type(exc).__name__])[-1 if errors else 0]
