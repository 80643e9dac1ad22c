"""The watch ledger: every release seen and every variant built, in one SQLite file.

``releases`` has one row per (repo, upstream sha): its status (building; published; partial, i.e.
published without the variants its architecture cannot be built as; up-to-date; failed; skipped;
unsupported; superseded), why, and how many attempts it took. ``variants`` has one row per (repo,
sha, variant): the target repo, the validation result and agreement, and the commit that published
it — or ``dropped`` and why. A watcher *claims* a release inside ``BEGIN IMMEDIATE`` (SQLite's write
lock), so two watchers sharing the file never build the same release; the Hub manifest
(``hubbot.json`` key) is the second guard for watchers that do not share it.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .paths import cache_root

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    repo        TEXT NOT NULL,
    sha         TEXT NOT NULL,
    family      TEXT NOT NULL,
    recipe      TEXT,
    created_at  TEXT,             -- upstream repo creation time
    first_seen  TEXT NOT NULL,
    updated     TEXT NOT NULL,
    status      TEXT NOT NULL,    -- building | published | partial | up-to-date | failed | skipped
                                  -- | unsupported | superseded
    reason      TEXT NOT NULL DEFAULT '',
    attempts    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT,             -- the watcher holding a 'building' claim
    claimed_at  REAL,
    collection  TEXT,             -- slug of the Hub collection holding the release's variant repos
    PRIMARY KEY (repo, sha)
);
CREATE TABLE IF NOT EXISTS variants (
    repo        TEXT NOT NULL,
    sha         TEXT NOT NULL,
    variant     TEXT NOT NULL,
    target_repo TEXT NOT NULL,
    status      TEXT NOT NULL,    -- the target repo's outcome: published | up-to-date | unchanged | failed,
                                  -- or dropped (see reason)
    passed      INTEGER,
    agreement   REAL,
    threshold   REAL,
    commit_sha  TEXT,
    built_at    TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (repo, sha, variant)
);
"""
# columns added after a ledger file may already exist: (table, column, declaration)
ADDED_COLUMNS = [("variants", "reason", "TEXT NOT NULL DEFAULT ''")]

DONE = ("published", "partial", "up-to-date", "superseded", "unsupported")  # never tried again
DEFAULT_CLAIM_TIMEOUT = 6 * 3600.0  # a 'building' claim older than this belongs to a dead watcher


def default_path() -> Path:
    return Path(os.environ.get("HUBBOT_LEDGER") or cache_root() / "ledger.sqlite")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LedgerEntry:
    repo: str
    sha: str
    family: str
    recipe: str | None
    created_at: str | None
    first_seen: str
    updated: str
    status: str
    reason: str
    attempts: int
    owner: str | None = None
    claimed_at: float | None = None
    collection: str | None = None


@dataclass
class VariantRow:
    repo: str
    sha: str
    variant: str
    target_repo: str
    status: str
    passed: bool | None
    agreement: float | None
    threshold: float | None
    commit_sha: str | None
    built_at: str
    reason: str = ""


