"""Where a runner keeps its clones, logs and outbox, and the claim on its
name: a runner without ``--name`` is ``<host>-<n>``, the lowest n whose
default workdir (``.tinyci/runners/<host>-<n>``) no live runner holds. The
lock on that workdir is the claim, so a runner restarted in the same place
gets its name (and its outbox) back.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from . import files
from .local import DATA, find_up

DEFAULT_NAMES = 1000        # <host>-1 ... <host>-1000: how many unnamed runners one directory holds


class ClaimError(Exception):
    """The workdir or every default name is held by another live runner (the message says which)."""


def host_stem() -> str:
    """This machine's short host name, made a valid runner name (the stem of a default name)."""
    stem = re.sub(r"[^\w.:@-]", "-", socket.gethostname().split(".")[0])[:90]
    return stem or "runner"


def runners_dir() -> Path:
    """Where runners keep their workdirs by default: beside the other runners of
    the `tinyci up` this one was started under (in or below its directory), if any."""
    up = find_up()
    return (up.data if up is not None else Path(DATA)) / "runners"


def claim(workdir: Path) -> files.DirLock:
    """Lock ``workdir`` for this process's life (ClaimError: another runner holds it)."""
    lock = files.DirLock(workdir / ".lock")
    try:
        lock.acquire()
    except files.LockedError:
        raise ClaimError(f"runner workdir {workdir} is in use by another runner "
                         f"(give each runner its own --workdir or --name)") from None
    return lock


def claim_default_name() -> tuple[str, files.DirLock]:
    """<host>-<n> for the lowest n whose default workdir no live runner holds, and
    the lock held on it (kept with --workdir too: it is the claim on the name)."""
    stem, where = host_stem(), runners_dir()
    for n in range(1, DEFAULT_NAMES + 1):
        lock = files.DirLock((where / f"{stem}-{n}" / ".lock").absolute())
        try:
            lock.acquire()
        except files.LockedError:
            continue
        except OSError as exc:
            raise ClaimError(f"runner workdir {lock.path.parent}: {exc.strerror or exc}") from None
        return f"{stem}-{n}", lock
    raise ClaimError(f"runner names {stem}-1 to {stem}-{DEFAULT_NAMES} are all held by live "
                     f"runners in {where.absolute()}; give this one a --name")
