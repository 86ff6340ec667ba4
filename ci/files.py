"""Files that must survive a crash or be held by one process: atomic writes
and the exclusive lock a daemon takes on its working directory;
``tree_bytes``, what a directory's files take (cache entries, artifacts); and
``write_all``, every byte to a descriptor (``os.write`` may take fewer).

Both are the standard recipe written once: write to a temporary file beside
the target, fsync it, rename it over the target, fsync the directory (so the
rename itself survives a power cut); and ``flock`` on a lock file that stays
open for the life of the process (the kernel drops it when the process dies,
however it dies).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockedError(Exception):
    """Another process holds the lock; the message names the lock file.
    ``pid``: the holder's, as it wrote it in the lock file (None: unknown)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a reader (or a restart after a
    crash) sees either the old content or the new, never a mix. Raises OSError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # a leftover from a crash is removed, not reused: reusing it would keep its
    # permissions, and a secret meant to be 0600 could end up readable
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def tree_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (a file: its size), symlinks not followed."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:          # gone meanwhile, or unreadable: not counted
                pass
    return total


def sync_dir(directory: Path) -> None:
    """fsync a directory, so renames and creations in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``path``, held until ``release``
    or the end of the process. The holder writes its pid in the file, so the
    refusal can name it (the file outlives its holder: the lock is the flock,
    never the file's content)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock. Raises LockedError when another process holds it,
        OSError when the lock file cannot be made."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f" (pid {pid})" if pid else ""
            raise LockedError(f"{self.path} is locked by another process{holder}", pid) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass                # a full disk: the lock holds all the same, only nameless

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_all(fd: int, data) -> None:
    """All of ``data`` to ``fd``: a write may take part of it (a full disk's
    last blocks, a signal), and the next one then says why it stopped."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
