"""Process groups of build steps: whether one is still alive, signalling and
killing the whole group, and the markers that let a restarted runner end the
groups its killed predecessor left running.

Every step runs in its own session (so its own process group, id = the
shell's pid); killing the group kills every process the step started, unless
one left the group on purpose (setsid). Linux's /proc tells live members from
zombies; without /proc, ``killpg(pgid, 0)`` is the best answer there is.

A marker is a file ``<checkout>.pgid`` beside the slot's checkout holding
"<pgid> <boot id>": written when a step starts, removed when it ends. A
marker from before a reboot names nothing: its group id may belong to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".pgid"


def group_members(pgid: int) -> list[int] | None:
    """Live (not zombie) processes in group ``pgid``, read from /proc; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False    # not even a zombie: spare the scan of /proc, as at the end of most steps
    except PermissionError:
        pass
    members = group_members(pgid)       # zombies count for killpg but are dead
    return True if members is None else bool(members)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when it is gone or not ours to signal."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("cannot signal process group %d: %s", pgid, exc)
        return False


async def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM every process in the group, then SIGKILL whatever is left after ``grace`` seconds."""
    if not group_alive(pgid) or not signal_group(pgid, signal.SIGTERM):
        return
    signal_group(pgid, signal.SIGCONT)      # a stopped process only sees SIGTERM once resumed
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        await asyncio.sleep(0.05)
    if group_alive(pgid):
        log.info("process group %d ignored SIGTERM for %gs; sending SIGKILL", pgid, grace)
        signal_group(pgid, signal.SIGKILL)


def boot_id() -> str:
    """This boot's id ("" without /proc): group ids mean nothing across a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def mark_group(checkout: Path, pgid: int) -> Path:
    """Note a running step's process group beside its checkout, so a runner
    restarted after a SIGKILL can end what its predecessor left running there."""
    marker = checkout.with_name(checkout.name + MARKER_SUFFIX)
    marker.write_text(f"{pgid} {boot_id()}\n")
    return marker


def reap_orphans(checkouts: Path) -> list[int]:
    """Kill the step process groups a previous run of this runner left behind
    (it was killed mid-step); returns the groups killed. Every marker found is
    removed."""
    killed = []
    boot = boot_id()
    for marker in checkouts.glob("*" + MARKER_SUFFIX):
        try:
            pgid_text, _, marked_boot = marker.read_text().strip().partition(" ")
            pgid = int(pgid_text)
        except (OSError, ValueError):
            pgid = 0
            marked_boot = ""
        if pgid > 1 and marked_boot == boot and group_alive(pgid) and signal_group(pgid, signal.SIGKILL):
            killed.append(pgid)
        marker.unlink(missing_ok=True)
    return killed
