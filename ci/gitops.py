"""Every git command tinyci runs, run one way: GitPython's ``Git.execute``
(a child process with a timeout that kills it, no shell, no prompt).

Blocking by design; daemons call these through ``aio.in_thread`` so their
event loop never waits on git. Nothing here raises for a git failure: a
command's exit status and output come back in a ``GitResult`` (status -1
when git could not be started or took too long), and callers decide.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import git
import gitdb.exc

from . import aio

# git must never stop to ask for a user name or password: nobody is there to answer
QUIET_ENV = {"GIT_TERMINAL_PROMPT": "0"}


@dataclass(frozen=True)
class GitResult:
    status: int             # git's exit status; -1 when it could not run or was killed for time
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def text(self) -> str:
        """stdout and stderr together, as a person reading a log wants them."""
        return "\n".join(part for part in (self.out, self.err) if part)


def run(args: list[str], cwd: str | os.PathLike, *, env: dict | None = None,
        timeout: float = 60.0) -> GitResult:
    """``git ARGS`` in ``cwd``. ``env`` adds to (not replaces) this process's environment."""
    if not os.path.isdir(cwd):
        # GitPython would quietly run in our own directory instead
        return GitResult(-1, "", f"{cwd}: no such directory")
    try:
        status, out, err = git.Git(str(cwd)).execute(
            ["git", *args], with_extended_output=True, with_exceptions=False,
            kill_after_timeout=max(timeout, 1.0), env={**QUIET_ENV, **(env or {})},
            stdout_as_string=True)
    except (git.GitError, OSError) as exc:     # git missing, or it could not be started
        return GitResult(-1, "", str(exc))
    return GitResult(status if status is not None else -1, out or "", err or "")


def resolve(repo: str | os.PathLike, rev: str, timeout: float = 10.0) -> str | None:
    """The full SHA of the commit ``rev`` names in ``repo``, or None."""
    if not rev or rev.startswith("-"):
        return None
    found = run(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                repo, timeout=timeout)
    sha = found.out.strip()
    return sha if found.ok and len(sha) == 40 else None


def file_at(repo: str | os.PathLike, sha: str, path: str, timeout: float = 10.0) -> bytes | None:
    """The content of ``path`` at commit ``sha``, or None when it has no such file."""
    if not os.path.isdir(repo):
        return None
    try:
        status, out, _ = git.Git(str(repo)).execute(
            ["git", "cat-file", "blob", f"{sha}:{path}"], with_extended_output=True,
            with_exceptions=False, kill_after_timeout=timeout, env=QUIET_ENV, stdout_as_string=False)
    except (git.GitError, OSError):
        return None
    return out if status == 0 else None


def top_level(path: Path, timeout: float = 30.0) -> str | None:
    """The top of the work tree holding ``path`` (for a bare repository, its git dir), or None."""
    bare = run(["rev-parse", "--is-bare-repository"], path, timeout=timeout)
    if not bare.ok:
        return None
    which = "--absolute-git-dir" if bare.out.strip() == "true" else "--show-toplevel"
    found = run(["rev-parse", which], path, timeout=timeout)
    return found.out.strip() if found.ok else None


# ---------------------------------------------------------------- the dispatcher's reads (trigger)

def commit_info(repo: str | os.PathLike, sha: str, timeout: float = 10.0) -> tuple[str, str]:
    """(author name, subject) of commit ``sha`` in ``repo``; ("", "") when git cannot tell."""
    found = run(["log", "-1", "--format=%an%x00%s", sha], repo, timeout=timeout)
    if not found.ok:
        return "", ""
    # GitPython decodes with surrogateescape; a build record must be valid UTF-8
    text = found.out.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    author, _, subject = text.rstrip("\n").partition("\0")
    return author[:200], subject[:4000]


def branches_of(repo: str | os.PathLike, sha: str, timeout: float = 10.0) -> tuple[list[str], list[str]]:
    """(branches whose head is ``sha``, branches that contain it): local branches,
    else remote-tracking ones (a clone the observer fetches into), names as git shows them."""
    found: tuple[list[str], list[str]] = ([], [])
    for refs in ("refs/heads", "refs/remotes"):
        for i, how in enumerate(("--points-at", "--contains")):
            listed = run(["for-each-ref", how, sha, "--format=%(refname:short)", refs], repo, timeout=timeout)
            found[i].extend(n for n in listed.out.split() if listed.ok and not n.endswith("/HEAD"))
        if found[1]:
            break
    return found


# ---------------------------------------------------------------- the observer's reads, a cancellable command (h-config)

class GitReadError(Exception):
    """A repository could not be read just now (a lock, a gc, a broken ref); try again later."""