class Ledger:
    def __init__(self, path: Path | str | None = None, *, owner: str | None = None,
                 claim_timeout: float = DEFAULT_CLAIM_TIMEOUT):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.claim_timeout = claim_timeout
        # autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 60000")
        for statement in SCHEMA.split(";"):  # CREATE … IF NOT EXISTS: safe for watchers starting together
            if statement.strip():
                self.db.execute(statement)
        for table, column, declaration in ADDED_COLUMNS:
            have = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                try:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                except sqlite3.OperationalError:  # another watcher added it a moment ago
                    pass

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's RESERVED lock from the start."""
        for attempt in range(50):
            try:
                self.db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:  # "database is locked" past the busy timeout
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.1)
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- releases
    def get(self, repo: str, sha: str) -> LedgerEntry | None:
        row = self.db.execute("SELECT * FROM releases WHERE repo=? AND sha=?", (repo, sha)).fetchone()
        return LedgerEntry(**dict(row)) if row else None

    def releases(self) -> list[LedgerEntry]:
        rows = self.db.execute("SELECT * FROM releases ORDER BY first_seen, repo, updated").fetchall()
        return [LedgerEntry(**dict(r)) for r in rows]

    def should_try(self, release: LedgerEntry | None, max_attempts: int) -> bool:
        if release is None:
            return True
        if release.status in DONE:
            return False
        if release.status == "building":
            return time.time() - (release.claimed_at or 0) > self.claim_timeout
        if release.status == "failed":
            return not max_attempts or release.attempts < max_attempts
        return True  # skipped: look again (access may have been granted since)

    def claim(self, repo: str, sha: str, family: str, recipe: str | None, created_at: str | None,
              max_attempts: int = 0) -> bool:
        """Atomically mark (repo, sha) as being built by this watcher; False if it is not ours to build."""
        with self._write() as db:
            release = self.get(repo, sha)
            if not self.should_try(release, max_attempts):
                return False
            now = _now()
            if release is None:
                db.execute("INSERT INTO releases (repo, sha, family, recipe, created_at, first_seen, updated, status,"
                           " reason, attempts, owner, claimed_at) VALUES (?,?,?,?,?,?,?,'building','',1,?,?)",
                           (repo, sha, family, recipe, created_at, now, now, self.owner, time.time()))
            else:
                db.execute("UPDATE releases SET status='building', reason='', attempts=attempts+1, owner=?,"
                           " claimed_at=?, updated=?, recipe=? WHERE repo=? AND sha=?",
                           (self.owner, time.time(), now, recipe, repo, sha))
            return True

    def finish(self, repo: str, sha: str, status: str, reason: str = "", collection: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE releases SET status=?, reason=?, owner=NULL, claimed_at=NULL, updated=?,"
                       " collection=COALESCE(?, collection) WHERE repo=? AND sha=?",
                       (status, reason, _now(), collection, repo, sha))
            if status in ("published", "up-to-date"):  # older revisions of this repo are replaced
                db.execute("UPDATE releases SET status='superseded', updated=? WHERE repo=? AND sha<>?"
                           " AND status IN ('published', 'up-to-date', 'failed')", (_now(), repo, sha))

    def skip(self, repo: str, sha: str, family: str, created_at: str | None, reason: str,
             status: str = "skipped") -> bool:
        """Record a release that is not built: ``skipped`` (it cannot be read now; looked at again next pass)
        or ``unsupported`` (nothing of it can be built; never again). True when this is news."""
        with self._write() as db:
            release = self.get(repo, sha)
            now = _now()
            if release is None:
                db.execute("INSERT INTO releases (repo, sha, family, created_at, first_seen, updated, status, reason)"
                           " VALUES (?,?,?,?,?,?,?,?)", (repo, sha, family, created_at, now, now, status, reason))
                return True
            if release.status != status or release.reason != reason:
                if release.status in DONE or release.status == "building":
                    return False
                db.execute("UPDATE releases SET status=?, reason=?, updated=? WHERE repo=? AND sha=?",
                           (status, reason, now, repo, sha))
                return True
            return False

    # -- variants
    def record_variant(self, repo: str, sha: str, variant: str, target_repo: str, status: str, *,
                       passed: bool | None = None, agreement: float | None = None,
                       threshold: float | None = None, commit_sha: str | None = None, reason: str = "") -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO variants (repo, sha, variant, target_repo, status, passed, agreement,"
                       " threshold, commit_sha, built_at, reason) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (repo, sha, variant, target_repo, status, None if passed is None else int(passed),
                        agreement, threshold, commit_sha, _now(), reason))

    def variants(self, repo: str | None = None, sha: str | None = None) -> list[VariantRow]:
        query, args = "SELECT * FROM variants", []
        clauses = [(c, v) for c, v in (("repo=?", repo), ("sha=?", sha)) if v is not None]
        if clauses:
            query += " WHERE " + " AND ".join(c for c, _ in clauses)
            args = [v for _, v in clauses]
        rows = self.db.execute(query + " ORDER BY built_at, repo, variant", args).fetchall()
        out = []
        for r in rows:
            d: dict[str, Any] = dict(r)
            d["passed"] = None if d["passed"] is None else bool(d["passed"])
            out.append(VariantRow(**d))
        return out
