"""A runner's build cache: the ``.ci.yaml`` ``cache`` paths (``.venv``,
``~/.cache/pip``) kept between passing builds, so that a build does not
create its virtualenv and download its packages every time.

Kept under the runner's workdir (``<workdir>/cache``), one directory per key::

    cache/<key>/meta.json       {"paths": [...], "bytes": N}
    cache/<key>/data/<i>/...    path i as it was when the build passed (absent: it did not exist)
    cache/.lock                 flock: shared while restoring, exclusive to add or evict

The key is a hash of the job's name, the cached paths and the content of
every file the ``key`` globs match (``requirements*.txt``): change one and
the build misses. A path is in the checkout, or under ``~/``: the ``HOME``
the steps see (``buildenv`` passes the runner's own on).

Saving copies the paths into ``.tmp-<random>`` and renames it into place
under the exclusive lock: a cache half written (a crash, a full disk) is
never restored, only swept away when the runner next starts; when two slots
save the same key the second finds it there and drops its copy. The cache
stays under ``runner.cache_bytes`` by evicting the least recently used
entries (a hit counts as a use: the entry's mtime); an entry larger than the
cap on its own is not saved at all. 0 turns the cache off.

Restoring copies (never links): a build changing a restored file in place
must not change the cache. A restored path that would pass through a
symlink out of the checkout (or HOME) is refused.

Everything here blocks: the runner calls it in a thread (``aio.in_thread``).
Every method returns the build log's lines rather than writing them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import files
from .buildfile import CacheSpec

MIB = 1 << 20
KEY_HEX = 20                    # characters of the sha256 a key keeps
MAX_KEY_FILES = 2000            # files the key globs may match...
MAX_KEY_BYTES = 256 * MIB       # ...and bytes hashed: beyond, the cache is skipped, said in the log
LOCK_WAIT = 120.0               # seconds a restore or save waits for another slot's eviction or save


class CacheError(Exception):
    """This build cannot use the cache (the message says why); the build goes on without it."""


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def compute_key(checkout: Path, spec: CacheSpec, job: str) -> str:
    """The hash of the job, the paths and the content of the files the key globs match."""
    digest = hashlib.sha256(b"tinyci-cache-1\0" + job.encode() + b"\0" + json.dumps(spec.paths).encode())
    root, count, hashed = checkout.resolve(), 0, 0
    for pattern in spec.key:
        digest.update(b"\0glob\0" + pattern.encode())
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel.split("/")[0] == ".git" or path.is_symlink() or not path.is_file():
                continue
            count += 1
            hashed += path.stat().st_size
            if count > MAX_KEY_FILES or hashed > MAX_KEY_BYTES:
                raise CacheError(f"the key globs match more than {MAX_KEY_FILES} files or "
                                 f"{mib(MAX_KEY_BYTES)}; name the few files the cache depends on")
            digest.update(b"\0file\0" + rel.encode() + b"\0" + _file_hash(path))
    return digest.hexdigest()[:KEY_HEX]


def _file_hash(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def place(path: str, checkout: Path, home: str | None) -> Path:
    """Where a cache path is on this runner: in the checkout, or under HOME for ``~/``.
    Raises CacheError for a path that would leave them through a symlink."""
    if path.startswith("~/"):
        if not home:
            raise CacheError(f"{path}: the steps have no HOME")
        base, rel = Path(home), path[2:]
    else:
        base, rel = checkout, path
    target = base / rel
    real_base = os.path.realpath(base)
    if os.path.commonpath([real_base, os.path.realpath(target.parent)]) != real_base or target.is_symlink():
        raise CacheError(f"{path}: passes through a symlink out of {base}")
    return target


def _copy(src: Path, dst: Path) -> None:
    """``src`` (a tree or a file) to ``dst``, merged into what is there; symlinks copied as links."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)


