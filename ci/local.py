"""What a tool or a daemon finds on this machine without being told: the
`tinyci up` it runs under, and the loopback address of a daemon that
listens on every interface. Standard library only: `tinyci notify` runs in
every git hook and must stay light.

`tinyci up` keeps its data in ``.tinyci/`` (``DATA``) of the directory it
ran in: the secret it made for its daemons (``secret``) and, while it runs,
the addresses it chose (``up.json``: dispatcher, observer, web, its pid).
``find_up`` looks for that directory from the current one upwards, so the
tools, a git hook and a daemon started by hand work from anywhere below
where `up` ran (in the demo repository, say) as they do beside it.

``TINYCI_CEILING`` (directories, separated by ``:``) stops that search: it
looks in no ceiling directory and nothing above one, as git's
``GIT_CEILING_DIRECTORIES`` does for ``.git``. tinyci's own tests set it to
their checkout, so a `tinyci up` run by hand in that clone (or a runner
building tinyci under an `up` directory) does not lend them its secret.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any

DATA = ".tinyci"                                # `tinyci up`'s default --data
LOCAL_SECRET = os.path.join(DATA, "secret")     # the secret `tinyci up` makes for its daemons
UP_FILE = "up.json"                             # the addresses of a running `tinyci up`
CEILING = "TINYCI_CEILING"                      # where find_up stops looking (see above)


@dataclass(frozen=True)
class Up:
    """A `tinyci up` directory found above the current one: ``data`` is its
    ``.tinyci``; ``secret`` "" when it keeps none (the configuration sets
    one); ``addrs`` what it listens on while it runs ({} when it does not)."""

    data: Path
    secret: str = ""
    addrs: dict = field(default_factory=dict)

    @property
    def secret_path(self) -> Path:
        return self.data / "secret"


def find_up(start: str | os.PathLike | None = None) -> Up | None:
    """The nearest `tinyci up` directory at ``start`` (default: the current
    directory) or above: one whose ``.tinyci/`` holds a secret or an up.json."""
    try:
        here = Path(os.path.abspath(start if start is not None else os.getcwd()))
    except OSError:             # the current directory was removed
        return None
    ceilings = ceiling_dirs()
    for directory in (here, *here.parents):
        if directory in ceilings:
            return None
        data = directory / DATA
        secret, addrs = _read_secret(data / "secret"), _running(data / UP_FILE)
        if secret or addrs:
            return Up(data, secret, addrs)
    return None


def ceiling_dirs() -> set[Path]:
    """The directories of TINYCI_CEILING, absolute (relative entries are ignored, as git does)."""
    return {Path(os.path.normpath(entry)) for entry in os.environ.get(CEILING, "").split(os.pathsep)
            if os.path.isabs(entry)}


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _running(path: Path) -> dict:
    """up.json's addresses, when the `tinyci up` that wrote it still runs."""
    try:
        data = json.loads(path.read_text())
        pid = int(data["pid"])
        os.kill(pid, 0)
    except PermissionError:     # alive, as another user
        pass
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}
    return {key: data[key] for key in ("dispatcher", "observer", "web") if isinstance(data.get(key), str)}


def tool_secret(settings: Any, role: str, secret_file: str | None = None) -> str:
    """The secret a tool uses for ``role``: an explicit --secret-file first, then the
    configured one (``settings``, may be None), then that of the `tinyci up` above."""
    if secret_file:
        return _read_secret(Path(secret_file))
    secret = settings.secret(role) if settings is not None else ""
    if secret:
        return secret
    up = find_up()
    return up.secret if up is not None else ""


def secret_source(settings: Any, role: str) -> str:
    """Where ``tool_secret`` took the secret from, for an error that must say why it was refused."""
    if settings is not None and settings.secret(role):
        return "the configured secret"
    up = find_up()
    if up is None or not up.secret:
        stop = f" below {os.environ[CEILING]} ({CEILING})" if ceiling_dirs() else ""
        return f"no secret: no {LOCAL_SECRET} in {os.getcwd()} or any directory above it{stop}"
    return f"the secret of `tinyci up` in {up.secret_path}"


def up_address(daemon: str) -> str | None:
    """HOST:PORT the running `tinyci up` above chose for ``daemon``, if any."""
    up = find_up()
    return up.addrs.get(daemon) if up is not None else None


def dial_host(host: str) -> str:
    """A daemon listening on every interface is reached on loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
