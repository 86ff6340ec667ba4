"""Build artifacts on the dispatcher's disk: ``<data_dir>/artifacts/<sha>/<build>/<path>``.

``path`` is the one part a peer chooses, so it is checked before any file is
touched: relative, no ``.``/``..``/empty parts, no backslash or control
characters. Directories are made one level at a time and every level must be
a real directory (never a symlink); the file itself is opened with
O_NOFOLLOW. A path that fails any of this is refused with ArtifactError and
nothing is written. The list of finished uploads is kept in the store's
``artifacts`` table; a file being written is not listed until its last chunk.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from . import patterns
from .store import Store

_BAD = re.compile(r"[\x00-\x1f\x7f\\]")
MAX_PATH = 1024


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


class Artifacts:
    def __init__(self, store: Store):
        self.store = store
        self.root = store.dir / "artifacts"

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
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise ArtifactError("bad_path", f"artifact path leads through {part!r}, which is not a "
                                                f"directory")
        return here

    def clear(self, build_id: int, sha: str) -> None:
        """Forget what an earlier attempt uploaded (a new attempt starts)."""
        with self.store.transaction():
            self.store.db.execute("DELETE FROM artifacts WHERE build = ?", (build_id,))
        shutil.rmtree(self.directory(build_id, sha), ignore_errors=True)

    def write(self, build_id: int, sha: str, path: str, offset: int, data: bytes, eof: bool,
              limit: int) -> int:
        """Write one chunk at ``offset`` (0 starts the file afresh); returns the file's size."""
        parts = check_path(path)
        used = self.store.db.execute("SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE build = ? "
                                     "AND path != ?", (build_id, path)).fetchone()[0]
        if used + offset + len(data) > limit:
            raise ArtifactError("too_large", f"artifacts of build {build_id} would exceed "
                                             f"{limit} bytes (dispatcher.max_artifact_bytes)")
        folder = self._dirs(self.directory(build_id, sha), parts, create=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
        try:
            fd = os.open(folder / parts[-1], flags, 0o644)
        except OSError as exc:
            raise ArtifactError("bad_path", f"cannot write artifact {path!r}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ArtifactError("bad_path", f"artifact {path!r} is not a regular file")
            size = os.fstat(fd).st_size
            if offset != size:
                raise ArtifactError("offset", f"artifact {path!r} has {size} bytes, not {offset}")
            os.lseek(fd, offset, os.SEEK_SET)
            os.write(fd, data)
            size = offset + len(data)
        finally:
            os.close(fd)
        if eof:
            with self.store.transaction():
                self.store.db.execute("INSERT OR REPLACE INTO artifacts (build, path, size) VALUES (?, ?, ?)",
                                      (build_id, path, size))
        return size

    def list(self, build_id: int) -> list[dict]:
        rows = self.store.db.execute("SELECT path, size FROM artifacts WHERE build = ? ORDER BY path",
                                     (build_id,))
        return [{"path": path, "size": size} for path, size in rows]

    def read(self, build_id: int, sha: str, path: str, offset: int, limit: int) -> tuple[bytes, int]:
        """(up to ``limit`` bytes from ``offset``, the file's size) of a listed artifact."""
        parts = check_path(path)
        if not self.store.db.execute("SELECT 1 FROM artifacts WHERE build = ? AND path = ?",
                                     (build_id, path)).fetchone():
            raise ArtifactError("not_found", f"build {build_id} has no artifact {path!r}")
        folder = self._dirs(self.directory(build_id, sha), parts, create=False)
        try:
            fd = os.open(folder / parts[-1], os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ArtifactError("not_found", f"artifact {path!r} of build {build_id}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, limit), size
        finally:
            os.close(fd)
