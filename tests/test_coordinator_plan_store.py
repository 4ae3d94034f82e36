"""The coordinator's plain parts: the mesh plan (the planner's JSON, round trip, validation) and the
SQLite job store (idempotency keys, durability across reopening, results stored once)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from coordinator.scheduler import FinishReason
from coordinator.store import JobState, JobStore, ResultRecord
from planner.plans import PlanResult, Prediction
from pqmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from pqmesh.plan import PipelinePlan, StagePlan, even_plan
from pqmesh.types import Bits


def planner_answer() -> dict:
    """What `pqmesh plan --json` prints, built with the planner's own classes."""
    plan = PipelinePlan(
        (StagePlan("T4", 0, 10, (Bits(4),) * 10), StagePlan("V100", 10, 30, (Bits(16),) * 8 + (Bits(8),) * 12)),
        prefill_micro_batch=1,
        decode_micro_batch=8,
    )
    return PlanResult(plan, Prediction(100.0, 1.0, 2.0, (1, 2))).to_report()


def test_reads_the_planners_answer_or_its_plan_and_round_trips():
    answer = planner_answer()
    whole, inner = PipelinePlan.from_json(json.dumps(answer)), PipelinePlan.from_json(json.dumps(answer["plan"]))
    assert whole == inner
    assert (whole.num_layers, whole.prefill_micro_batch, whole.decode_micro_batch) == (30, 1, 8)
    assert whole.stages[1].bits == (16,) * 8 + (8,) * 12 and whole.stages[0].device == "T4"
    placed = whole.with_addresses(["10.0.0.1:50061", "10.0.0.2:50061"])
    assert PipelinePlan.from_json(placed.to_json()) == placed and placed.addresses == (
        "10.0.0.1:50061",
        "10.0.0.2:50061",
    )
    with pytest.raises(InvalidArgument, match="1 stage addresses for a plan of 2 stages"):
        whole.with_addresses(["10.0.0.1:50061"])
    with pytest.raises(InvalidArgument, match=r"stages \[0, 1\] have no address"):
        whole.require_addresses()
    with pytest.raises(InvalidArgument, match="covers layers \\[0, 30\\) but the model has 32 layers"):
        whole.check_layers(32)
    assert [(s.start, s.end) for s in even_plan(30, ["a:1", "b:2", "c:3"], 4, 4).stages] == [
        (0, 10),
        (10, 20),
        (20, 30),
    ]


@pytest.mark.parametrize("stages,message", [
    ([], "at least one stage"),
    ([{"layers": [1, 4], "bits": [16] * 3}], "must start at layer 0"),
    ([{"layers": [0, 2], "bits": [16] * 2}, {"layers": [3, 4], "bits": [16]}], "stages 0 and 1 are not contiguous"),
    ([{"layers": [0, 2], "bits": [16] * 2}, {"layers": [1, 4], "bits": [16] * 3}], "not contiguous"),
    ([{"layers": [0, 2], "bits": [16]}], "1 bitwidths for 2 layers"),
    ([{"layers": [0, 2], "bits": [16, 7]}], r"bitwidths \[7\] are not supported"),
    ([{"layers": [0, 0], "bits": []}], "empty"),
    ([{"layers": [0, 2], "bits": [16, 16], "address": "nohost"}], "must be HOST:PORT"),
    ([{"bits": [16]}], "needs \"layers\""),
])
def test_invalid_plans_say_what_to_change(stages, message):
    with pytest.raises(InvalidArgument, match=message):
        PipelinePlan.from_json(json.dumps({"stages": stages, "prefill_micro_batch": 1, "decode_micro_batch": 1}))


def test_invalid_plan_files():
    for text, message in [("{", "not valid JSON"), ("[]", "a plan is a JSON object"),
                          (json.dumps({"stages": [{"layers": [0, 1], "bits": [16]}], "prefill_micro_batch": 0,
                                       "decode_micro_batch": 1}), ">= 1")]:
        with pytest.raises(InvalidArgument, match=message):
            PipelinePlan.from_json(text)
    with pytest.raises(InvalidArgument):
        StagePlan("", 0, 2, (16, 16), address="host:port")


def test_store_keeps_jobs_and_results_durably_and_once(tmp_path):
    store = JobStore(tmp_path)
    params = {"max_new_tokens": 4}
    job, created = store.create_job("job-1", "key-1", "digest-a", params, [[1, 2], [3], [4, 5, 6]])
    assert created and (job.state, job.num_prompts, job.num_results) == (JobState.QUEUED, 3, 0)
    again, created = store.create_job("job-2", "key-1", "digest-a", params, [[1, 2], [3], [4, 5, 6]])
    assert not created and again.id == "job-1"
    with pytest.raises(FailedPrecondition, match="already used for a different request"):
        store.create_job("job-3", "key-1", "digest-b", params, [[1]])
    other, _ = store.create_job("job-4", "", "digest-c", params, [[7]])
    assert store.create_job("job-5", "", "digest-c", params, [[7]])[1]  # no key: always a new job
    assert store.set_state("job-1", JobState.RUNNING).started_at is not None
    assert store.add_results([("job-1", ResultRecord(1, [9, 9], "", FinishReason.LENGTH))]) == []
    store.close()

    store = JobStore(tmp_path)  # as after a crash: everything committed is there
    assert [j.id for j in store.unfinished_jobs()] == ["job-1", "job-4", "job-5"]
    assert [(p.index, p.token_ids) for p in store.pending_prompts("job-1")] == [(0, [1, 2]), (2, [4, 5, 6])]
    done = store.add_results([("job-1", ResultRecord(0, [8], "a", FinishReason.EOS)),
                              ("job-1", ResultRecord(1, [7, 7, 7], "dup", FinishReason.LENGTH)),  # already stored
                              ("job-1", ResultRecord(2, [6, 6], "b", FinishReason.LENGTH))])
    assert done == ["job-1"]
    job = store.job("job-1")
    assert (job.state, job.num_results, job.tokens_generated) == (JobState.SUCCEEDED, 3, 5)
    assert [(r.index, r.token_ids, r.finish_reason) for r in store.results("job-1", -1, 10)] == \
        [(0, [8], 1), (1, [9, 9], 2), (2, [6, 6], 2)]
    assert [r.index for r in store.results("job-1", 0, 1)] == [1]
    assert store.set_state("job-1", JobState.CANCELLED).state is JobState.SUCCEEDED  # final stays final
    assert [j.id for j in store.jobs()][:2] == ["job-5", "job-4"]
    with pytest.raises(NotFound, match="no job 'job-x'"):
        store.results("job-x", -1, 10)
    store.close()
    with sqlite3.connect(tmp_path / "coordinator.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version=7")
    with pytest.raises(FailedPrecondition, match="schema version 7"):
        JobStore(tmp_path)