class Cache:
    """One runner's cache directory, shared by its slots (threads of one process:
    flock on separate opens of the lock file excludes them from each other)."""

    def __init__(self, root: Path, cap: int):
        self.root = root
        self.cap = cap
        if cap > 0:
            root.mkdir(parents=True, exist_ok=True)
            self.sweep()

    @property
    def on(self) -> bool:
        return self.cap > 0

    def sweep(self) -> None:
        """Remove what a killed runner left half done; only at start, when no slot runs."""
        for leftover in list(self.root.glob(".tmp-*")) + list(self.root.glob(".trash-*")):
            shutil.rmtree(leftover, ignore_errors=True)

    @contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, how | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CacheError(f"the cache at {self.root} stayed locked for {LOCK_WAIT:g} s "
                                         f"by another slot") from None
                    time.sleep(0.05)    # in a worker thread; another slot's copy takes about this long
            yield
        finally:
            os.close(fd)        # releases the lock

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, dir) of every complete entry, least recently used first."""
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                size = json.loads((entry / "meta.json").read_text())["bytes"]
                out.append((entry.stat().st_mtime, int(size), entry))
            except (OSError, ValueError, KeyError, TypeError):
                out.append((0.0, files.tree_bytes(entry), entry))     # damaged: the first to go
        return sorted(out, key=lambda e: (e[0], e[2].name))

    def used(self) -> int:
        return sum(size for _, size, _ in self.entries())

    # ------------------------------------------------------------ restore

    def restore(self, key: str, paths: tuple, checkout: Path, home: str | None) -> list[str]:
        """Copy the entry's paths into place; lines for the build log (hit or miss)."""
        entry = self.root / key
        with self._locked(fcntl.LOCK_SH):
            if not (entry / "meta.json").is_file():
                return [f"cache: miss {key}"]
            os.utime(entry)             # a use, for least-recently-used eviction
            size = json.loads((entry / "meta.json").read_text()).get("bytes", 0)
            restored = 0
            for number, path in enumerate(paths):
                src = entry / "data" / str(number)
                if not src.exists() and not src.is_symlink():
                    continue
                _copy(src, place(path, checkout, home))
                restored += 1
        return [f"cache: hit {key} ({restored} path(s), {mib(size)} restored)"]

    # ------------------------------------------------------------ save

    def save(self, key: str, paths: tuple, checkout: Path, home: str | None) -> list[str]:
        """Keep the paths under ``key`` (after a passing build); lines for the build log."""
        if (self.root / key / "meta.json").is_file():
            return [f"cache: {key} is already saved; kept as it is"]
        places = [(number, place(path, checkout, home)) for number, path in enumerate(paths)]
        size = sum(files.tree_bytes(p) for _, p in places if p.exists() or p.is_symlink())
        if size > self.cap:
            return [f"cache: not saved: over runner.cache_bytes ({mib(size)} > {mib(self.cap)})"]
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            for number, path in places:
                if path.exists() or path.is_symlink():
                    _copy(path, tmp / "data" / str(number))
            tmp.mkdir(exist_ok=True)
            files.atomic_write(tmp / "meta.json", json.dumps({"paths": list(paths), "bytes": size}).encode())
            with self._locked(fcntl.LOCK_EX):
                try:
                    os.rename(tmp, self.root / key)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    return [f"cache: {key} was saved meanwhile by another slot; kept that one"]
                os.utime(self.root / key)       # its first use
                files.sync_dir(self.root)
                gone = self._evict(keep=key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        lines = [f"cache: saved {key} ({mib(size)})"]
        if gone:
            lines.append(f"cache: evicted {len(gone)} least recently used entr{'y' if len(gone) == 1 else 'ies'} "
                         f"({mib(sum(gone))}) to stay under runner.cache_bytes ({mib(self.cap)})")
        return lines

    def _evict(self, keep: str) -> list[int]:
        """Remove the least recently used entries until the cache fits the cap (held: LOCK_EX)."""
        entries = self.entries()
        total, gone = sum(size for _, size, _ in entries), []
        for _, size, entry in entries:
            if total <= self.cap:
                break
            if entry.name == keep:
                continue
            # renamed under the lock (no restore can start on it), deleted after
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            gone.append(size)
        return gone


def restore_lines(cache: Cache | None, spec: CacheSpec | None, checkout: Path, job: str,
                  home: str | None) -> tuple[str | None, list[str]]:
    """Before the steps: (the key, or None when there is no cache to save later; log lines)."""
    if spec is None:
        return None, []
    if cache is None or not cache.on:
        return None, ["cache: off on this runner (runner.cache_bytes is 0)"]
    try:
        key = compute_key(checkout, spec, job)
        return key, cache.restore(key, spec.paths, checkout, home)
    except (CacheError, OSError, ValueError) as exc:
        return None, [f"cache: not used: {exc}"]


def save_lines(cache: Cache, spec: CacheSpec, key: str, checkout: Path, home: str | None) -> list[str]:
    """After a passing build: save under the key computed before the steps."""
    try:
        return cache.save(key, spec.paths, checkout, home)
    except (CacheError, OSError, ValueError) as exc:
        return [f"cache: not saved: {exc}"]
