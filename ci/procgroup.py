"""Process groups of build steps: whether one is still alive, signalling and
killing the whole group, and the markers that let a restarted runner end the
groups its killed predecessor left running.

Every step runs in its own session (so its own process group, id = the
shell's pid); killing the group kills every process the step started, unless
one left the group on purpose (setsid, or a double fork and a new group).
Linux's /proc tells live members from zombies; without /proc,
``killpg(pgid, 0)`` is the best answer there is.

Those that left are strays. On Linux the runner is the subreaper of its
descendants (``become_subreaper``), so a stray whose parent exits is
reparented to the runner rather than to init, and stays findable: after each
step, ``end_strays`` kills every descendant of the runner that is outside
the runner's own session (git and its helpers, which the runner starts
itself, stay in it: a step's processes never can, a session cannot be
joined) and that no live step owns (``Steps``: the live steps' shells, and
the mark each step carries in its environment, so one slot's step ending
never touches another's), then reaps them. A process that clears its
environment loses its mark and goes at the next step's end; one that
forges another live step's mark lives until that step ends.

A marker is a file ``<checkout>.pgid`` beside the slot's checkout holding
"<pgid> <boot id> <mark>": written before a step starts (pgid 0: a runner
killed between the spawn and the moment it learns the pid still leaves the
step's mark behind), written again with the group id once it is known,
removed when the step ends. A restarted runner kills the marked group and
every process still carrying the mark. A marker from before a reboot names
nothing: its group id may belong to anyone.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".pgid"
STEP_MARK = "TINYCI_STEP"       # in each step's environment: which live step a process belongs to
PR_SET_CHILD_SUBREAPER = 36     # <linux/prctl.h>
STRAY_KILL_TIME = 5.0           # after the grace: how long SIGKILL rounds may go on (a process forking on)
KILL_WAIT = 2.0                 # after SIGKILL: how long to wait for the group to be gone


def _stat(pid: str) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields follow the last ")"
    return stat[stat.rfind(b")") + 2:].split()


def group_members(pgid: int) -> list[int] | None:
    """Live (not zombie) processes in group ``pgid``, read from /proc; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        fields = _stat(entry) if entry.isdigit() else None
        if fields and len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
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
        # SIGKILL is delivered, not yet done: wait (bounded) until the group is
        # gone, so the caller may count on it (a loaded machine can take a while)
        deadline = time.monotonic() + KILL_WAIT
        while group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- strays

def become_subreaper(on: bool = True) -> bool:
    """Make this process the one its orphaned descendants are reparented to
    (Linux's PR_SET_CHILD_SUBREAPER; ``on`` False undoes it); False where that
    cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Steps:
    """The steps running in this process: the mark each carries in its
    environment and, once started, its shell's pid."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}

    def begin(self) -> str:
        """A new step's mark, to put in its environment as STEP_MARK before it starts."""
        mark = secrets.token_hex(8)
        self.live[mark] = 0
        return mark

    def started(self, mark: str, pid: int) -> None:
        self.live[mark] = pid

    def end(self, mark: str) -> None:
        self.live.pop(mark, None)


def _mark_of(pid: int) -> str | None:
    environ = b""
    for attempt in range(3):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            return None
        if environ:
            break
        # empty while the process is inside execve (a step's `setsid sleep` being
        # exec'd): read it again rather than take a live step's child for a stray
        time.sleep(0.02)
    prefix = STEP_MARK.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def strays(steps: Steps, keep: frozenset = frozenset()) -> tuple[list[int], list[int]]:
    """(live, zombie) descendants of this process that are outside its session
    and belong to no live step of ``steps``; only zombies that are this
    process's own children, and not in ``keep`` (a shell asyncio still has to
    reap), are listed. Empty without /proc."""
    me, session = os.getpid(), os.getsid(0)
    children = _children_reader(me)
    if children is None:
        return [], []
    owned = {pid for pid in steps.live.values() if pid}
    # a step being started (another slot's) is a child of ours whose pid is not known yet, and
    # not marked yet either (it runs with our environment until its exec; a quick one may
    # already be a zombie asyncio must reap): leave our children for the next scan meanwhile
    starting = 0 in steps.live.values()
    live, zombies = [], []
    todo = children(me)
    while todo:
        pid, fields = todo.pop()
        if int(fields[3]) == session or pid in owned:
            continue            # the runner's own helpers, or a live step's shell and all below it
        if starting and int(fields[1]) == me:
            continue
        if fields[0] in (b"Z", b"X"):
            if int(fields[1]) == me and pid not in keep:
                zombies.append(pid)
            continue
        if _mark_of(pid) in steps.live:
            continue            # started by a step still running (in another slot)
        live.append(pid)
        todo.extend(children(pid))
    return live, zombies


Children = Callable[[int], list[tuple[int, list[bytes]]]]


