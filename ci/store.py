"""The dispatcher's durable state: builds, runners, finished artifact
uploads and the logs' arrival times in SQLite (WAL), ``<data_dir>/ci.db``.
The build logs beside it are ``buildlogs``'s.

Build numbers are SQLite AUTOINCREMENT keys: unique, increasing, never reused,
even across restarts and deletions.

Opening the data dir (``Store``), in this order, so that nothing is ever
written into a database that should not be:

- the dir is locked (``<data_dir>/.lock``, ``files.DirLock``): a second
  dispatcher on the same dir is refused, naming the first one's pid;
- an existing ``ci.db`` passes ``PRAGMA quick_check``, or is refused, never
  opened half-broken, with a message naming it and the last good copy;
- its schema version (``PRAGMA user_version``; 0: a database from before
  versions were kept) is this release's, or older: then a copy is saved
  beside it (``ci.db.v<old>.bak``, SQLite's backup API) before MIGRATIONS
  bring it up to date; a newer one is refused, saying so.

``reclaim`` gives the space of deleted builds back to the disk (the
database is in incremental auto-vacuum mode, set when it is made or
upgraded).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from . import files
from .models import Build, RunnerRecord, Status

log = logging.getLogger(__name__)

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

# Run after SCHEMA when the database's version is older than SCHEMA_VERSION, each step safe
# to repeat: (column it adds, or None; SQL). Append only: the version is their number.
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
    # .ci.yaml `needs`: the jobs of the same commit a build waits for (JSON list; ci/needs.py)
    ("needs", "ALTER TABLE builds ADD COLUMN needs TEXT NOT NULL DEFAULT '[]'"),
    # the names (never the values) of the build secrets a build's job asked for (JSON list)
    ("secrets", "ALTER TABLE builds ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]'"),
    # the last attempt's JUnit reports (JSON {passed, failed, errors, skipped, failures}); NULL: none read
    ("tests", "ALTER TABLE builds ADD COLUMN tests TEXT"),
    # when each append reached a build's log ("offset time" lines; ci/buildlogs.py, arrival times):
    # a row per build per save, appended, never a value rewritten as it grows
    (None, "CREATE TABLE IF NOT EXISTS log_times (build INTEGER NOT NULL, times TEXT NOT NULL)"),
    (None, "CREATE INDEX IF NOT EXISTS log_times_build ON log_times(build)"),
)

# The schema this release writes, kept in the database as PRAGMA user_version.
SCHEMA_VERSION = len(MIGRATIONS)
AUTO_VACUUM_INCREMENTAL = 2

_COLUMNS = ("id, repo, branch, sha, subject, author, commit_time, reason, status, attempt, runner, "
            "labels, created_at, started_at, finished_at, exit_code, log_base, job, needs, secrets")


class StoreError(Exception):
    """The data dir or database cannot be used; the message names the path."""


class Store:
    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        self.path = self.dir / "ci.db"
        self._lock = files.DirLock(self.dir / ".lock")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except files.LockedError as exc:
            holder = f" (pid {exc.pid})" if exc.pid else ""
            raise StoreError(f"another dispatcher{holder} uses {self.dir} (it holds {self._lock.path}); "
                             f"stop it, or give this one a data dir of its own (--data)") from None
        except OSError as exc:
            raise StoreError(f"cannot use data dir {self.dir}: {exc.strerror or exc}") from None
        try:
            self.db = self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> sqlite3.Connection:
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA busy_timeout=5000")
            if existed:
                self._check(db)
            else:
                # before anything writes the file's first page; otherwise it takes a VACUUM
                db.execute(f"PRAGMA auto_vacuum={AUTO_VACUUM_INCREMENTAL}")
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (SIGKILL); only a
            # power loss can take the last transactions
            db.execute("PRAGMA synchronous=NORMAL")
            self._upgrade(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            if is_locked(exc):
                raise StoreError(f"{self.path} is locked by another process ({exc}); stop whatever holds it "
                                 f"(a sqlite3 shell, a backup tool) and start again") from None
            if is_disk_full(exc):
                raise StoreError(f"cannot use {self.path}: the disk is full ({exc}); free some space "
                                 f"and start again") from None
            raise StoreError(self._damaged(str(exc))) from None
        except BaseException:
            db.close()
            raise
        return db

    def _check(self, db: sqlite3.Connection) -> None:
        """Refuse a damaged database or one from a newer tinyci, before anything writes to it."""
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreError(self._damaged(f"PRAGMA quick_check: {'; '.join(problems)}"))
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            ours = self.path.with_name(f"{self.path.name}.v{SCHEMA_VERSION}.bak")
            back = (f"; to go back to this release, restore {ours}, the copy saved before the upgrade "
                    f"(losing what happened since)" if ours.exists() else "")
            raise StoreError(f"{self.path} was written by a newer tinyci (schema version {version}; this "
                             f"one knows versions up to {SCHEMA_VERSION}): run that release or a later "
                             f"one{back}")

    def _damaged(self, why: str) -> str:
        backup = self.last_backup()
        if backup is None:
            restore = (f"no copy of it was saved here; move it aside to start with an empty history, or "
                       f"try `sqlite3 {self.path} .recover | sqlite3 recovered.db` for what can be read")
        else:
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
            restore = (f"restore the last good copy, {backup} (saved {made}): stop the dispatcher, move "
                       f"{self.path.name} and any {self.path.name}-wal/-shm aside, and copy it to {self.path}")
        return f"{self.path} is damaged and was not opened ({why}); {restore}"

    def last_backup(self) -> Path | None:
        """The newest copy an upgrade saved beside the database, if any."""
        copies = [p for p in self.dir.glob(f"{self.path.name}.v*.bak") if p.is_file()]
        return max(copies, key=lambda p: p.stat().st_mtime) if copies else None

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION: a new database is made at once; an
        older one is copied beside itself first, then migrated in place."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if not fresh:
            backup = self.path.with_name(f"{self.path.name}.v{version}.bak")
            log.info("upgrading %s from schema version %d to %d; saving a copy as %s first",
                     self.path, version, SCHEMA_VERSION, backup.name)
            self._backup(db, backup)
        # all or nothing: a crash half way leaves the old version, migrated again at the next start
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(SCHEMA):
                db.execute(statement)
            columns = {row[1] for table in ("builds", "runners")
                       for row in db.execute(f"PRAGMA table_info({table})")}
            for column, step in MIGRATIONS:
                if column is None or column not in columns:
                    db.execute(step)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
            self._make_reclaimable(db)
        if not fresh:
            log.info("%s is at schema version %d; the copy of version %d is %s", self.path.name,
                     SCHEMA_VERSION, version, backup)

    def _backup(self, db: sqlite3.Connection, target: Path) -> None:
        """A consistent copy of the database in one file, written aside and renamed into place."""
        tmp = target.with_name(target.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            copy = sqlite3.connect(tmp)
            try:
                db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")     # one self-contained file
            finally:
                copy.close()
            os.replace(tmp, target)
            files.sync_dir(target.parent)
        except (OSError, sqlite3.Error) as exc:
            if tmp.is_file():
                tmp.unlink()
            raise StoreError(f"cannot upgrade {self.path}: saving a copy of it as {target} failed ({exc}); "
                             f"nothing was changed. Free some space (the copy needs "
                             f"{self.path.stat().st_size // 1024} KiB) and start again") from None

    def _make_reclaimable(self, db: sqlite3.Connection) -> None:
        """Switch a database made before incremental vacuum to it (a VACUUM: it
        rewrites the file). Without room for that, it stays as it is: the space
        of deleted builds is then reused, just not given back to the disk."""
        try:
            db.execute(f"PRAGMA auto_vacuum={AUTO_VACUUM_INCREMENTAL}")
            db.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            log.warning("%s stays without incremental vacuum (%s): space freed by retention is reused, "
                        "not returned to the disk", self.path, exc)

    def close(self) -> None:
        self.db.close()
        self._lock.release()

    def reclaim(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the disk (incremental vacuum);
        returns how many free pages are left."""
        self.db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
        return self.db.execute("PRAGMA freelist_count").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            # WAL: the pages reach the disk here, so a full disk fails here: the
            # transaction must not stay open (every later BEGIN would fail)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass        # the error that brought us here is the one to report
            raise

    # ------------------------------------------------------------ builds

    def add_build(self, *, repo: str, branch: str, sha: str, subject: str = "", author: str = "",
                  commit_time: float = 0.0, reason: str = "commit", labels: tuple = (),
                  now: float, job: str = "", status: Status = Status.QUEUED,
                  needs: tuple = (), secrets: tuple = ()) -> tuple[Build, bool]:
        """Store a queued build (or one already final: skipped, error); for a
        commit's job already built, return that build and True (duplicate) instead."""
        finished = None if status in (Status.QUEUED, Status.RUNNING) else now
        cur = self.db.execute(
            "INSERT OR IGNORE INTO builds (repo, branch, sha, subject, author, commit_time, reason, "
            "status, labels, created_at, job, finished_at, needs, secrets) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (repo, branch, sha, subject, author, commit_time, reason, status.value, json.dumps(list(labels)),
             now, job, finished, json.dumps(list(needs)), json.dumps(list(secrets))))
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

    def commit_builds(self, repo: str, sha: str) -> list[Build]:
        """Every build of one commit, oldest first (what ``needs`` are judged against)."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM builds WHERE sha = ? AND repo = ? ORDER BY id", (sha, repo))
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

    def save_report(self, build_id: int, steps: list[dict] | None, tests: dict | None) -> None:
        """What a result reports besides its status: each step, and the JUnit counts (one statement)."""
        self.db.execute("UPDATE builds SET step_results = ?, tests = ? WHERE id = ?",
                        (json.dumps(steps) if steps is not None else None,
                         json.dumps(tests) if tests is not None else None, build_id))

    def add_log_times(self, times: Mapping[int, str]) -> None:
        """Append arrival times ("offset time" lines) to each build's, in one transaction
        (a row each); a build deleted meanwhile is skipped."""
        with self.transaction():
            self.db.executemany("INSERT INTO log_times (build, times) SELECT id, ? FROM builds WHERE id = ?",
                                [(text, build_id) for build_id, text in times.items()])

    def log_times(self, build_id: int) -> str:
        return "".join(row[0] for row in self.db.execute(
            "SELECT times FROM log_times WHERE build = ? ORDER BY rowid", (build_id,)))

    def steps(self, build_id: int) -> list[dict] | None:
        row = self.db.execute("SELECT step_results FROM builds WHERE id = ?", (build_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def tests(self, build_id: int) -> dict | None:
        """The build's test report, with the failed tests' names."""
        row = self.db.execute("SELECT tests FROM builds WHERE id = ?", (build_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def test_counts(self, build_ids: list[int]) -> dict[int, dict]:
        """The counts of those builds that have a report (no names: lists stay small)."""
        out: dict[int, dict] = {}
        for start in range(0, len(build_ids), 500):     # SQLite's limit on bound parameters
            chunk = build_ids[start:start + 500]
            rows = self.db.execute(f"SELECT id, tests FROM builds WHERE id IN ({','.join('?' * len(chunk))}) "
                                   f"AND tests IS NOT NULL", chunk)
            for build_id, text in rows:
                counts = json.loads(text)
                counts.pop("failures", None)
                out[build_id] = counts
        return out

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
     created_at, started_at, finished_at, exit_code, log_base, job, needs, secrets) = row
    return Build(id_, repo, branch, sha, subject, author, commit_time, reason, Status(status), attempt,
                 runner, tuple(json.loads(labels)), created_at, started_at, finished_at, exit_code, log_base,
                 job, tuple(json.loads(needs)), secrets=tuple(json.loads(secrets)))


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (executescript would commit first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def is_disk_full(exc: sqlite3.Error) -> bool:
    """SQLite's "database or disk is full" (SQLITE_FULL)."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def is_locked(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
        or "database is locked" in str(exc)
