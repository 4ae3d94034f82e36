"""Durable jobs, prompts and results: one SQLite file (WAL, synchronous=FULL) under the state directory.

Every accepted job is committed before SubmitJob answers, every appended chunk of an uploaded job
before AppendPrompts answers, and every finished sequence before it is counted, so a coordinator
killed at any point loses no accepted prompt and no finished result. A job's idempotency key is
UNIQUE: a retried submit finds the job the first one created, and a retried upload resumes at the
number of prompts stored.

A prompt row holds either token ids (SubmitJob with plain prompts, checked whole before storing) or a
serialized `Prompt` request (uploaded jobs, and SubmitJob prompts with per-request fields), which the
engine's feeder resolves when it reaches the row. Schema version 1 files are migrated in place.
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

from coordinator.store_schema import SCHEMA, SCHEMA_VERSION, Read, Transaction, migrate
from pqmesh.errors import FailedPrecondition, NotFound, ResourceExhausted

DB_NAME = "coordinator.sqlite3"
_RESULT_COLUMNS = ("idx, token_ids, text, finish_reason, custom_id, prompt_tokens, error, error_code, endpoint, "
                   "model")
class JobState(enum.IntEnum):
    """Numbers match pqmesh.coordinator.v1.JobState."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    UPLOADING = 6  # created by CreateJob, prompts arriving; started by StartJob

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
    custom_id: str = ""
    prompt_tokens: int = 0
    error: str = ""
    error_code: str = ""
    endpoint: str = ""
    model: str = ""