def _children_reader(me: int) -> Children | None:
    """How to list a process's children with their stat fields. Linux's
    ``/proc/<pid>/task/<tid>/children`` names them directly: a few reads after
    each step, where a scan of every process's stat costs milliseconds on a busy
    machine (it ran after every step). Without those files, one scan of /proc;
    None without /proc."""
    if os.path.exists(f"/proc/{me}/task/{me}/children"):
        return _direct_children
    return _scanned_children()


def _scanned_children() -> Children | None:
    """Every process's children, from one scan of /proc; None without /proc."""
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    by_parent: dict[int, list[tuple[int, list[bytes]]]] = {}
    for entry in entries:
        fields = _stat(entry)
        if fields and len(fields) > 3:
            by_parent.setdefault(int(fields[1]), []).append((int(entry), fields))
    return lambda pid: list(by_parent.get(pid, ()))


def _direct_children(pid: int) -> list[tuple[int, list[bytes]]]:
    """``pid``'s children (a child belongs to the thread that forked it: every task's list)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []           # gone meanwhile
    found = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += f.read().split()
        except OSError:
            continue        # the thread ended meanwhile
    listed = []
    for child in dict.fromkeys(found):
        fields = _stat(child.decode())
        if fields and len(fields) > 3:
            listed.append((int(child), fields))
    return listed


def _reap(zombies: list[int]) -> None:
    for pid in zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def kill_strays_now(steps: Steps, keep: frozenset = frozenset()) -> None:
    """SIGKILL the strays at once, without waiting (a step torn down mid-way)."""
    live, zombies = strays(steps, keep)
    for pid in live:
        _signal(pid, signal.SIGKILL)
    _reap(zombies)


async def end_strays(steps: Steps, grace: float, keep: frozenset = frozenset()) -> list[int]:
    """End the strays (see the module docstring): SIGTERM, SIGKILL whatever is
    left after ``grace`` seconds, and reap them. Returns the pids signalled."""
    live, zombies = strays(steps, keep)
    _reap(zombies)
    if not live:
        return []
    ended = list(live)
    for pid in live:
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)        # a stopped process only sees SIGTERM once resumed
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        live, zombies = strays(steps, keep)
        _reap(zombies)
    # SIGKILL rounds: one that forked meanwhile leaves a child, which the next round finds
    deadline = time.monotonic() + STRAY_KILL_TIME
    while live and time.monotonic() < deadline:
        log.info("killing %d process(es) a build step left outside its group: %s",
                 len(live), " ".join(map(str, live[:20])))
        ended += [pid for pid in live if pid not in ended]
        for pid in live:
            _signal(pid, signal.SIGKILL)
        await asyncio.sleep(0.02)
        live, zombies = strays(steps, keep)
        _reap(zombies)
    if live:
        log.warning("%d process(es) a build step left are still alive after SIGKILL: %s",
                    len(live), " ".join(map(str, live[:20])))
    return ended


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- markers

def boot_id() -> str:
    """This boot's id ("" without /proc): group ids mean nothing across a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def mark_group(checkout: Path, pgid: int, mark: str = "") -> Path:
    """Note a step's process group (0 while it is being started) and its mark
    beside its checkout, so a runner restarted after a SIGKILL can end what its
    predecessor left running there."""
    marker = checkout.with_name(checkout.name + MARKER_SUFFIX)
    marker.write_text(f"{pgid} {boot_id()} {mark}".rstrip() + "\n")
    return marker


def _groups_marked(marks: set[str]) -> set[int]:
    """The process groups of every process whose environment carries one of ``marks``."""
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return set()
    wanted = {f"{STEP_MARK}={mark}".encode() for mark in marks}
    groups = set()
    for entry in entries:
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue        # gone, or not ours to read
        if wanted.intersection(environ.split(b"\0")):
            fields = _stat(entry)
            if fields and len(fields) > 2:
                groups.add(int(fields[2]))
    return groups


def reap_orphans(checkouts: Path) -> list[int]:
    """Kill the step process groups a previous run of this runner left behind
    (it was killed mid-step); returns the groups killed. Every marker found is
    removed."""
    boot = boot_id()
    groups, marks = set(), set()
    for marker in checkouts.glob("*" + MARKER_SUFFIX):
        try:
            # split on single spaces: without /proc the boot id is "", and the mark stays third
            pgid_text, marked_boot, mark = (marker.read_text().strip("\n").split(" ") + ["", ""])[:3]
            pgid = int(pgid_text)
        except (OSError, ValueError):
            pgid, marked_boot, mark = 0, "", ""
        if marked_boot == boot:
            if pgid > 1:
                groups.add(pgid)
            if mark:
                marks.add(mark)
        marker.unlink(missing_ok=True)
    if marks:
        groups |= _groups_marked(marks)
    groups -= {0, 1, os.getpgid(0)}         # never this runner's own group (a step may have started it)
    killed = []
    for pgid in sorted(groups):
        if group_alive(pgid) and signal_group(pgid, signal.SIGKILL):
            killed.append(pgid)
    return killed
