"""Every git command tinyci runs, run one way: GitPython's ``Git.execute``
(a child process with a timeout that kills it, no shell, no prompt).

Blocking by design; daemons call these through ``aio.in_thread`` so their
event loop never waits on git. Nothing here raises for a git failure: a
command's exit status and output come back in a ``GitResult`` (status -1
when git could not be started or took too long), and callers decide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import git

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


# ---------------------------------------------------------------- the runner's working clones

def origin_url(clone: str | os.PathLike) -> str | None:
    """The clone's ``remote.origin.url`` as GitPython reads ``.git/config``, in
    process (a git command less per build); None when it cannot say for sure."""
    try:
        url = git.GitConfigParser(os.path.join(clone, ".git", "config"), read_only=True).get(
            'remote "origin"', "url")
    except Exception:       # a configparser error, an unreadable file: the caller asks git itself
        return None
    # GitPython keeps git's quoting and escapes: trust only values that have none
    return url if isinstance(url, str) and not any(c in url for c in '"\\;#') else None