@dataclass(frozen=True)
class PendingPrompt:
    """A stored prompt without a result: token ids, or a serialized `Prompt` request to resolve."""

    index: int
    token_ids: list[int] | None
    request: bytes | None


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
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise FailedPrecondition(f"{self.path} has schema version {version}; this coordinator reads "
                                             f"1 and {SCHEMA_VERSION}: use a new --state-dir")
                for statement in filter(str.strip, SCHEMA.split(";")):
                    db.execute(statement)
                migrate(db)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def _tx(self):
        return Transaction(self._db, self._lock)

    def read(self):
        """``with store.read() as db``: the lock held, no transaction (for short reads)."""
        return Read(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ---------------------------------------------------------------------------------------
    def create_job(self, job_id: str, idempotency_key: str, digest: str, params: dict,
                   prompts: Sequence[Sequence[int]] = (), requests: Sequence[bytes] = ()) -> tuple[JobRecord, bool]:
        """Stores a new job with its prompts (token ids, or serialized requests); with a known key returns
        (that job, False) instead."""
        with self._tx() as db:
            if idempotency_key:
                existing = self._keyed(db, idempotency_key, digest)
                if existing is not None:
                    return existing, False
            db.execute("INSERT INTO jobs (id, idempotency_key, request_digest, state, params, num_prompts, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, idempotency_key or None, digest, int(JobState.QUEUED), json.dumps(params),
                        len(prompts) + len(requests), time.time()))
            db.executemany("INSERT INTO prompts (job_id, idx, token_ids) VALUES (?, ?, ?)",
                           ((job_id, i, json.dumps(list(p))) for i, p in enumerate(prompts)))
            db.executemany("INSERT INTO prompts (job_id, idx, token_ids, request) VALUES (?, ?, '', ?)",
                           ((job_id, i, r) for i, r in enumerate(requests)))
            return self._job(db, job_id), True

    def count_unfinished(self) -> int:
        """Uploading, queued and running jobs."""
        with self._tx() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?, ?)",
                              (int(JobState.QUEUED), int(JobState.RUNNING), int(JobState.UPLOADING))).fetchone()[0]

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
        row = db.execute("SELECT id, idempotency_key, state, params, num_prompts, num_results, tokens_generated, "
                         "message, created_at, started_at, finished_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}; list jobs with `pqmesh jobs`")
        return JobRecord(row[0], row[1] or "", JobState(row[2]), json.loads(row[3]), *row[4:])

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
    def pending_prompts(self, job_id: str, after_index: int = -1, limit: int = -1) -> list[PendingPrompt]:
        """Prompts without a stored result with index > ``after_index``, in submission order (at most
        ``limit``; -1: all)."""
        with self.read() as db:
            rows = db.execute("SELECT p.idx, p.token_ids, p.request FROM prompts p WHERE p.job_id = ? AND p.idx > ? "
                              "AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = p.job_id AND r.idx = p.idx) "
                              "ORDER BY p.idx LIMIT ?", (job_id, after_index, limit)).fetchall()
        return [PendingPrompt(i, json.loads(ids) if request is None else None, request) for i, ids, request in rows]

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
                added, order = 0, self._job(db, job_id).num_results
                for r in records:
                    cursor = db.execute(
                        "INSERT OR IGNORE INTO results (job_id, idx, token_ids, text, finish_reason, custom_id, "
                        "prompt_tokens, error, error_code, endpoint, model, done_order) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, r.index, json.dumps(r.token_ids), r.text, int(r.finish_reason), r.custom_id,
                         r.prompt_tokens, r.error, r.error_code, r.endpoint, r.model, order))
                    if cursor.rowcount == 1:
                        added += len(r.token_ids)
                        order += 1
                db.execute("UPDATE jobs SET tokens_generated = tokens_generated + ?, num_results = ? WHERE id = ?",
                           (added, order, job_id))
                job = self._job(db, job_id)
                if job.num_results == job.num_prompts and job.state in (JobState.QUEUED, JobState.RUNNING):
                    db.execute("UPDATE jobs SET state = ?, finished_at = ?, message = ? WHERE id = ?",
                               (int(JobState.SUCCEEDED), time.time(), _error_summary(db, job), job_id))
                    completed.append(job_id)
        return completed

    def error_summary(self, job_id: str) -> str:
        """'' when no result of the job is an error; else how many are (the final message of its job)."""
        with self.read() as db:
            return _error_summary(db, self._job(db, job_id))

    def results(self, job_id: str, after_index: int, limit: int) -> list[ResultRecord]:
        """Stored results of a job with index > ``after_index``, by index, at most ``limit``."""
        with self._tx() as db:
            self._job(db, job_id)
            rows = db.execute(f"SELECT {_RESULT_COLUMNS} FROM results WHERE job_id = ? AND idx > ? "
                              "ORDER BY idx LIMIT ?", (job_id, after_index, limit)).fetchall()
        return [_result(row) for row in rows]

    def results_in_order(self, job_id: str, start: int, limit: int) -> list[ResultRecord]:
        """Stored results in the order they finished, from the ``start``-th on, at most ``limit``."""
        with self.read() as db:
            rows = db.execute(f"SELECT {_RESULT_COLUMNS} FROM results WHERE job_id = ? AND done_order >= ? "
                              "ORDER BY done_order LIMIT ?", (job_id, start, limit)).fetchall()
        return [_result(row) for row in rows]

    # -- uploads ------------------------------------------------------------------------------------
    def create_upload(self, job_id: str, idempotency_key: str, digest: str, params: dict) -> tuple[JobRecord, bool]:
        """A new UPLOADING job without prompts; with a known key returns (that job, False) instead."""
        with self._tx() as db:
            if idempotency_key:
                existing = self._keyed(db, idempotency_key, digest)
                if existing is not None:
                    return existing, False
            db.execute("INSERT INTO jobs (id, idempotency_key, request_digest, state, params, num_prompts, created_at) "
                       "VALUES (?, ?, ?, ?, ?, 0, ?)",
                       (job_id, idempotency_key or None, digest, int(JobState.UPLOADING), json.dumps(params),
                        time.time()))
            return self._job(db, job_id), True

    def append_prompts(self, job_id: str, offset: int, requests: Sequence[bytes], max_prompts: int) -> int:
        """Stores serialized requests as prompts ``offset..``; ones already stored are skipped (a retried
        append). Returns the number of prompts the job holds now."""
        with self._tx() as db:
            job = self._job(db, job_id)
            if job.state is not JobState.UPLOADING:
                raise FailedPrecondition(f"job {job_id} is {job.state.name.lower()}, not uploading: prompts can only "
                                         "be appended before StartJob")
            held = job.num_prompts
            if offset > held:
                raise FailedPrecondition(f"job {job_id} holds {held} prompts; append from offset {held}, "
                                         f"not {offset}")
            fresh = requests[held - offset:]
            if held + len(fresh) > max_prompts:
                raise ResourceExhausted(f"job {job_id} would hold {held + len(fresh)} prompts; this coordinator "
                                        f"takes at most {max_prompts} per job (--max-prompts-per-job): split the "
                                        "input into several jobs")
            db.executemany("INSERT INTO prompts (job_id, idx, token_ids, request) VALUES (?, ?, '', ?)",
                           ((job_id, held + i, r) for i, r in enumerate(fresh)))
            db.execute("UPDATE jobs SET num_prompts = ? WHERE id = ?", (held + len(fresh), job_id))
            return held + len(fresh)

    def start_upload(self, job_id: str, total: int) -> tuple[JobRecord, bool]:
        """UPLOADING -> QUEUED once ``total`` prompts are stored; (the job, whether it started now)."""
        with self._tx() as db:
            job = self._job(db, job_id)
            if job.state is not JobState.UPLOADING:
                return job, False
            if job.num_prompts == 0:
                raise FailedPrecondition(f"job {job_id} holds no prompts; append at least one before StartJob")
            if total != job.num_prompts:
                raise FailedPrecondition(f"job {job_id} holds {job.num_prompts} prompts but StartJob says {total}; "
                                         f"append the rest from offset {job.num_prompts}" if total > job.num_prompts
                                         else f"job {job_id} holds {job.num_prompts} prompts but StartJob says "
                                         f"{total}: the input changed during the upload; start a new job")
            db.execute("UPDATE jobs SET state = ? WHERE id = ?", (int(JobState.QUEUED), job_id))
            return self._job(db, job_id), True

    def _keyed(self, db: sqlite3.Connection, idempotency_key: str, digest: str) -> JobRecord | None:
        row = db.execute("SELECT id, request_digest FROM jobs WHERE idempotency_key = ?",
                         (idempotency_key,)).fetchone()
        if row is None:
            return None
        if row[1] != digest:
            raise FailedPrecondition(f"idempotency key {idempotency_key!r} was already used for a different "
                                     f"request (job {row[0]}); use a new key for a new job")
        return self._job(db, row[0])


def _error_summary(db, job: JobRecord) -> str:
    (errors,) = db.execute("SELECT COUNT(*) FROM results WHERE job_id = ? AND error != ''", (job.id,)).fetchone()
    if not errors:
        return ""
    return (f"{errors} of {job.num_prompts} requests got an error result instead of a completion (each carries "
            "error_code and error: what to change)")


def _result(row) -> ResultRecord:
    return ResultRecord(row[0], json.loads(row[1]), *row[2:])
