"""A stored job's own lengths as a plan workload (`coordinator.job_lengths`): real SQLite store, the
coordinator's resolver; over gRPC, `ReplanMesh(for_job=...)` refuses unknown and finished jobs."""

from __future__ import annotations

import pytest

from coordinator.job_lengths import job_workload
from coordinator.resolve import Resolver
from coordinator.store import JobStore, ResultRecord
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.errors import FailedPrecondition, NotFound
from pqmesh.lengths import LengthHistogram, job_lengths

PARAMS = {"max_new_tokens": 8, "stop_on_eos": False, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


def _request(ids: list[int], max_tokens: int | None = None) -> bytes:
    prompt = coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=ids))
    if max_tokens is not None:
        prompt.params.max_tokens = max_tokens
    return prompt.SerializeToString()


def test_job_workload_is_the_histogram_of_its_pending_requests(tmp_path):
    store = JobStore(tmp_path)
    resolver = Resolver(max_tokens=64, vocab_size=100)
    requests = [_request([1] * 5), _request([2] * 5, max_tokens=20), _request([3] * 30), _request([4] * 70),
                _request([5] * 12, max_tokens=4)]  # the 70-token prompt cannot run in 64 tokens: left out
    store.create_job("job-a", "", "d", PARAMS, requests=requests)
    store.add_results([("job-a", ResultRecord(4, [7], "", 1))])  # the last one is done: not pending
    w = job_workload(store, resolver, "job-a", max_sequences=6, max_tokens=64)
    assert w.batch_size == 6 and w.kv_tokens_per_sequence == 64
    assert LengthHistogram.from_proto(w.prompt_lengths) == LengthHistogram.parse("5:2,30:1")
    assert LengthHistogram.from_proto(w.generation_lengths) == LengthHistogram.parse("8:2,20:1")
    prompts, new = job_lengths(w)
    assert sorted(prompts) == [5, 5, 5, 5, 30, 30] and set(new) <= {8, 20}

    with pytest.raises(NotFound, match="no job 'job-x'"):
        job_workload(store, resolver, "job-x", 6, 64)
    store.create_job("job-b", "", "d2", PARAMS, prompts=[[1, 2, 3]])
    store.add_results([("job-b", ResultRecord(0, [7], "", 1))])
    with pytest.raises(FailedPrecondition, match="no pending request"):
        job_workload(store, resolver, "job-b", 6, 64)
    store.close()


@pytest.mark.parametrize("chunk", [1000, 2])  # 2: the file's lines span several tokenizer batches
def test_lengths_command_reads_a_job_file_as_the_coordinator_would(tmp_path, capsys, monkeypatch, chunk):
    import json

    monkeypatch.setattr("coordinator.lengths_command.CHUNK_LINES", chunk)

    from test_coordinator_api import save_word_tokenizer

    from cli.main import main as pqmesh

    save_word_tokenizer(tmp_path / "tok")
    lines = [{"prompt": "the cat sat on a mat"},  # 6 words
             {"token_ids": list(range(4, 24)), "max_tokens": 40},  # 20 ids
             {"custom_id": "c", "method": "POST", "url": "/v1/completions",
              "body": {"model": "any-name", "prompt": "the dog ran far away", "max_tokens": 3}},
             "not json"]
    job = tmp_path / "job.jsonl"
    job.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    assert pqmesh(["lengths", str(job), "--tokenizer", str(tmp_path / "tok"), "--bin", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "--prompt-lengths 8:2,24:1 --gen-lengths 8:1,40:1,64:1"
    assert "1 lines left out" in err and "invalid_json" in err
    assert pqmesh(["lengths", str(job), "--json"]) == 0  # no tokenizer: only the token-id line counts
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["prompt_lengths"], report["refused"]) == \
        (1, "32:1", {"invalid_json": 1, "invalid_request": 2})
    assert pqmesh(["lengths", str(tmp_path / "missing.jsonl")]) == 2