def is_repository(path: str | os.PathLike) -> bool:
    """True when ``path`` is a git repository (a work tree's top or a bare one)."""
    try:
        git.Repo(path).close()
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return False
    return True


@dataclass(frozen=True)
class CommitFacts:
    """What the observer reports about one commit, read from the object database."""

    sha: str
    message: str            # the whole message; undecodable bytes replaced
    author: str             # "Name <email>"
    time: int               # committer time, epoch seconds
    file: bytes | None      # the asked-for file at this commit; None when it is absent or not a file
    file_kind: str          # "" absent, "blob" a file, else what is there instead ("tree", "commit")


# RepoReader.since lists at most this many commits: a force-push onto an unrelated history would
# otherwise list all of it only to find the saved commit is not there
LISTED_MAX = 10_000


class RepoReader:
    """One repository opened for one batch of reads (a scan of the observer),
    closed by ``with``. GitPython's ``Repo`` reads commits and trees through
    one long-lived ``git cat-file --batch`` instead of a process per commit:
    that is what keeps a scan cheap. Opened afresh for each batch, so a gc or
    a repack between scans never leaves stale handles. Every failure is a
    GitReadError naming the repository and git's own reason."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.repo = git.Repo(path)
        except git.NoSuchPathError:
            raise GitReadError(f"{path} does not exist (any more)") from None
        except git.InvalidGitRepositoryError:
            raise GitReadError(f"{path} is not a git repository (any more)") from None
        except (git.GitError, OSError) as exc:
            raise GitReadError(f"cannot open {path}: {why(exc)}") from None

    def __enter__(self) -> "RepoReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.repo.close()

    def refs(self, prefix: str) -> list[tuple[str, str]]:
        """(ref name, sha) of every ref under ``prefix`` (e.g. ``refs/heads/``)."""
        return parse_refs(self.refs_text(prefix))

    def refs_text(self, prefix: str) -> str:
        """``refs``' raw listing (one git command), to compare with the last one before parsing it."""
        with self._reading():
            return self.repo.git.for_each_ref("--format=%(objectname) %(refname)", prefix)

    def since(self, old: str, new: str) -> list[tuple[str, list[str]]] | None:
        """``old..new`` as (sha, parents), children before parents (--topo-order), in one git command;
        None when git cannot list it (``old`` is gone, say) or it is longer than LISTED_MAX. A None
        is not an error: the caller asks ``has_commit`` and the rest, whose failures are reported."""
        try:
            out = self.repo.git.rev_list("--topo-order", "--parents", f"--max-count={LISTED_MAX + 1}",
                                         f"{old}..{new}")
        except (git.GitError, OSError):
            return None
        listed = [(shas[0], shas[1:]) for shas in (line.split() for line in out.splitlines()) if shas]
        return listed if len(listed) <= LISTED_MAX else None

    def has_commit(self, sha: str) -> bool:
        try:
            self.repo.git.cat_file("-e", f"{sha}^{{commit}}")
            return True
        except git.GitCommandError:
            return False

    def is_ancestor(self, old: str, new: str) -> bool:
        with self._reading():
            return self.repo.is_ancestor(old, new)

    def commits_between(self, old: str, new: str, first_parent: bool = False) -> list[str]:
        """``old..new``, oldest first; --topo-order: parents before children even when clocks
        disagree. ``first_parent``: only ``new``'s first-parent line (a merge, not what it brought in)."""
        with self._reading():
            return self.repo.git.rev_list("--reverse", "--topo-order", *(["--first-parent"] if first_parent else []),
                                          f"{old}..{new}").split()

    def commit(self, sha: str, path: str) -> CommitFacts:
        """The commit ``sha`` and the content of ``path`` in its tree."""
        with self._reading():
            commit = self._commit(sha)
            message = commit.message
            if isinstance(message, bytes):     # GitPython leaves undecodable messages as bytes
                message = message.decode("utf-8", "replace")
            try:
                entry = commit.tree / path
            except KeyError:
                entry = None
            kind = "" if entry is None else entry.type
            data = entry.data_stream.read() if kind == "blob" else None
            return CommitFacts(sha=sha, message=message, author=f"{commit.author.name} <{commit.author.email}>",
                               time=int(commit.committed_date), file=data, file_kind=kind)

    def changed_paths(self, sha: str, limit: int) -> tuple | None:
        """The paths ``sha`` changed against its first parent (``.ci.yaml`` ``when.paths``);
        None for a root commit or more than ``limit`` paths (then every job runs)."""
        with self._reading():
            parents = self._commit(sha).parents
            if not parents:
                return None
            out = self.repo.git.diff_tree("-r", "--name-only", "-z", "--no-renames", parents[0].hexsha, sha)
        paths = tuple(p for p in out.split("\0") if p)
        return paths if len(paths) <= limit else None

    def _commit(self, sha: str) -> git.Commit:
        """The commit of full hex ``sha``, read through the ``cat-file --batch`` that reads its tree and
        files too: ``repo.commit`` would first look the type up in a ``cat-file --batch-check`` of its
        own, one more process a poll waits for. An annotated tag (a remote-tracking ref may name one)
        goes the old way, which finds its commit; a tree or a blob is a ValueError naming it."""
        if len(sha) != 40:
            raise ValueError(f"{sha!r} is not a full commit sha")
        binsha = bytes.fromhex(sha)
        found = self.repo.odb.stream(binsha)
        found.read()                    # all of it: the next read on that process starts after it
        kind = found.type.decode() if isinstance(found.type, bytes) else found.type
        if kind == git.TagObject.type:
            return self.repo.commit(sha)
        if kind != git.Commit.type:
            raise ValueError(f"{sha} is a {kind}, not a commit")
        return git.Commit(self.repo, binsha)

    def remote_url(self, remote: str) -> str:
        """The fetch URL of ``remote``, as configured (maybe relative to the repository)."""
        try:
            return self.repo.git.remote("get-url", remote)
        except git.GitError as exc:
            raise GitReadError(f"{self.path} has no remote {remote!r}: {why(exc)}") from None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except (git.GitError, gitdb.exc.ODBError, OSError, ValueError) as exc:
            raise GitReadError(f"cannot read {self.path}: {why(exc)}") from None


