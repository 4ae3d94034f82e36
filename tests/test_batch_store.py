"""The job store's schema version 2 opens a version-1 file in place: old jobs keep their results, their
counts and a finishing order, and new columns take their defaults."""

from __future__ import annotations

import sqlite3

from coordinator.store import DB_NAME, JobState, JobStore, ResultRecord

V1 = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, request_digest TEXT NOT NULL,
    state INTEGER NOT NULL, params TEXT NOT NULL, num_prompts INTEGER NOT NULL,
    tokens_generated INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
    started_at REAL, finished_at REAL);
CREATE TABLE prompts (job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, token_ids TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
CREATE TABLE results (job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, token_ids TEXT NOT NULL,
    text TEXT NOT NULL, finish_reason INTEGER NOT NULL, PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
INSERT INTO jobs VALUES ('job-1', 'k', 'd', 2, '{"max_new_tokens": 2, "stop_on_eos": false, "temperature": 0.0,
    "top_k": 0, "top_p": 0.0, "seed": 0}', 3, 2, '', 1.0, 2.0, NULL);
INSERT INTO prompts VALUES ('job-1', 0, '[5]'), ('job-1', 1, '[6]'), ('job-1', 2, '[7]');
INSERT INTO results VALUES ('job-1', 0, '[1, 2]', 'ab', 2), ('job-1', 2, '[3]', 'c', 1);
PRAGMA user_version = 1;
"""


def test_a_version_1_file_is_migrated_in_place(tmp_path):
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(V1)
    store = JobStore(tmp_path)
    try:
        job = store.job("job-1")
        assert (job.state, job.num_prompts, job.num_results) == (JobState.RUNNING, 3, 2)
        assert [(p.index, p.token_ids) for p in store.pending_prompts("job-1")] == [(1, [6])]
        assert [(r.index, r.custom_id, r.prompt_tokens) for r in store.results_in_order("job-1", 0, 10)] == \
            [(0, "", 0), (2, "", 0)]
        store.add_results([("job-1", ResultRecord(1, [4], "d", 2, custom_id="x"))])
        assert [r.index for r in store.results_in_order("job-1", 0, 10)] == [0, 2, 1]
        assert store.job("job-1").state is JobState.SUCCEEDED
    finally:
        store.close()
