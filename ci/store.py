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
from typing import Iterable, Iterator, Mapping

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
-- when each schedule entry (ci/schedule.py, by its key) last fired
CREATE TABLE IF NOT EXISTS schedules (key TEXT PRIMARY KEY, fired_at REAL NOT NULL);
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
    # the history's filters, each walked newest first (keyset paging by id), and the last hour's counts
    (None, "CREATE INDEX IF NOT EXISTS builds_branch ON builds(branch, id)"),
    (None, "CREATE INDEX IF NOT EXISTS builds_status ON builds(status, id)"),
    (None, "CREATE INDEX IF NOT EXISTS builds_job ON builds(job, id)"),
    (None, "CREATE INDEX IF NOT EXISTS builds_sha ON builds(sha)"),
    (None, "CREATE INDEX IF NOT EXISTS builds_finished ON builds(finished_at)"),
    # each step of the last attempt as the runner reported it (JSON), for the web page; NULL: not reported
    ("step_results", "ALTER TABLE builds ADD COLUMN step_results TEXT"),
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

    def history(self, filters: Mapping[str, str], before: int | None = None, after: int | None = None,
                limit: int = 50) -> tuple[list[Build], bool, bool]:
        """One page of builds matching ``filters`` (HISTORY_FILTERS), newest
        first: those below ``before``, else those just above ``after``, else
        the newest. Returns (builds, older ones exist, newer ones exist).

        Keyset paging: a page costs the same at build 100 as at build 100,000,
        and a build that arrives meanwhile does not shift the pages."""
        where, args = _filter(filters)
        # a sha prefix matches a handful of builds: walk its index, never the ids (``+id`` keeps
        # SQLite from taking "id > X" for the cheaper path, which is a scan of every newer build)
        key = "+id" if "sha" in filters else "id"
        if after is not None:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE {where} AND {key} > ? "
                                   f"ORDER BY id ASC LIMIT ?", (*args, after, limit + 1)).fetchall()
            newer = len(rows) > limit
            builds = [_build(r) for r in rows[:limit][::-1]]
            older = self._exists(f"{where} AND {key} < ?", (*args, builds[-1].id if builds else after + 1))
        else:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE {where} AND {key} < ? "
                                   f"ORDER BY id DESC LIMIT ?", (*args, before or 2**62, limit + 1)).fetchall()
            older = len(rows) > limit
            builds = [_build(r) for r in rows[:limit]]
            edge = builds[0].id if builds else before
            newer = edge is not None and self._exists(f"{where} AND {key} > ?", (*args, edge))
        return builds, older, newer

    def _exists(self, where: str, args: tuple) -> bool:
        return self.db.execute(f"SELECT EXISTS (SELECT 1 FROM builds WHERE {where})", args).fetchone()[0] == 1

    def branch_builds(self, branch: str, repo: str | None = None, before: int | None = None,
                      limit: int = 200) -> list[Build]:
        """A branch's builds below ``before``, newest first."""
        where, args = _filter({"branch": branch, **({"repo": repo} if repo else {})})
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE {where} AND id < ? ORDER BY id DESC LIMIT ?",
                               (*args, before or 2**62, limit))
        return [_build(r) for r in rows]

    def counts(self, since: float) -> dict[str, int]:
        """Builds that finished at ``since`` or later, by status."""
        # INDEXED BY: left to itself, SQLite walks the status index through the whole history
        rows = self.db.execute("SELECT status, count(*) FROM builds INDEXED BY builds_finished "
                               "WHERE finished_at >= ? GROUP BY status",
                               (since,))
        return {status: n for status, n in rows}

    def save_steps(self, build_id: int, steps: list[dict] | None) -> None:
        self.db.execute("UPDATE builds SET step_results = ? WHERE id = ?",
                        (json.dumps(steps) if steps is not None else None, build_id))

    def steps(self, build_id: int) -> list[dict] | None:
        row = self.db.execute("SELECT step_results FROM builds WHERE id = ?", (build_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def repos(self) -> list[str]:
        """Every repository a build was ever recorded for."""
        return [row[0] for row in self.db.execute("SELECT DISTINCT repo FROM builds ORDER BY repo")]

    # ------------------------------------------------------------ schedules

    def schedule_times(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT key, fired_at FROM schedules"))

    def save_schedule_time(self, key: str, when: float) -> None:
        self.db.execute("INSERT INTO schedules (key, fired_at) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET fired_at = excluded.fired_at", (key, when))

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


# what the history may be filtered by: the value's test in SQL (sha is a prefix)
HISTORY_FILTERS = ("repo", "branch", "status", "author", "job", "sha")


def _filter(filters: Mapping[str, str]) -> tuple[str, tuple]:
    """A WHERE clause (never empty) and its arguments for the history's filters."""
    where, args = ["1"], []
    for name in HISTORY_FILTERS:
        value = filters.get(name)
        if value is None:
            continue
        if name == "sha":
            # a prefix as a range the index can walk: hex digits sort below 'g'
            where.append("sha >= ? AND sha < ?")
            args += [value, value + "g"]
        elif name == "author":
            # part of the name or e-mail, any case (LIKE is case-insensitive for ASCII)
            where.append("author LIKE ? ESCAPE '\\'")
            args.append("%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        else:
            where.append(f"{name} = ?")
            args.append(value)
    return " AND ".join(where), tuple(args)


def _build(row: tuple) -> Build:
    (id_, repo, branch, sha, subject, author, commit_time, reason, status, attempt, runner, labels,
     created_at, started_at, finished_at, exit_code, log_base, job) = row
    return Build(id_, repo, branch, sha, subject, author, commit_time, reason, Status(status), attempt,
                 runner, tuple(json.loads(labels)), created_at, started_at, finished_at, exit_code, log_base,
                 job)
