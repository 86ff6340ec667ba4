"""``tinyci install-hook``: git hooks that poke the observer after each commit
(``post-commit``) and each push into the clone (``post-receive``).

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
import stat
import subprocess
import sys
from pathlib import Path

HOOKS = ("post-commit", "post-receive")
MARKER = "# tinyci-hook: installed by `tinyci install-hook`"
CHAINED = ".before-tinyci"


class HookError(Exception):
    """The hooks cannot be installed; the message names the path at fault."""


def hooks_dir(repo: Path) -> Path:
    """Where git looks for this clone's hooks (honours core.hooksPath; bare repositories too)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-path", "hooks"],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HookError(f"cannot run git in {repo}: {exc}") from None
    if out.returncode != 0:
        raise HookError(f"{repo} is not a git repository")
    path = Path(out.stdout.strip())
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
    return f"""#!/bin/sh
{MARKER}
# Pokes the tinyci observer so it looks for new commits at once; never fails the commit.
# A hook that was here before is kept as {hook}{CHAINED} and runs first.
status=0
here=$(dirname "$0")
if [ -x "$here"/{chained} ]; then
    "$here"/{chained} "$@" || status=$?
fi
PYTHONPATH={shlex.quote(os.pathsep.join(path))}${{PYTHONPATH:+:$PYTHONPATH}} \\
    {" ".join(shlex.quote(word) for word in notify)} </dev/null
exit $status
"""


def install(repo: Path, observer: str, config: str | None = None,
            secret_file: str | None = None) -> list[str]:
    """Install both hooks; returns one line per hook saying what was done."""
    directory = hooks_dir(repo)
    done = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for hook in HOOKS:
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
            tmp = path.with_name(hook + ".tinyci-tmp")
            tmp.write_text(script(hook, observer, config, secret_file))
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            os.replace(tmp, path)
            done.append(f"installed {path}{kept}")
    except OSError as exc:
        raise HookError(f"cannot write hooks in {directory}: {exc.strerror or exc}") from None
    return done


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
