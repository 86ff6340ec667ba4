"""The dispatcher's durable state: builds, runners and finished artifact
uploads in SQLite (WAL), ``<data_dir>/ci.db``. The build logs beside it are
``buildlogs``'s.

Build numbers are SQLite AUTOINCREMENT keys: unique, increasing, never reused,
even across restarts and deletions.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .models import Build, RunnerRecord, Status

SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL, branch TEXT NOT NULL, sha TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '', author TEXT NOT NULL DEFAULT '',
    commit_time REAL NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT 'commit',
    status TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, runner TEXT,
    labels TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    exit_code INTEGER, log_base INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS builds_active ON builds(status) WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS runners (
    name TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '[]', slots INTEGER NOT NULL DEFAULT 1,
    alive INTEGER NOT NULL DEFAULT 1, last_seen REAL NOT NULL DEFAULT 0,
    registered_at REAL NOT NULL DEFAULT 0
);
-- finished artifact uploads; the files are <data_dir>/artifacts/<sha>/<build>/<path>
CREATE TABLE IF NOT EXISTS artifacts (
    build INTEGER NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (build, path)
);
"""

# Run after SCHEMA on every start, each step safe to repeat: (column it adds, or None; SQL).
MIGRATIONS = (
    # a commit becomes one build per .ci.yaml job
    ("job", "ALTER TABLE builds ADD COLUMN job TEXT NOT NULL DEFAULT ''"),
    (None, "DROP INDEX IF EXISTS builds_commit"),
    # one build per commit and job; manual triggers and rebuilds may repeat a sha
    (None, "CREATE UNIQUE INDEX IF NOT EXISTS builds_commit_job ON builds(repo, sha, job) "
           "WHERE reason = 'commit'"),
    # `tinyci drain`: a runner taking no new builds (a runners column; no builds column has its name)
    ("draining", "ALTER TABLE runners ADD COLUMN draining INTEGER NOT NULL DEFAULT 0"),
)

_COLUMNS = ("id, repo, branch, sha, subject, author, commit_time, reason, status, attempt, runner, "
            "labels, created_at, started_at, finished_at, exit_code, log_base, job")


class StoreError(Exception):
    """The data dir or database cannot be used; the message names the path."""


class Store:
    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.dir / "ci.db", isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (SIGKILL); only a
            # power loss can take the last transactions
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            columns = {row[1] for table in ("builds", "runners")
                       for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column, step in MIGRATIONS:
                if column is None or column not in columns:
                    self.db.execute(step)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot use data dir {self.dir}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ builds

    def add_build(self, *, repo: str, branch: str, sha: str, subject: str = "", author: str = "",
                  commit_time: float = 0.0, reason: str = "commit", labels: tuple = (),
                  now: float, job: str = "", status: Status = Status.QUEUED) -> tuple[Build, bool]:
        """Store a queued build (or one already final: skipped, error); for a
        commit's job already built, return that build and True (duplicate) instead."""
        finished = None if status in (Status.QUEUED, Status.RUNNING) else now
        cur = self.db.execute(
            "INSERT OR IGNORE INTO builds (repo, branch, sha, subject, author, commit_time, reason, "
            "status, labels, created_at, job, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (repo, branch, sha, subject, author, commit_time, reason, status.value, json.dumps(list(labels)),
             now, job, finished))
        if cur.rowcount == 1:
            return self.get(cur.lastrowid), False
        row = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE repo = ? AND sha = ? AND job = ? "
                              f"AND reason = 'commit'", (repo, sha, job)).fetchone()
        return _build(row), True

    def save(self, builds: Iterable[Build]) -> None:
        self.db.executemany(
            "UPDATE builds SET status = ?, attempt = ?, runner = ?, started_at = ?, finished_at = ?, "
            "exit_code = ?, log_base = ? WHERE id = ?",
            [(b.status.value, b.attempt, b.runner, b.started_at, b.finished_at, b.exit_code,
              b.log_base, b.id) for b in builds])

    def get(self, build_id: int) -> Build | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE id = ?", (build_id,)).fetchone()
        return _build(row) if row else None

    def active(self) -> list[Build]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM builds WHERE status IN ('queued', 'running') ORDER BY id")
        return [_build(r) for r in rows]

    def recent(self, limit: int) -> list[Build]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM builds ORDER BY id DESC LIMIT ?", (limit,))
        return [_build(r) for r in rows]

    def repos(self) -> list[str]:
        """Every repository a build was ever recorded for."""
        return [row[0] for row in self.db.execute("SELECT DISTINCT repo FROM builds ORDER BY repo")]

    # ------------------------------------------------------------ runners

    def save_runners(self, runners: Iterable[RunnerRecord]) -> None:
        self.db.executemany(
            "INSERT INTO runners (name, host, port, labels, slots, alive, last_seen, registered_at, draining) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET host = excluded.host, "
            "port = excluded.port, labels = excluded.labels, slots = excluded.slots, "
            "alive = excluded.alive, last_seen = excluded.last_seen, registered_at = excluded.registered_at, "
            "draining = excluded.draining",
            [(r.name, r.host, r.port, json.dumps(list(r.labels)), r.slots, int(r.alive), r.last_seen,
              r.registered_at, int(r.draining)) for r in runners])

    def runners(self) -> list[RunnerRecord]:
        rows = self.db.execute("SELECT name, host, port, labels, slots, alive, last_seen, registered_at, draining "
                               "FROM runners ORDER BY name")
        return [RunnerRecord(name, host, port, tuple(json.loads(labels)), slots, bool(alive), last_seen, registered,
                             draining=bool(draining))
                for name, host, port, labels, slots, alive, last_seen, registered, draining in rows]

    def forget_runners(self, names: Iterable[str]) -> None:
        """Delete these runners' rows (dead runners an operator or forget_dead_after removed)."""
        self.db.executemany("DELETE FROM runners WHERE name = ?", [(name,) for name in names])


def _build(row: tuple) -> Build:
    (id_, repo, branch, sha, subject, author, commit_time, reason, status, attempt, runner, labels,
     created_at, started_at, finished_at, exit_code, log_base, job) = row
    return Build(id_, repo, branch, sha, subject, author, commit_time, reason, Status(status), attempt,
                 runner, tuple(json.loads(labels)), created_at, started_at, finished_at, exit_code, log_base,
                 job)
