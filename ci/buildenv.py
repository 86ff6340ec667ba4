"""The environment a build's steps run in, such that no step can change the
one tinyci runs from.

Each attempt gets a fresh virtualenv, ``<checkout>.venv`` beside its slot's
checkout, made anew (no pip of its own: tens of milliseconds). Its ``bin``
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

import os
import shutil
import sys
import venv
from pathlib import Path

from .attempt import RunRequest

PTH = "tinyci-runner-site.pth"


def venv_path(checkout: Path) -> Path:
    return checkout.with_name(checkout.name + ".venv")


def make_venv(path: Path) -> Path:
    """A fresh virtualenv at ``path`` that sees the runner's packages beneath its
    own; blocking (run it in a thread). Raises OSError when it cannot be made."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    try:
        venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(str(path))
    except (OSError, ValueError, RuntimeError) as exc:     # venv raises a few kinds, some not OSError
        raise OSError(f"cannot make a virtualenv at {path}: {exc}") from None
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    runner_sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (site / PTH).write_text("".join(f"{p}\n" for p in runner_sites))
    return path


def own_bin() -> str | None:
    """The ``bin`` of the virtualenv tinyci runs from, if it runs from one."""
    return os.path.join(sys.prefix, "bin") if sys.prefix != sys.base_prefix else None


def build_env(request: RunRequest, base: dict | None = None, venv_dir: Path | None = None) -> dict:
    """The environment a step sees (see the module docstring); ``venv_dir``: the
    build's virtualenv, None when it could not be made (then only the runner's
    own virtualenv leaves PATH)."""
    base = dict(os.environ if base is None else base)
    # the runner's own settings (a TINYCI_AUTH_SECRET above all) are not the build's business
    env = {k: v for k, v in base.items() if not k.startswith("TINYCI_")}
    mine = own_bin()
    path = [p for p in (env.get("PATH") or os.defpath).split(os.pathsep)
            if p and (mine is None or os.path.realpath(p) != os.path.realpath(mine))]
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
