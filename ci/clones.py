"""A runner's working clones over months: each slot's clone records when it
last built (the mtime of ``checkouts/<slot>.used``), and a clone no build has
used for ``runner.clone_days`` is deleted, with its marker, so a runner left
running does not keep every repository it ever built. The next build in that
slot clones afresh.

A clone is first moved aside (a rename, done on the runner's loop while the
slot is seen idle, so a build cannot start in it meanwhile), then deleted in a
thread. Days are wall-clock days (file times, as a person counts them);
nothing here is a deadline a process waits on.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DAY = 86400.0
SWEEP_INTERVAL = 3600.0         # seconds between looks while the runner runs
TRASH = ".deleting-"            # the prefix of a clone moved aside to be deleted


def marker(checkout: Path) -> Path:
    return checkout.with_name(checkout.name + ".used")


def used(checkout: Path) -> None:
    """Note that a build used this slot's clone just now."""
    try:
        marker(checkout).touch()
    except OSError as exc:          # a full disk: the clone may be swept earlier than it should
        log.warning("cannot mark %s as used: %s", checkout, exc.strerror or exc)


def stale(checkouts: Path, days: float, now: float) -> list[tuple[Path, float]]:
    """The slots' clones under ``checkouts`` last used more than ``days`` ago,
    with their age in days; a clone with no marker counts from its own last
    change. ``days`` 0 keeps them all."""
    if days <= 0 or not checkouts.is_dir():
        return []
    found = []
    for clone in sorted(checkouts.iterdir()):
        if not clone.is_dir() or not clone.name.isdigit():
            continue
        stamp = marker(clone)
        try:
            last = (stamp if stamp.exists() else clone).stat().st_mtime
        except OSError:
            continue
        if now - last > days * DAY:
            found.append((clone, (now - last) / DAY))
    return found


def set_aside(clone: Path) -> Path | None:
    """Move a clone out of its slot's way (cheap: a rename); None when it cannot be."""
    trash = clone.with_name(f"{TRASH}{clone.name}-{os.getpid()}")
    try:
        os.rename(clone, trash)
    except OSError as exc:
        log.warning("cannot delete the working clone %s: %s", clone, exc.strerror or exc)
        return None
    marker(clone).unlink(missing_ok=True)
    return trash


def delete_aside(checkouts: Path) -> None:
    """Delete every clone set aside (also what a runner killed mid-way left)."""
    if checkouts.is_dir():
        for trash in checkouts.glob(f"{TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)
