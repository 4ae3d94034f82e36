"""The job database's schema (version 2), the in-place migration of version-1 files, and the
locked read and transaction helpers `coordinator.store.JobStore` uses."""

from __future__ import annotations

import sqlite3
import threading

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    request_digest TEXT NOT NULL,
    state INTEGER NOT NULL,
    params TEXT NOT NULL,
    num_prompts INTEGER NOT NULL,
    tokens_generated INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS prompts (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    request BLOB,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""

# Columns added by schema version 2 (ALTER TABLE ... ADD COLUMN on a version-1 file).
ADDED = {
    "jobs": ("num_results INTEGER NOT NULL DEFAULT 0",),
    "prompts": ("request BLOB",),
    "results": ("custom_id TEXT NOT NULL DEFAULT ''", "prompt_tokens INTEGER NOT NULL DEFAULT 0",
                "error TEXT NOT NULL DEFAULT ''", "error_code TEXT NOT NULL DEFAULT ''",
                "endpoint TEXT NOT NULL DEFAULT ''", "model TEXT NOT NULL DEFAULT ''",
                "done_order INTEGER NOT NULL DEFAULT 0"),
}
INDEXES = "CREATE INDEX IF NOT EXISTS results_by_order ON results (job_id, done_order)"


def migrate(db: sqlite3.Connection) -> None:
    """Adds the columns of schema version 2 to a version-1 file (a no-op on a fresh one)."""
    for table, columns in ADDED.items():
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                if column.startswith("num_results"):
                    db.execute("UPDATE jobs SET num_results = "
                               "(SELECT COUNT(*) FROM results r WHERE r.job_id = jobs.id)")
                if column.startswith("done_order"):
                    db.execute("UPDATE results SET done_order = (SELECT COUNT(*) FROM results r WHERE "
                               "r.job_id = results.job_id AND r.idx < results.idx)")
    db.execute(INDEXES)


class Read:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        return self._db

    def __exit__(self, *exc) -> None:
        self._lock.release()


class Transaction:
    """``with store._tx() as db``: the store's lock held, BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self._lock.release()