def parse_refs(text: str) -> list[tuple[str, str]]:
    """(ref name, sha) pairs of a ``RepoReader.refs_text`` listing."""
    return [(ref, sha) for sha, _, ref in (line.partition(" ") for line in text.splitlines())]


def why(exc: Exception) -> str:
    """The useful line of a git error (GitPython's own text repeats the whole command)."""
    stderr = str(getattr(exc, "stderr", "") or "").strip()
    if stderr.startswith("stderr: '") and stderr.endswith("'"):     # how GitPython wraps it
        stderr = stderr[len("stderr: '"):-1]
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (errors or lines or [str(exc) or type(exc).__name__])[-1 if errors else 0]


async def run_cancellable(args: list[str], cwd: str | os.PathLike, *, env: dict | None = None,
                          timeout: float = 60.0) -> GitResult:
    """``run`` for an event loop, for commands that may take long (a fetch):
    git runs in a session of its own, waited on in a daemon thread, and
    cancelling the awaiting task kills that whole session at once (git's ssh
    or credential helper too), so a daemon told to stop does not wait for it."""
    if not os.path.isdir(cwd):
        return GitResult(-1, "", f"{cwd}: no such directory")
    try:
        handle = git.Git(str(cwd)).execute(["git", *args], as_process=True, env={**QUIET_ENV, **(env or {})},
                                           start_new_session=True)
    except (git.GitError, OSError) as exc:
        return GitResult(-1, "", str(exc))
    # ours from here: GitPython's wrapper would close the pipes under the waiting thread when collected
    proc, handle.proc = handle.proc, None
    try:
        return await aio.in_thread(_wait, proc, timeout)
    finally:
        if proc.returncode is None:         # cancelled while git runs; the thread then reaps it
            _kill_session(proc)


def _wait(proc: subprocess.Popen, timeout: float) -> GitResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, _ = proc.communicate()
        return GitResult(-1, out.decode(errors="replace"), f"no answer after {timeout:g}s")
    return GitResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- the runner's working clones

# what origin_url last read, by config file: (its inode, size and times, the url). A memo
# for this process: a runner has a clone per slot, git rewrites the file by rename (a new inode)
_origins: dict[str, tuple[tuple, str | None]] = {}


def origin_url(clone: str | os.PathLike) -> str | None:
    """The clone's ``remote.origin.url`` as GitPython reads ``.git/config``, in
    process (a git command less per build); None when it cannot say for sure.
    A config file unchanged since the last look (same inode, size and time) is
    not parsed again: parsing cost a trivial build some 2 ms of the runner's loop."""
    path = os.path.join(clone, ".git", "config")
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _origins.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        url = git.GitConfigParser(path, read_only=True).get('remote "origin"', "url")
    except Exception:       # a configparser error, an unreadable file: the caller asks git itself
        return None
    # GitPython keeps git's quoting and escapes: trust only values that have none
    url = url if isinstance(url, str) and not any(c in url for c in '"\\;#') else None
    if len(_origins) > 64:
        _origins.clear()
    _origins[path] = (stamp, url)
    return url
