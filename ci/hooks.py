"""``tinyci install-hook``: git hooks that poke the observer whenever a branch
of the clone moves: a commit (``post-commit``), a merge or ``git pull``
(``post-merge``), a rebase or amend (``post-rewrite``), a push into the clone
(``post-receive``), and, with git 2.28 or later, any ref update at all
(``reference-transaction``: ``git reset``, ``git branch -f``, a fast-forward
``git pull``...). Where that one is installed it does the poking, once per
change of a branch; the others only run the hooks they chain.

A hook runs ``<this python> -S -m ci notify --observer HOST:PORT``, with the
directory this ``ci`` package lives in first on ``PYTHONPATH``, so it works in
a shell where ``tinyci`` is not on ``PATH`` (a GUI git client, a virtualenv
that is not activated) and runs the very tinyci that installed it.

A hook that is already there and is not ours is kept: it is moved aside to
``<hook>.before-tinyci`` and ours runs it first, with the same arguments and
standard input, and exits with its status. Installing again only rewrites our
own hook (a new observer address, say), so it is safe to run twice.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from . import files, gitops

HOOKS = ("post-commit", "post-merge", "post-rewrite", "post-receive")
REF_HOOK = "reference-transaction"          # git 2.28+: every ref update, once committed
STDIN_HOOKS = {"post-receive", "post-rewrite", REF_HOOK}    # hooks git gives input on stdin
MARKER = "# tinyci-hook: installed by `tinyci install-hook`"
CHAINED = ".before-tinyci"


class HookError(Exception):
    """The hooks cannot be installed; the message names the path at fault."""


def hooks_dir(repo: Path) -> Path:
    """Where git looks for this clone's hooks (honours core.hooksPath; bare repositories too)."""
    if not repo.is_dir():
        raise HookError(f"{repo} is not a git repository")
    found = gitops.run(["rev-parse", "--git-path", "hooks"], repo, timeout=30)
    if found.status < 0:        # git could not run, or never answered
        raise HookError(f"cannot run git in {repo}: {found.err.strip()}")
    if not found.ok:
        raise HookError(f"{repo} is not a git repository")
    path = Path(found.out.strip())
    return path if path.is_absolute() else (repo / path)


def script(hook: str, observer: str, config: str | None, secret_file: str | None = None) -> str:
    # this ci package first, then this interpreter's site-packages (for the YAML a
    # --config or TINYCI_* variable makes notify read), given directly because -S skips site
    path = [str(Path(__file__).resolve().parent.parent)]
    path += [p for p in sys.path if p.endswith("-packages") and p not in path]
    # -S: notify needs nothing from site-packages (its package is on PYTHONPATH), and
    # skipping site saves a third of Python's start-up, which every commit pays
    notify = [sys.executable, "-S", "-m", "ci", "notify", "--observer", observer]
    if config:
        notify += ["--config", config]
    if secret_file:
        notify += ["--secret-file", secret_file]
    chained = shlex.quote(hook + CHAINED)
    if hook in STDIN_HOOKS:
        # read once: both the chained hook and our test below need it
        run_chained = f'input=$(cat)\nif [ -x "$here"/{chained} ]; then\n' \
                      f'    printf \'%s\\n\' "$input" | "$here"/{chained} "$@" || status=$?\nfi'
    else:
        run_chained = f'if [ -x "$here"/{chained} ]; then\n    "$here"/{chained} "$@" || status=$?\nfi'
    if hook == REF_HOOK:
        # only once the update is done, and only when a branch moved
        when = ('[ "$1" = committed ] || exit $status\n'
                'printf \'%s\\n\' "$input" | grep -q \' refs/heads/\' || exit $status')
    else:
        when = f'# {REF_HOOK}, when installed, pokes for every branch that moves\n' \
               f'[ -x "$here"/{REF_HOOK} ] && grep -q {shlex.quote(MARKER)} "$here"/{REF_HOOK} && exit $status'
    return f"""#!/bin/sh
{MARKER}
# Pokes the tinyci observer so it looks for new commits at once; never fails the commit.
# A hook that was here before is kept as {hook}{CHAINED} and runs first.
status=0
here=$(dirname "$0")
{run_chained}
{when}
PYTHONPATH={shlex.quote(os.pathsep.join(path))}${{PYTHONPATH:+:$PYTHONPATH}} \\
    {" ".join(shlex.quote(word) for word in notify)} </dev/null
exit $status
"""


def install(repo: Path, observer: str, config: str | None = None,
            secret_file: str | None = None) -> list[str]:
    """Install the hooks; returns one line per hook saying what was done."""
    directory = hooks_dir(repo)
    done = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for hook in HOOKS + ((REF_HOOK,) if has_ref_hook(repo) else ()):
            path = directory / hook
            kept = ""
            if path.exists() or path.is_symlink():
                if MARKER not in _read(path):
                    aside = directory / (hook + CHAINED)
                    if aside.exists():
                        raise HookError(f"{path} is not tinyci's and {aside} already exists: "
                                        f"merge them by hand, then run install-hook again")
                    os.rename(path, aside)
                    kept = f" (the existing hook now runs first, from {aside.name})"
                else:
                    kept = " (updated)"
            # never a half-written hook: git may run it at any moment
            files.atomic_write(path, script(hook, observer, config, secret_file).encode(), mode=0o755)
            done.append(f"installed {path}{kept}")
    except OSError as exc:
        raise HookError(f"cannot write hooks in {directory}: {exc.strerror or exc}") from None
    return done


def has_ref_hook(repo: Path) -> bool:
    """True when this git runs the reference-transaction hook (2.28 and later)."""
    found = gitops.run(["version"], repo, timeout=30)
    parts = [int(p) for p in found.out.split()[2].split(".")[:2] if p.isdigit()] if found.ok else []
    return len(parts) == 2 and tuple(parts) >= (2, 28)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
