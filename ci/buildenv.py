"""The environment a build's steps run in, such that no step can change the
one tinyci runs from.

Each attempt gets a virtualenv as fresh as a new one, ``<checkout>.venv``
beside its slot's checkout (no pip of its own). Making one costs 10-20 ms
(more on a loaded machine), a third of a trivial build, so a slot's is kept
and reused as long as nothing in it changed since it was made: every entry's
mtime is pinned to a fixed old time when it is made, and the listing (names,
inodes, sizes, times) is remembered; before the next attempt one walk of its
few files compares. A step that installs, writes or removes anything there
adds an entry or moves a time, and the next attempt gets one made anew. (Only
a step that sets a file's times back on purpose goes unseen: steps run as the
runner's user and could as well edit tinyci itself; this keeps builds from
leaking into each other by accident, it is no sandbox.) A runner restarted
remembers nothing and makes each anew. Its ``bin``
comes first on ``PATH`` and it is ``VIRTUAL_ENV``, so ``python`` and
``python -m pip install -e .`` act on it and are thrown away with it. Below
its own packages it sees the runner's (a ``.pth`` naming the runner's site
directories), so ``python -m pytest`` and ``python -m pip`` work without a
download; what a build installs shadows them, and pip never removes a
package outside the environment it installs into. The runner's own
virtualenv leaves ``PATH``; its ``TINYCI_*`` settings (a secret above all)
are not passed on.

Steps also get ``CI=true``, ``CI_BUILD``, ``CI_ATTEMPT``, ``CI_COMMIT``,
``CI_BRANCH``, ``CI_JOB`` (the ``.ci.yaml`` job, "" for a commit's one
default job), ``PYTHONUNBUFFERED=1``, then ``build.env`` and the file's env.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import venv
from pathlib import Path

from .attempt import RunRequest

PTH = "tinyci-runner-site.pth"
PINNED_NS = 946_684_800 * 10 ** 9     # 2000-01-01: the mtime of every entry of a virtualenv as made

# a slot's virtualenv -> its listing when made (see the module docstring). Per
# path, and a slot runs one attempt at a time, so no two threads share an entry
_made: dict[Path, tuple] = {}


def venv_path(checkout: Path) -> Path:
    return checkout.with_name(checkout.name + ".venv")


def make_venv(path: Path) -> Path:
    """A virtualenv at ``path`` as fresh as a new one, that sees the runner's
    packages beneath its own: the one made there before when nothing in it
    changed, else made anew. Blocking (run it in a thread). Raises OSError when
    it cannot be made."""
    made = _made.pop(path, None)
    if made is not None and _listing(path) == made:
        _made[path] = made
        return path
    _create(path)
    _made[path] = _pin(path)
    return path


def _listing(path: Path) -> tuple | None:
    """Every entry under ``path`` (not following links) with what a change moves; None when unreadable."""
    entries = []
    try:
        todo = [path]
        while todo:
            with os.scandir(todo.pop()) as found:
                for entry in found:
                    st = entry.stat(follow_symlinks=False)
                    entries.append((entry.path, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(Path(entry.path))
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, *sorted(entries))


def _pin(path: Path) -> tuple | None:
    """Set every entry's mtime to PINNED_NS (a later write moves it to now) and return the listing."""
    try:
        for top, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.utime(os.path.join(top, name), ns=(PINNED_NS, PINNED_NS), follow_symlinks=False)
        os.utime(path, ns=(PINNED_NS, PINNED_NS))
    except OSError:
        return None     # not remembered: the next attempt makes it anew
    return _listing(path)


def _create(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    try:
        venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(str(path))
    except (OSError, ValueError, RuntimeError) as exc:     # venv raises a few kinds, some not OSError
        raise OSError(f"cannot make a virtualenv at {path}: {exc}") from None
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    runner_sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (site / PTH).write_text("".join(f"{p}\n" for p in runner_sites))


def own_bin() -> str | None:
    """The ``bin`` of the virtualenv tinyci runs from, if it runs from one."""
    return os.path.join(sys.prefix, "bin") if sys.prefix != sys.base_prefix else None


@functools.lru_cache(maxsize=8)
def _path_without(path: str, mine: str | None) -> tuple[str, ...]:
    """``path``'s entries but ``mine`` (however spelt): the same for every build,
    and resolving each entry's links cost a trivial build a millisecond."""
    return tuple(p for p in path.split(os.pathsep)
                 if p and (mine is None or os.path.realpath(p) != os.path.realpath(mine)))


def build_env(request: RunRequest, base: dict | None = None, venv_dir: Path | None = None) -> dict:
    """The environment a step sees (see the module docstring); ``venv_dir``: the
    build's virtualenv, None when it could not be made (then only the runner's
    own virtualenv leaves PATH)."""
    base = dict(os.environ if base is None else base)
    # the runner's own settings (a TINYCI_AUTH_SECRET above all) are not the build's business
    env = {k: v for k, v in base.items() if not k.startswith("TINYCI_")}
    mine = own_bin()
    path = list(_path_without(env.get("PATH") or os.defpath, mine))
    if venv_dir is not None:
        path.insert(0, str(venv_dir / "bin"))
        env["VIRTUAL_ENV"] = str(venv_dir)
    elif mine is not None and os.path.realpath(env.get("VIRTUAL_ENV", "") or "/") == os.path.realpath(sys.prefix):
        del env["VIRTUAL_ENV"]
    env.pop("PYTHONHOME", None)
    env["PATH"] = os.pathsep.join(path)
    env.update(CI="true", CI_BUILD=str(request.build), CI_COMMIT=request.sha, CI_BRANCH=request.branch,
               CI_ATTEMPT=str(request.attempt), CI_JOB=request.job, PYTHONUNBUFFERED="1")
    env.update(request.env)
    return env
