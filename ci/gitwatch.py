"""The observer's git side: read a clone's branch heads and decide which
commits to report. No sockets, no asyncio: the observer runs these blocking
calls in a worker thread, and tests call them directly. Git itself is read
through ``gitops.RepoReader``; this module holds only the decisions.

``plan`` is the whole decision, written against a tiny ``History`` interface
so the rules read in one place:

- a branch seen for the first time reports only its head, not its history;
- a branch that moved forward reports, by ``observer.build``: every new
  commit, oldest first (``all``); only those on its first-parent line, so the
  commits a merge brought in from other branches are not built
  (``first-parent``); or only its new head (``heads``);
- a branch whose saved commit is no longer in its history (force-push, or
  the commit was pruned) reports only its new head;
- a branch that is gone (or no longer matches the patterns) is forgotten.

Then ``interleave`` lets branches take turns and ``Clone.describe`` reads
the commits (each with its ``.ci.yaml``, which may take up to a second or so
to check) a time budget at a time, so one branch never holds the others back
by more than a commit.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

from . import buildfile, gitops

SUBJECT_MAX = 4096     # the protocol's text limit (protocol.TEXT)
CHANGED_MAX = 10_000   # changed paths read for .ci.yaml `when.paths`; past it every job runs


@dataclass(frozen=True)
class Commit:
    """One commit to report, with what the dispatcher records about it."""

    branch: str
    sha: str
    author: str         # "Name <email>"
    subject: str        # first line of the message
    time: int           # committer time, epoch seconds
    message: str = ""   # the whole message (for [skip ci]), cut to SUBJECT_MAX
    jobs: list | None = None    # .ci.yaml's jobs [{name, labels, [needs, skip]}]; None without the file
    config_error: str = ""      # why .ci.yaml at this commit is unusable


@dataclass
class ScanPlan:
    """What one scan reports, and what it noticed on the way."""

    report: list[tuple[str, str]] = field(default_factory=list)        # (branch, sha) in sending order
    forced: list[tuple[str, str, str]] = field(default_factory=list)   # (branch, saved, new head)
    dropped: list[tuple[str, str]] = field(default_factory=list)       # (branch, saved)


class History(Protocol):
    # old..new as (sha, parents), children before parents (git rev-list --topo-order --parents);
    # None when git cannot list it (old is gone, git failed, or past gitops.LISTED_MAX commits): then
    # the three questions below decide
    def since(self, old: str, new: str) -> list[tuple[str, list[str]]] | None: ...
    def has_commit(self, sha: str) -> bool: ...
    def is_ancestor(self, old: str, new: str) -> bool: ...
    # old..new, oldest first; first_parent: only new's first-parent line
    def commits_between(self, old: str, new: str, first_parent: bool = False) -> list[str]: ...


BUILD_MODES = ("all", "first-parent", "heads")      # observer.build


def plan(saved: Mapping[str, str], heads: Mapping[str, str], history: History, build: str = "all") -> ScanPlan:
    """What to report, given the last acknowledged commit per branch and the
    current heads; ``build`` is one of BUILD_MODES (which new commits of a moved branch)."""
    if build not in BUILD_MODES:
        raise ValueError(f"unknown build mode {build!r} (known: {', '.join(BUILD_MODES)})")
    result = ScanPlan()
    for branch in sorted(saved.keys() - heads.keys()):
        result.dropped.append((branch, saved[branch]))
    for branch in sorted(heads):
        head, old = heads[branch], saved.get(branch)
        if old == head:
            continue
        if old is None:
            result.report.append((branch, head))
            continue
        moved = _moved(history, old, head, build)
        if moved is None:
            result.forced.append((branch, old, head))
            result.report.append((branch, head))
        else:
            result.report.extend((branch, sha) for sha in moved)
    return result


def _moved(history: History, old: str, new: str, build: str) -> list[str] | None:
    """What a branch that moved from ``old`` to ``new`` reports, oldest first; None when ``new``
    does not descend from ``old``. One listing answers the common case, a branch moved forward (a
    git process costs 3-5 ms, and a poll waits for every one). The separate questions decide the
    rest: when git cannot list, for ``heads`` (no listing needed), and to be sure of a no, which
    a force-push gives but so would a saved sha that is a tag, never anyone's parent."""
    listed = None if build == "heads" else history.since(old, new)
    # new descends from old when a commit since old has old for a parent
    if listed is not None and any(old in parents for _, parents in listed):
        if build == "all":
            return [sha for sha, _ in reversed(listed)]
        # first-parent: new's first parents back to where old's history begins, which is where they leave the listing
        parents_of = dict(listed)
        line, sha = [], new
        while sha in parents_of:
            line.append(sha)
            sha = parents_of[sha][0] if parents_of[sha] else ""
        if line:            # else new is not a commit's sha (a tag's): the questions below peel it
            return line[::-1]
    if not (history.has_commit(old) and history.is_ancestor(old, new)):
        return None
    return [new] if build == "heads" else history.commits_between(old, new, build == "first-parent")


