"""Retention: which finished builds the dispatcher deletes, and the sweep that
deletes them in the background (the ``retention`` section; ``gc`` runs one now).

The rule (``choose``): a finished build goes when it finished more than
``days`` ago, or when it is beyond the newest ``per_branch`` finished builds
of its repository, branch and job. Never a queued or running build, nor one
the scheduler still holds (a cancelled build whose runner has not stopped),
and never the newest finished build of its repository, branch and job: a
branch always shows its last result. Build numbers are never reused
(AUTOINCREMENT), so a deleted build's number stays unused.

Deleting a build deletes its row, its artifacts' rows, its log (with the cap's
``.tail``/``.cut`` files, and an older data dir's ``.times``) and its
artifacts' directory. No pause a runner or a tool notices: the choice is one query on a connection of its own in a thread
(WAL: it blocks no writer, and a window over 100,000 builds takes a moment the
event loop must not wait), the rows go in transactions of ``BATCH`` builds on
the dispatcher's connection with the loop free between them, the files go in a
thread, and the database gives its freed pages back to the disk
``VACUUM_PAGES`` at a time (incremental vacuum).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import files, patterns
from .config import RetentionConfig
from .store import Store

log = logging.getLogger(__name__)

BATCH = 100             # builds deleted per transaction
VACUUM_PAGES = 256      # pages given back per step (1 MiB at SQLite's default page size)
DAY = 86400.0

FINAL = ("passed", "failed", "error", "cancelled", "skipped")


@dataclass
class Swept:
    """What a sweep deleted (or, dry, would delete)."""

    builds: int = 0
    log_bytes: int = 0
    artifact_bytes: int = 0
    db_bytes: int = 0           # what the database gave back to the disk

    def __str__(self) -> str:
        return (f"{self.builds} build(s), {_size(self.log_bytes)} of logs, "
                f"{_size(self.artifact_bytes)} of artifacts")


def choose(db_path: Path, policy: RetentionConfig, now: float, keep: Iterable[int] = ()) -> list[tuple[int, str]]:
    """(id, sha) of the builds the policy deletes at ``now`` (wall clock),
    oldest first; ``keep``: ids never to delete (the scheduler's). Blocking:
    call it in a thread. Its own read-only connection: nothing it does waits
    for the dispatcher's, nor holds it up."""
    if policy.days <= 0 and policy.per_branch <= 0:
        return []
    cutoff = now - policy.days * DAY if policy.days > 0 else None
    db = sqlite3.connect(f"{Path(db_path).absolute().as_uri()}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        rows = db.execute(
            f"SELECT id, sha FROM (SELECT id, sha, finished_at, ROW_NUMBER() OVER "
            f"(PARTITION BY repo, branch, job ORDER BY id DESC) AS newest FROM builds "
            f"WHERE status IN ({', '.join('?' * len(FINAL))})) "
            f"WHERE newest > 1 AND ((? IS NOT NULL AND finished_at < ?) OR (? > 0 AND newest > ?)) ORDER BY id",
            (*FINAL, cutoff, cutoff, policy.per_branch, policy.per_branch)).fetchall()
    finally:
        db.close()
    held = set(keep)
    return [(build_id, sha) for build_id, sha in rows if build_id not in held]


class Retention:
    def __init__(self, store: Store, policy: RetentionConfig, *, clock: Callable[[], float] = time.time,
                 active: Callable[[], Iterable[int]] = tuple):
        """``active``: the ids the scheduler holds right now (never deleted)."""
        self.store = store
        self.policy = policy
        self.clock = clock
        self.active = active
        self.logs = store.dir / "logs"
        self.artifacts = store.dir / "artifacts"
        self.lock = asyncio.Lock()          # one sweep at a time: the background one or a `gc`

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval`` seconds until ``stop``; a failed sweep is one
        line, and the next one tries again."""
        if self.policy.days <= 0 and self.policy.per_branch <= 0:
            return
        while not stop.is_set():
            try:
                swept = await self.sweep()
                if swept.builds:
                    log.info("retention deleted %s; the database gave back %s", swept, _size(swept.db_bytes))
            except (OSError, sqlite3.Error) as exc:
                log.warning("retention sweep failed (%s); the next one, in %gs, tries again", exc,
                            self.policy.interval)
            try:
                await asyncio.wait_for(stop.wait(), self.policy.interval)
            except asyncio.TimeoutError:
                pass

    async def sweep(self, dry_run: bool = False) -> Swept:
        """One sweep: delete what the policy says (``dry_run``: only measure it)."""
        async with self.lock:
            chosen = await asyncio.to_thread(choose, self.store.path, self.policy, self.clock(), self.active())
            if dry_run:
                swept = Swept(len(chosen))
                swept.log_bytes, swept.artifact_bytes = await asyncio.to_thread(self._measure, chosen)
                return swept
            swept = Swept()
            for start in range(0, len(chosen), BATCH):
                batch = self._drop_rows(chosen[start:start + BATCH])
                logs, artifacts = await asyncio.to_thread(self._remove_files, batch)
                swept.builds += len(batch)
                swept.log_bytes += logs
                swept.artifact_bytes += artifacts
                await asyncio.sleep(0)          # whatever else waits runs between batches
            if swept.builds:
                swept.db_bytes = await self._give_back()
            return swept

    def _drop_rows(self, batch: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Delete the rows of those in ``batch`` that are still finished and not
        held by the scheduler (one transaction); returns those deleted."""
        held = set(self.active())
        batch = [(build_id, sha) for build_id, sha in batch if build_id not in held]
        if not batch:
            return []
        ids = [build_id for build_id, _ in batch]
        marks = ", ".join("?" * len(ids))
        db = self.store.db
        final = ", ".join("?" * len(FINAL))
        with self.store.transaction():
            gone = {row[0] for row in db.execute(
                f"SELECT id FROM builds WHERE id IN ({marks}) AND status IN ({final})", (*ids, *FINAL))}
            marks = ", ".join("?" * len(gone))
            db.execute(f"DELETE FROM builds WHERE id IN ({marks})", tuple(gone))
            db.execute(f"DELETE FROM artifacts WHERE build IN ({marks})", tuple(gone))
            db.execute(f"DELETE FROM log_times WHERE build IN ({marks})", tuple(gone))
        return [(build_id, sha) for build_id, sha in batch if build_id in gone]

    def _files(self, build_id: int, sha: str) -> tuple[list[Path], Path | None]:
        logs = [self.logs / f"{int(build_id)}{suffix}" for suffix in (".log", ".tail", ".cut", ".tail-new", ".times")]
        folder = self.artifacts / sha / str(int(build_id)) if patterns.is_sha(sha) else None
        return logs, folder

    def _measure(self, chosen: list[tuple[int, str]]) -> tuple[int, int]:
        logs = artifacts = 0
        for build_id, sha in chosen:
            paths, folder = self._files(build_id, sha)
            logs += sum(_file_size(p) for p in paths)
            artifacts += files.tree_bytes(folder) if folder is not None else 0
        return logs, artifacts

    def _remove_files(self, batch: list[tuple[int, str]]) -> tuple[int, int]:
        logs = artifacts = 0
        for build_id, sha in batch:
            paths, folder = self._files(build_id, sha)
            for path in paths:
                logs += _file_size(path)
                path.unlink(missing_ok=True)
            if folder is not None and folder.exists():
                artifacts += files.tree_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                try:
                    folder.parent.rmdir()           # the commit's directory, once its last build is gone
                except OSError:
                    pass
        return logs, artifacts

    async def _give_back(self) -> int:
        """Incremental vacuum, a few pages at a time; returns the bytes given back."""
        page = self.store.db.execute("PRAGMA page_size").fetchone()[0]
        before = self.store.db.execute("PRAGMA freelist_count").fetchone()[0]
        left = before
        while left:
            now_left = self.store.reclaim(VACUUM_PAGES)
            if now_left >= left:        # not in incremental mode (an old file without room to convert it)
                break
            left = now_left
            await asyncio.sleep(0)
        return (before - left) * page


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
