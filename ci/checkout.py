"""Puts the exact commit of a build in one slot's working clone, the git
commands that matter written to the build log.

The usual case costs two git commands: the clone already follows the
repository and has the commit (commits are immutable), so it is checked out
and cleaned, no fetch. Otherwise origin is made to follow the repository's
address, the branches and tags are fetched, then the commit itself (a commit
no branch holds any more); a clone a crash left damaged is made again.

Every git command runs through ``gitops.run`` in a thread, raced against the
attempt's stop event: a stop raises ``Stopped`` at once, and ``lingering``
holds the git command still running, because the slot is not free until git
is done with its clone.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import time
from pathlib import Path

from . import aio, gitops
from .attempt import Stopped
from .buildlog import BuildLog


class CheckoutError(Exception):
    """The commit could not be checked out; the message goes into the build log."""


class Checkout:
    """One slot's working clone at ``path``, for one attempt."""

    def __init__(self, path: Path, buildlog: BuildLog, stop: asyncio.Event, limit: float):
        self.path = Path(path).absolute()
        self.log = buildlog
        self.limit = limit          # the time limit, in seconds, for the message when it runs out
        self.lingering: asyncio.Future | None = None    # a git command still running after a stop
        self._stop = stop

    async def run(self, repo: str, sha: str, deadline: float) -> None:
        """Check ``sha`` of ``repo`` out, clean; raises CheckoutError or Stopped."""
        path = self.path
        if not repo or repo.startswith("-"):
            raise CheckoutError(f"bad repository address {repo!r}")
        if os.path.exists(repo):
            repo = os.path.abspath(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        status = 128
        if (path / ".git").is_dir():
            # the workdir is ours alone (locked): a lock file here is left from a killed git
            for stale in (path / ".git").glob("*.lock"):
                stale.unlink(missing_ok=True)
            if gitops.origin_url(path) == repo and await self._try_checkout(sha, deadline):
                # the usual case: a clone of this repository that has the commit already.
                # Commits are immutable, so a fetch would change nothing this build sees
                # but the remote branches and tags: none, two git commands in all
                await self._must(["clean", "-ffdx"], deadline)
                return
            # one git command for two questions: is the clone sound (else 128), and has it
            # the commit already (0) or not (1)
            status = (await self._git(["rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}"],
                                      deadline, quiet=True)).status
            if status not in (0, 1):
                self.log.line(f"the working clone {path} is damaged; cloning it again")
        if status not in (0, 1):
            if await self._clone(repo, sha, deadline):
                return              # a fresh clone holds nothing to clean
            present = False
        else:
            await self._follow(repo, deadline)
            present = status == 0
            if not present:
                await self._must(["fetch", "--force", "--prune", "--tags", "origin",
                                  "+refs/heads/*:refs/remotes/origin/*"], deadline)
                present = await self._has(sha, deadline)
        if not present:
            await self._git(["fetch", "--force", "origin", sha], deadline)
            if not await self._has(sha, deadline):
                raise CheckoutError(f"commit {sha} is not in {repo} "
                                    f"(fetched its branches, its tags and the commit itself)")
        await self._must(["checkout", "--force", "--detach", sha], deadline)
        await self._must(["clean", "-ffdx"], deadline)

    async def _clone(self, repo: str, sha: str, deadline: float) -> bool:
        """Clone afresh; True when the commit is checked out already."""
        if self.path.exists():
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, self.path)
        cloned = await self._git(["clone", "--no-checkout", "--", repo, str(self.path)],
                                 deadline, cwd=self.path.parent)
        if not cloned.ok:
            raise CheckoutError(f"git clone of {repo} failed: {_last_line(cloned.text)}")
        return await self._try_checkout(sha, deadline)

    async def _follow(self, repo: str, deadline: float) -> None:
        """Make origin the repository's address (it moved, or this slot built another)."""
        if gitops.origin_url(self.path) == repo:
            return
        # not surely ours (rare): ask git itself, then fix it
        found = await self._git(["config", "--get", "remote.origin.url"], deadline, quiet=True)
        if found.status == 1:       # no origin: someone removed it
            await self._must(["remote", "add", "origin", repo], deadline)
        elif found.status != 0 or found.text.strip() != repo:
            await self._must(["remote", "set-url", "origin", repo], deadline)

    async def _must(self, args: list[str], deadline: float) -> None:
        done = await self._git(args, deadline)
        if not done.ok:
            raise CheckoutError(f"git {args[0]} failed (exit {done.status}): {_last_line(done.text)}")

    async def _try_checkout(self, sha: str, deadline: float) -> bool:
        """Check the commit out if the clone has it; logged only when that worked."""
        args = ["checkout", "--force", "--detach", sha]
        done = await self._git(args, deadline, quiet=True)
        if done.ok:
            self.log.line("$ git " + " ".join(args))
            if done.text:
                self.log.write(done.text + "\n")
        return done.ok

    async def _has(self, sha: str, deadline: float) -> bool:
        return (await self._git(["cat-file", "-e", f"{sha}^{{commit}}"], deadline, quiet=True)).ok

    async def _git(self, args: list[str], deadline: float, cwd: Path | None = None,
                   quiet: bool = False) -> gitops.GitResult:
        """One git command, logged unless ``quiet``; raises Stopped when the attempt is stopped."""
        if self._stop.is_set():
            raise Stopped()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CheckoutError(f"timed out after {self.limit:g} s")
        if not quiet:
            self.log.line("$ git " + " ".join(args))
        env = {}
        if cwd is None:
            # pin git to the checkout: never act on a repository around the workdir
            env = {"GIT_DIR": str(self.path / ".git"), "GIT_WORK_TREE": str(self.path)}
        command = functools.partial(gitops.run, args, cwd or self.path, env=env, timeout=remaining)
        work = asyncio.ensure_future(aio.in_thread(command))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not work.done():
            self.lingering = work       # the slot stays taken until git is done with it
            raise Stopped()
        done = work.result()
        if done.text and not quiet:
            self.log.write(done.text + "\n")
        return done


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
