"""Durable jobs, prompts and results: one SQLite file (WAL, synchronous=FULL) under the state directory.

Every accepted job is committed before SubmitJob answers, and every finished sequence before it is
counted, so a coordinator killed at any point loses no accepted job and no finished result. A job's
idempotency key is UNIQUE: a retried submit finds the job the first one created.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pqmesh.errors import FailedPrecondition, NotFound

DB_NAME = "coordinator.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
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


class JobState(enum.IntEnum):
    """Numbers match pqmesh.coordinator.v1.JobState."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    id: str
    idempotency_key: str
    state: JobState
    params: dict
    num_prompts: int
    num_results: int
    tokens_generated: int
    message: str
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class ResultRecord:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: int


class JobStore:
    """Thread-safe: one connection, one lock; each public method is one transaction."""

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            with self._tx() as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise FailedPrecondition(f"{self.path} has schema version {version}; this coordinator reads "
                                             f"{SCHEMA_VERSION}: use a new --state-dir")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ---------------------------------------------------------------------------------------
    def create_job(self, job_id: str, idempotency_key: str, digest: str, params: dict,
                   prompts: Sequence[Sequence[int]]) -> tuple[JobRecord, bool]:
        """Stores a new job with its prompts; with a known key returns (that job, False) instead."""
        with self._tx() as db:
            if idempotency_key:
                row = db.execute("SELECT id, request_digest FROM jobs WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    if row[1] != digest:
                        raise FailedPrecondition(
                            f"idempotency key {idempotency_key!r} was already used for a different "
                            f"request (job {row[0]}); use a new key for a new job"
                        )
                    return self._job(db, row[0]), False
            db.execute("INSERT INTO jobs (id, idempotency_key, request_digest, state, params, num_prompts, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, idempotency_key or None, digest, int(JobState.QUEUED), json.dumps(params),
                        len(prompts), time.time()))
            db.executemany("INSERT INTO prompts (job_id, idx, token_ids) VALUES (?, ?, ?)",
                           ((job_id, i, json.dumps(list(p))) for i, p in enumerate(prompts)))
            return self._job(db, job_id), True

    def count_unfinished(self) -> int:
        """Queued and running jobs."""
        with self._tx() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)",
                              (int(JobState.QUEUED), int(JobState.RUNNING))).fetchone()[0]

    def has_key(self, idempotency_key: str) -> bool:
        with self._tx() as db:
            return db.execute("SELECT 1 FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone() is not None

    def job(self, job_id: str) -> JobRecord:
        with self._tx() as db:
            return self._job(db, job_id)

    def jobs(self) -> list[JobRecord]:
        """Every job, most recently submitted first."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs ORDER BY created_at DESC, rowid DESC")]
            return [self._job(db, i) for i in ids]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first (the order they resume in)."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state IN (?, ?) ORDER BY created_at, rowid",
                                            (int(JobState.QUEUED), int(JobState.RUNNING)))]
            return [self._job(db, i) for i in ids]

    def state_counts(self) -> dict[JobState, int]:
        """Number of jobs in each state (states without jobs are absent)."""
        with self._tx() as db:
            return {JobState(s): n for s, n in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    @staticmethod
    def _job(db: sqlite3.Connection, job_id: str) -> JobRecord:
        row = db.execute("SELECT id, idempotency_key, state, params, num_prompts, tokens_generated, message, "
                         "created_at, started_at, finished_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}; list jobs with `pqmesh jobs`")
        done = db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)).fetchone()[0]
        return JobRecord(row[0], row[1] or "", JobState(row[2]), json.loads(row[3]), row[4], done, row[5], row[6],
                         row[7], row[8], row[9])

    def set_state(self, job_id: str, state: JobState, message: str = "") -> JobRecord:
        """Moves a job to ``state``; a job already in a final state stays there."""
        with self._tx() as db:
            current = self._job(db, job_id)
            if current.state.final:
                return current
            now = time.time()
            if state is JobState.RUNNING:
                db.execute("UPDATE jobs SET state = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                           (int(state), now, job_id))
            else:
                db.execute("UPDATE jobs SET state = ?, message = ?, finished_at = ? WHERE id = ?",
                           (int(state), message, now if state.final else None, job_id))
            return self._job(db, job_id)

    # -- prompts and results ------------------------------------------------------------------------
    def pending_prompts(self, job_id: str) -> list[tuple[int, list[int]]]:
        """(index, token ids) of every prompt without a stored result, in submission order."""
        with self._tx() as db:
            rows = db.execute("SELECT p.idx, p.token_ids FROM prompts p LEFT JOIN results r "
                              "ON r.job_id = p.job_id AND r.idx = p.idx WHERE p.job_id = ? AND r.idx IS NULL "
                              "ORDER BY p.idx", (job_id,)).fetchall()
        return [(i, json.loads(ids)) for i, ids in rows]

    def add_results(self, results: Iterable[tuple[str, ResultRecord]]) -> list[str]:
        """Stores finished sequences in one transaction; returns the jobs this completed (now SUCCEEDED).

        A result already stored (same job and index) is kept as it was: a sequence is never stored twice.
        """
        by_job: dict[str, list[ResultRecord]] = {}
        for job_id, result in results:
            by_job.setdefault(job_id, []).append(result)
        completed = []
        with self._tx() as db:
            for job_id, records in by_job.items():
                added = 0
                for r in records:
                    cursor = db.execute("INSERT OR IGNORE INTO results (job_id, idx, token_ids, text, finish_reason) "
                                        "VALUES (?, ?, ?, ?, ?)",
                                        (job_id, r.index, json.dumps(r.token_ids), r.text, int(r.finish_reason)))
                    added += len(r.token_ids) if cursor.rowcount == 1 else 0
                db.execute("UPDATE jobs SET tokens_generated = tokens_generated + ? WHERE id = ?", (added, job_id))
                job = self._job(db, job_id)
                if job.num_results == job.num_prompts and job.state in (JobState.QUEUED, JobState.RUNNING):
                    db.execute("UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?",
                               (int(JobState.SUCCEEDED), time.time(), job_id))
                    completed.append(job_id)
        return completed

    def results(self, job_id: str, after_index: int, limit: int) -> list[ResultRecord]:
        """Stored results of a job with index > ``after_index``, by index, at most ``limit``."""
        with self._tx() as db:
            self._job(db, job_id)
            rows = db.execute("SELECT idx, token_ids, text, finish_reason FROM results WHERE job_id = ? AND idx > ? "
                              "ORDER BY idx LIMIT ?", (job_id, after_index, limit)).fetchall()
        return [ResultRecord(i, json.loads(ids), text, reason) for i, ids, text, reason in rows]


class _Transaction:
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