class Clone:
    """One watched clone (bare or not); every method opens it afresh, so a
    gc or a repack between scans never leaves us holding stale handles. What
    it keeps between looks is the last ref listing (text) and the heads it
    gave: the next look compares listings before doing anything per branch."""

    def __init__(self, path: Path, patterns: Iterable[str] = ("*",), remote: str | None = None,
                 build: str = "all"):
        self.path = path
        self.patterns = tuple(patterns)
        self.remote = remote     # watch refs/remotes/<remote>/* instead of refs/heads/*
        self.build = build       # observer.build: which new commits of a moved branch to report
        # one regular expression for all the patterns: a look at 1,000 branches matches each once
        self._watched = re.compile("|".join(fnmatch.translate(p) for p in self.patterns) or r"(?!)")
        self._last_refs: tuple[str, dict[str, str]] = ("", {})   # the last listing, and the heads it gave

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
        """The plan for ``saved`` against the current heads, and every commit it reports.
        Raises GitReadError when the clone cannot be read just now."""
        result = self.plan(saved)
        return result, self.describe(result.report)

    def plan(self, saved: Mapping[str, str]) -> ScanPlan:
        """The plan for ``saved`` against the current heads. Raises GitReadError."""
        with gitops.RepoReader(self.path) as repo:
            heads = self._heads(repo)
            if heads == saved:
                return ScanPlan()           # the common look: nothing moved, nothing to do per branch
            return plan(saved, heads, repo, self.build)

    def describe(self, report: Sequence[tuple[str, str]], budget: float | None = None) -> list[Commit]:
        """The commits of ``report`` (branch, sha), in order: all of them, or with
        ``budget`` (seconds) those read before it ran out, at least one. Each
        reads its ``.ci.yaml``, which may cost up to a second or so (see
        buildfile.MAX_VALUES): the budget lets the observer send what it has
        before reading on. Raises GitReadError."""
        deadline = None if budget is None else time.monotonic() + budget
        out: list[Commit] = []
        with gitops.RepoReader(self.path) as repo:
            for branch, sha in report:
                if out and deadline is not None and time.monotonic() >= deadline:
                    break
                out.append(_describe(repo.commit(sha, buildfile.FILENAME), branch, repo))
        return out

    def _heads(self, repo: gitops.RepoReader) -> dict[str, str]:
        """The watched branches' heads: one ``git for-each-ref``, parsed only when
        its listing differs from the last look's (with many branches, most looks)."""
        prefix = f"refs/remotes/{self.remote}/" if self.remote else "refs/heads/"
        text = repo.refs_text(prefix)
        last_text, last_heads = self._last_refs
        if text == last_text:
            return dict(last_heads)
        # only the lines that changed are parsed: a push to one of 1,000 branches parses two lines
        new, old = set(text.splitlines()), set(last_text.splitlines())
        heads = dict(last_heads)
        for gone, lines in ((True, old - new), (False, new - old)):     # a moved branch: out, then in again
            for ref, sha in gitops.parse_refs("\n".join(lines)):
                branch = ref[len(prefix):]
                if self.remote and branch == "HEAD":
                    continue           # the remote's default-branch pointer, not a branch
                if gone:
                    heads.pop(branch, None)
                elif self._watched.match(branch):
                    heads[branch] = sha
        self._last_refs = (text, heads)
        return dict(heads)


def interleave(report: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``report`` taking one commit of each branch in turn, each branch's own
    commits still oldest first: a branch with many new commits (or costly
    ``.ci.yaml`` files) delays the others by one commit at a time, not by all of them."""
    queues: dict[str, list[str]] = {}
    for branch, sha in report:
        queues.setdefault(branch, []).append(sha)
    out: list[tuple[str, str]] = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        out.extend((branch, q[turn]) for branch, q in queues.items() if turn < len(q))
    return out


def _jobs_of(data: bytes) -> tuple[buildfile.BuildFile | None, str]:
    """(the parsed file, problem) of a ``.ci.yaml``'s bytes."""
    if len(data) > 4 * buildfile.MAX_SIZE:      # more characters than allowed, whatever they are
        return None, str(buildfile.BuildFileError(0, f"is larger than {buildfile.MAX_SIZE} bytes"))
    return _checked(data)


@functools.lru_cache(maxsize=32)
def _checked(data: bytes) -> tuple[buildfile.BuildFile | None, str]:
    """``_jobs_of``, kept for the last few files seen: a push of many commits
    mostly shares one, and a costly file is then read once, not once per commit."""
    try:
        return buildfile.parse(data.decode("utf-8")), ""
    except UnicodeDecodeError:
        return None, f"{buildfile.FILENAME}: is not UTF-8 text"
    except buildfile.BuildFileError as exc:
        return None, str(exc)[:SUBJECT_MAX]


def _describe(facts: gitops.CommitFacts, branch: str, repo: gitops.RepoReader | None = None) -> Commit:
    message = facts.message
    subject = message.split("\n", 1)[0].rstrip("\r")
    jobs, problem = None, ""
    if facts.file_kind and facts.file_kind != "blob":
        problem = f"{buildfile.FILENAME}: is not a file"
    elif facts.file is not None:
        found, problem = _jobs_of(facts.file)
        if found is not None:
            # `when` is decided here, where the branch and the clone are: paths changed against the first parent
            changed = repo.changed_paths(facts.sha, CHANGED_MAX) if repo is not None and found.uses_paths() else None
            jobs = found.job_list(branch, changed)
    return Commit(branch=branch, sha=facts.sha, author=facts.author[:SUBJECT_MAX],
                  subject=subject[:SUBJECT_MAX], time=facts.time,
                  message=message[:SUBJECT_MAX], jobs=jobs, config_error=problem)
