"""Build artifacts on the dispatcher's disk: ``<data_dir>/artifacts/<sha>/<build>/<path>``.

``path`` is the one part a peer chooses, so it is checked before any file is
touched: relative, no ``.``/``..``/empty parts, no backslash or control
characters. Directories are made one level at a time and every level must be
a real directory (never a symlink); the file itself is opened with
O_NOFOLLOW. A path that fails any of this is refused with ArtifactError and
nothing is written. The list of finished uploads is kept in the store's
``artifacts`` table; a file being written is not listed until its last chunk.

A file being written counts against ``max_artifact_bytes`` as much as a
finished one (a runner that never sends ``eof`` would otherwise store without
limit). The uploads in progress are kept in memory per build and attempt
(read back from disk at an attempt's first chunk after a restart); ``settle``
removes them once their attempt is over (a result, the runner lost, a
cancel, a requeue), and a refused chunk removes its own file.

Chunks are written in threads, a chunk between the first and the last
while the next one arrives (``write_off_loop``), and what an upload has is
synced behind it; the last chunk is answered once the whole file is
written and synced, and only then is it listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from . import aio, files, patterns
from .store import Store

log = logging.getLogger(__name__)

_BAD = re.compile(r"[\x00-\x1f\x7f\\]")
MAX_PATH = 1024
# The most one write(2) of a chunk hands the page cache. A big write lets the
# page cache take big folios, and on a VM that reports free memory to its host
# (virtio-balloon free page reporting) the big free blocks are the ones the host
# must fault in again on the first copy. 100 MiB written from one buffer here,
# medians of five: 4 MiB writes 0.18 s, 1 MiB 0.10 s (0.04-0.21), 64 KiB 0.05 s
# (0.046-0.052), a `cp` of it 0.057 s. What the 64 calls of a chunk cost is
# seen where the memory is warm (pages overwritten): 0.65 ms a 4 MiB chunk
# against 0.23 ms in one call, 10 ms more per 100 MiB.
WRITE_PIECE = 64 << 10


class ArtifactError(Exception):
    """A refused upload or fetch; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_path(path: str) -> tuple[str, ...]:
    """The parts of a safe relative path; raises ArtifactError("bad_path") otherwise."""
    parts = tuple(path.split("/"))
    if not path or len(path) > MAX_PATH or _BAD.search(path) or path.startswith("/") or \
            any(part in ("", ".", "..") for part in parts):
        raise ArtifactError("bad_path", f"artifact path {path[:100]!r} must be relative and stay inside "
                                        f"the build's directory (no '..', no absolute path)")
    return parts


@dataclass
class Partial:
    """One attempt's uploads that have not had their last chunk: path -> bytes on disk."""

    attempt: int
    sha: str
    sizes: dict[str, int] = field(default_factory=dict)
    flushing: dict[str, Any] = field(default_factory=dict)     # path -> its sync under way (a future)
    writing: dict[str, Any] = field(default_factory=dict)      # path -> its chunk being written (a future)
    # path -> which upload of it is current: a first chunk starts another (a runner's retry on a
    # new connection), and what the one before still had in flight can no longer list the file
    generation: dict[str, int] = field(default_factory=dict)


class Artifacts:
    def __init__(self, store: Store):
        self.store = store
        self.root = store.dir / "artifacts"
        self.partial: dict[int, Partial] = {}       # by build
        # directories holding one made since: synced with the next file finished, so that
        # a listed artifact's every name is on the disk (each once, not once per file)
        self.unsynced: set[Path] = set()

    def directory(self, build_id: int, sha: str) -> Path:
        if not patterns.is_sha(sha):
            raise ArtifactError("bad_sha", f"build {build_id} has no valid sha")
        return self.root / sha / str(int(build_id))

    def _dirs(self, base: Path, parts: tuple[str, ...], create: bool) -> Path:
        """The directory holding the file, every level checked to be a real directory."""
        here = self.root.parent
        for part in (*base.relative_to(here).parts, *parts[:-1]):
            here = here / part
            try:
                info = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    raise ArtifactError("not_found", "no such artifact") from None
                os.mkdir(here)
                self.unsynced.add(here.parent)
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise ArtifactError("bad_path", f"artifact path leads through {part!r}, which is not a "
                                                f"directory")
        return here

    def clear(self, build_id: int, sha: str) -> None:
        """Forget what an earlier attempt uploaded (a new attempt starts)."""
        self.partial.pop(build_id, None)
        with self.store.transaction():
            self.store.db.execute("DELETE FROM artifacts WHERE build = ?", (build_id,))
        shutil.rmtree(self.directory(build_id, sha), ignore_errors=True)

    def write(self, build_id: int, sha: str, path: str, offset: int, data: bytes | memoryview, eof: bool,
              limit: int, attempt: int = 1) -> int:
        """Write one chunk of ``attempt``'s upload at ``offset`` (0 starts the file
        afresh); returns the file's size. Finished and unfinished files together
        stay within ``limit`` bytes; the last chunk (``eof``) is on the disk
        (fsync) before the file is listed."""
        partial, file = self._admit(build_id, sha, path, offset, len(data), limit, attempt)
        generation = partial.generation.get(path, 0)
        with self._syncing(eof) as parents:
            size = _put(file, path, offset, data, eof, parents)
        return self._done(build_id, partial, path, size, eof, generation)

    async def write_off_loop(self, build_id: int, sha: str, path: str, offset: int, data: bytes | memoryview,
                             eof: bool, limit: int, attempt: int = 1,
                             written_out: Callable[[], None] | None = None) -> int:
        """``write``, the file's writing and syncing in threads (a 4 MiB chunk, and
        the last one's fsync of the whole file, would hold up every other peer),
        and a chunk written while the next one arrives: a chunk between the
        first and the last is answered as soon as the one before it is written,
        with the size written (its own ``offset``), and written in the
        background; the next one waits for it and answers its error. The last
        is answered once the whole file is written and synced, with its size.
        ``written_out`` is called once ``data`` is no longer read (its write
        has returned, whatever came of it): its buffer may then serve again."""
        partial, file = self._admit(build_id, sha, path, offset, len(data), limit, attempt)
        generation = partial.generation.get(path, 0)
        await self._written(build_id, partial, path, quiet=offset == 0)
        if offset == 0 or eof:      # the first makes the file: never behind a removal's back
            # in ``writing`` too, so that a retry's first chunk waits until this write is done
            with self._syncing(eof) as parents:
                work = partial.writing[path] = _quiet(asyncio.ensure_future(
                    aio.in_thread(_put, file, path, offset, data, eof, parents)), written_out)
                try:
                    written = await work
                finally:
                    if partial.writing.get(path) is work:
                        del partial.writing[path]
            size = self._done(build_id, partial, path, written, eof, generation)
        else:
            partial.sizes[path] = offset + len(data)        # where the next chunk goes on
            partial.writing[path] = _quiet(asyncio.ensure_future(aio.in_thread(_put, file, path, offset, data,
                                                                              False)), written_out)
            size = offset
        if not eof:
            self._flush_behind(partial, path, file)
        return size

    @contextlib.contextmanager
    def _syncing(self, eof: bool) -> Iterator[tuple[Path, ...]]:
        """The directories a last chunk's write syncs besides its file's; given
        back should it fail, for the next one to sync."""
        parents, self.unsynced = (tuple(self.unsynced), set()) if eof else ((), self.unsynced)
        try:
            yield parents
        except BaseException:
            self.unsynced.update(parents)
            raise

    async def _written(self, build_id: int, partial: Partial, path: str, quiet: bool = False) -> None:
        """Wait for the chunk of ``path`` being written; its error is raised here,
        unless ``quiet`` (a first chunk: what the upload before it did is over)."""
        writing = partial.writing.pop(path, None)
        if writing is not None:
            try:
                await asyncio.shield(writing)
            except (ArtifactError, OSError):
                if not quiet:
                    raise
            if self.partial.get(build_id) is not partial:
                raise ArtifactError("stale", f"build {build_id}: the upload of {path!r} is over")

    @staticmethod
    def _flush_behind(partial: Partial, path: str, file: Path) -> None:
        """Start putting what the upload has so far on the disk, in a thread,
        unless the last start is still at it: the last chunk's fsync then waits
        for the rest only, not the whole file (~0.2 s per 100 MiB here)."""
        running = partial.flushing.get(path)
        if running is None or running.done():
            partial.flushing[path] = asyncio.ensure_future(aio.in_thread(_sync, file))

    def _admit(self, build_id: int, sha: str, path: str, offset: int, length: int, limit: int,
               attempt: int) -> tuple[Partial, Path]:
        """The checks before a chunk is written: a safe path, the next chunk of an
        upload in progress (or a first one), within ``limit``; the file's path,
        its directories made."""
        parts = check_path(path)
        partial = self._partial(build_id, sha, attempt)
        if offset and partial.sizes.get(path) != offset:
            # also what follows a refused chunk that was already on its way: no second refusal
            raise ArtifactError("offset", f"artifact {path!r} has {partial.sizes.get(path, 0)} bytes, not {offset}")
        used = self.store.db.execute("SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE build = ? "
                                     "AND path != ?", (build_id, path)).fetchone()[0]
        used += sum(size for other, size in partial.sizes.items() if other != path)
        if used + offset + length > limit:
            self._remove(build_id, partial, path)       # the runner gives this file up
            raise ArtifactError("too_large", f"artifacts of build {build_id} would exceed "
                                             f"{limit} bytes (dispatcher.max_artifact_bytes)")
        if offset == 0:
            partial.generation[path] = partial.generation.get(path, 0) + 1
            # the file is about to be written afresh: not listed until it is whole again
            with self.store.transaction():
                self.store.db.execute("DELETE FROM artifacts WHERE build = ? AND path = ?", (build_id, path))
        return partial, self._dirs(self.directory(build_id, sha), parts, create=True) / parts[-1]

    def _done(self, build_id: int, partial: Partial, path: str, size: int, eof: bool, generation: int) -> int:
        """Record a written chunk of upload ``generation`` of ``path``: the file
        listed at its last, else its size so far."""
        if self.partial.get(build_id) is not partial or partial.generation.get(path, 0) != generation:
            # the attempt ended while it was written, or a retry started the file again
            raise ArtifactError("stale", f"build {build_id}: the upload of {path!r} is over")
        if eof:
            partial.sizes.pop(path, None)
            with self.store.transaction():
                self.store.db.execute("INSERT OR REPLACE INTO artifacts (build, path, size) VALUES (?, ?, ?)",
                                      (build_id, path, size))
        else:
            partial.sizes[path] = size
        return size

    def give_up(self, build_id: int, sha: str, attempt: int, path: str, offset: int) -> bool:
        """Remove an upload the dispatcher cannot take (its disk is full); True when
        the refused chunk was its next one (False: one behind an earlier refusal)."""
        partial = self._partial(build_id, sha, attempt)
        in_step = partial.sizes.get(path, 0) == offset
        self._remove(build_id, partial, path)
        return in_step

    def _partial(self, build_id: int, sha: str, attempt: int) -> Partial:
        """The uploads in progress of (build, attempt); at its first chunk since
        this dispatcher started, the unlisted files already on disk (a restart
        came in the middle of an upload)."""
        partial = self.partial.get(build_id)
        if partial is not None and partial.attempt == attempt:
            return partial
        if partial is not None:
            self._drop(build_id)
        partial = self.partial[build_id] = Partial(attempt, sha)
        listed = {row[0] for row in self.store.db.execute("SELECT path FROM artifacts WHERE build = ?",
                                                          (build_id,))}
        base = self.directory(build_id, sha)
        for folder, _, names in os.walk(base):      # never into a symlinked directory
            for name in names:
                file = Path(folder) / name
                rel = file.relative_to(base).as_posix()
                if rel not in listed and file.is_file() and not file.is_symlink():
                    partial.sizes[rel] = file.stat().st_size
        return partial

    def settle(self, is_leased: Callable[[int, int], bool]) -> None:
        """Remove the unfinished uploads of every attempt that is over:
        ``is_leased(build, attempt)`` is False once it ended or was cancelled."""
        for build_id, partial in list(self.partial.items()):
            if not is_leased(build_id, partial.attempt):
                self._drop(build_id)

    def _drop(self, build_id: int) -> None:
        partial = self.partial.pop(build_id)
        for path in list(partial.sizes):
            self._remove(build_id, partial, path)

    def _remove(self, build_id: int, partial: Partial, path: str) -> None:
        """Delete one unfinished upload (and the listing of an earlier, finished
        file of that name, which it had overwritten)."""
        partial.writing.pop(path, None)        # its end is nobody's concern now (``_quiet``)
        if partial.sizes.pop(path, None) is None:
            return
        parts = check_path(path)
        try:
            folder = self._dirs(self.directory(build_id, partial.sha), parts, create=False)
            os.unlink(folder / parts[-1])
        except (ArtifactError, FileNotFoundError):
            pass
        except OSError as exc:
            log.warning("build %d: cannot remove the unfinished artifact %r: %s", build_id, path, exc.strerror)
        with self.store.transaction():
            self.store.db.execute("DELETE FROM artifacts WHERE build = ? AND path = ?", (build_id, path))

    def list(self, build_id: int) -> list[dict]:
        rows = self.store.db.execute("SELECT path, size FROM artifacts WHERE build = ? ORDER BY path",
                                     (build_id,))
        return [{"path": path, "size": size} for path, size in rows]

    def read(self, build_id: int, sha: str, path: str, offset: int, limit: int) -> tuple[bytes, int]:
        """(up to ``limit`` bytes from ``offset``, the file's size) of a listed artifact."""
        with self.open(build_id, sha, path) as file:
            size = os.fstat(file.fileno()).st_size
            if offset >= size:
                return b"", size        # the end; no seek, which fails far past it
            return os.pread(file.fileno(), limit, offset), size

    def open(self, build_id: int, sha: str, path: str) -> BinaryIO:
        """A listed artifact's file, open for reading (unbuffered: it is read by
        offset or sent with sendfile); ArtifactError when there is none."""
        parts = check_path(path)
        if not self.store.db.execute("SELECT 1 FROM artifacts WHERE build = ? AND path = ?",
                                     (build_id, path)).fetchone():
            raise ArtifactError("not_found", f"build {build_id} has no artifact {path!r}")
        folder = self._dirs(self.directory(build_id, sha), parts, create=False)
        try:
            fd = os.open(folder / parts[-1], os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ArtifactError("not_found", f"artifact {path!r} of build {build_id}: {exc.strerror}") from None
        return open(fd, "rb", buffering=0)


def _put(file: Path, path: str, offset: int, data: bytes | memoryview, eof: bool,
         parents: tuple[Path, ...] = ()) -> int:
    """Write ``data`` at ``offset`` of ``file`` (the first chunk makes it, never
    through a symlink), synced when it is the last, with its directory and
    ``parents``; returns the file's size."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | (os.O_CREAT | os.O_TRUNC if offset == 0 else 0)
    try:
        fd = os.open(file, flags, 0o644)
    except FileNotFoundError:
        raise ArtifactError("offset", f"artifact {path!r} has 0 bytes, not {offset}") from None
    except OSError as exc:
        raise ArtifactError("bad_path", f"cannot write artifact {path!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError("bad_path", f"artifact {path!r} is not a regular file")
        if offset != info.st_size:
            raise ArtifactError("offset", f"artifact {path!r} has {info.st_size} bytes, not {offset}")
        view = memoryview(data)
        while view:         # a write may take less than all (a signal, a full disk's last blocks)
            view = view[os.pwrite(fd, view[:WRITE_PIECE], offset + len(data) - len(view)):]
        if eof:
            os.ftruncate(fd, offset + len(data))    # nothing past the end, whatever wrote there before
            os.fsync(fd)    # listed, and acknowledged, only once it is on the disk
            for directory in {file.parent, *parents}:      # and every name on the way to it
                files.sync_dir(directory)
        return offset + len(data)
    finally:
        os.close(fd)


def _quiet(future: Any, then: Callable[[], None] | None = None) -> Any:
    """``future``, its error taken when nobody waits for it (an upload given up);
    ``then`` called once its thread has returned (not when it was cancelled:
    the thread may be at work still)."""
    def finished(done: Any) -> None:
        if not done.cancelled():
            done.exception()
            if then is not None:
                then()
    future.add_done_callback(finished)
    return future


def _sync(file: Path) -> None:
    """fdatasync ``file``; nothing when it is gone (the upload was given up meanwhile)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.fdatasync(fd)
    except OSError:
        pass            # the last chunk's fsync reports what matters
    finally:
        os.close(fd)
