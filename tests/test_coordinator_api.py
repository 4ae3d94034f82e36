"""The job API on a real coordinator and stage: idempotent submit, paged results, cancel, precise
statuses for bad input, text prompts through a tokenizer, the `pqmesh submit/results/jobs/cancel`
commands, and mesh bring-up errors that name the stage."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_coordinator_e2e import Client, mixed_prompts, plan_for, start_stages, stop_stages
from tiny_models import build_checkpoint, reference_greedy
from transformers import AutoTokenizer

from cli.main import main as cli
from coordinator.config import CoordinatorConfig
from coordinator.main import serve
from coordinator.mesh import Mesh, MeshSpec
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.errors import FailedPrecondition, Unavailable

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then", "slept"]


def save_word_tokenizer(directory: Path) -> None:
    """A 256-entry word-level tokenizer matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS + [f"w{i}" for i in range(256)]:
        if len(vocab) < 256:
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = build_checkpoint("llama", root / "tiny-llama")
    save_word_tokenizer(root / "tiny-llama")
    stages = start_stages(root, 1)
    yield root, model, [address for _, address, _ in stages]
    stop_stages(stages)


@pytest.fixture(scope="module")
def coordinator(mesh, tmp_path_factory):
    root, model, addresses = mesh
    config = CoordinatorConfig(
        "127.0.0.1:0",
        tmp_path_factory.mktemp("state"),
        plan_for(addresses, 2, 3, [(0, 4)]),
        "tiny-llama",
        max_sequences=4,
        max_tokens_per_sequence=40,
        model_root=root,
        log_level="warning",
    )
    running = serve(config)
    client = Client(running.port)
    yield running, client, model
    client.close()
    running.stop(grace=None)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_health_and_idempotent_submit(coordinator):
    running, client, model = coordinator
    health = health_pb2_grpc.HealthStub(client.channel).Check(
        health_pb2.HealthCheckRequest(service="pqmesh.coordinator.v1.CoordinatorService"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    prompts = mixed_prompts(5, seed=1)
    first = client.submit(prompts, 4, key="batch-42")
    again = client.submit(prompts, 4, key="batch-42")
    assert again == first
    code, details = status_of(lambda: client.submit(prompts[:2], 4, key="batch-42"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already used for a different request" in details
    assert client.wait(first).state == coordinator_pb2.JOB_STATE_SUCCEEDED
    listed = [
        j for j in client.stub.ListJobs(coordinator_pb2.ListJobsRequest()).jobs if j.idempotency_key == "batch-42"
    ]
    assert [j.job_id for j in listed] == [first] and listed[0].sequences_done == 5
    assert [list(r.token_ids) for r in client.results(first)] == reference_greedy(model, prompts, 4)


def test_results_come_in_pages_in_submission_order(coordinator):
    _, client, model = coordinator
    prompts = mixed_prompts(7, seed=2)
    job = client.submit(prompts, 3)
    client.wait(job)
    pages, token = [], ""
    while True:
        page = client.stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job, page_size=3, page_token=token))
        pages.append([r.index for r in page.results])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(r.token_ids) for r in client.results(job, page_size=2)] == reference_greedy(model, prompts, 3)
    code, details = status_of(lambda: client.stub.GetResults(
        coordinator_pb2.GetResultsRequest(job_id=job, page_token="not-a-token")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details


def test_cancel_stops_a_job_and_frees_its_slots(coordinator):
    _, client, model = coordinator
    big = client.submit(mixed_prompts(80, seed=3), 20)
    cancelled = client.stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=big))
    assert cancelled.state == coordinator_pb2.JOB_STATE_CANCELLED
    final = client.wait(big)
    assert final.state == coordinator_pb2.JOB_STATE_CANCELLED and final.sequences_done < 80
    # the mesh is free again: the next job runs, on every KV slot, and is exact
    prompts = mixed_prompts(6, seed=4)
    assert [list(r.token_ids) for r in client.run(prompts, 5)] == reference_greedy(model, prompts, 5)
    # cancelling a finished job changes nothing
    assert (
        client.stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=big)).state == coordinator_pb2.JOB_STATE_CANCELLED
    )


def test_bad_input_gets_precise_statuses_and_stores_nothing(coordinator):
    _, client, _ = coordinator
    before = len(client.stub.ListJobs(coordinator_pb2.ListJobsRequest()).jobs)
    bad = {
        "no prompts": (lambda: client.submit([], 4), grpc.StatusCode.INVALID_ARGUMENT, "at least one prompt"),
        "empty prompt": (lambda: client.submit([[5, 6], []], 4), grpc.StatusCode.INVALID_ARGUMENT, "prompt 1 is empty"),
        "empty text": (
            lambda: client.submit(["the cat", ""], 4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt 1 is empty",
        ),
        "max_new_tokens fills the cache": (
            lambda: client.submit([[5] * 3], 40),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens 40 leaves no room for a prompt in the mesh's 40 tokens per sequence "
            "(--max-tokens-per-sequence): lower it to at most 39",
        ),
        "outside vocabulary": (lambda: client.submit([[5, 256]], 4), grpc.StatusCode.INVALID_ARGUMENT, "0..255"),
        "no new tokens": (lambda: client.submit([[5]], 0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        "negative temperature": (
            lambda: client.submit([[5]], 2, temperature=-1.0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        "neither text nor ids": (
            lambda: client.stub.SubmitJob(
                coordinator_pb2.SubmitJobRequest(
                    prompts=[coordinator_pb2.Prompt()], params=coordinator_pb2.GenerationParams(max_new_tokens=2)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "neither text nor token_ids",
        ),
    }
    for name, (call, code, text) in bad.items():
        got, details = status_of(call)
        assert (got, text in details) == (code, True), f"{name}: {got} {details}"
    for rpc, request in [(client.stub.GetResults, coordinator_pb2.GetResultsRequest(job_id="job-nope")),
                         (client.stub.CancelJob, coordinator_pb2.CancelJobRequest(job_id="job-nope")),
                         (lambda r: list(client.stub.WatchJob(r)), coordinator_pb2.WatchJobRequest(job_id="job-nope"))]:
        code, details = status_of(lambda: rpc(request))
        assert code == grpc.StatusCode.NOT_FOUND and "job-nope" in details
    assert len(client.stub.ListJobs(coordinator_pb2.ListJobsRequest()).jobs) == before


def test_an_over_long_prompt_gets_an_error_result_and_the_rest_of_the_job_runs(coordinator, tmp_path, capsys,
                                                                                 monkeypatch):
    running, client, model = coordinator
    fitting = mixed_prompts(4, seed=9)
    long_text = " ".join(["cat"] * 37)  # 37 tokens through the word tokenizer
    mixed = [fitting[0], [5] * 38, fitting[1], long_text, fitting[2], [7] * 40, fitting[3]]
    final = client.wait(client.submit(mixed, 4))
    assert final.state == coordinator_pb2.JOB_STATE_SUCCEEDED and final.sequences_done == len(mixed)
    assert final.message.startswith("3 of 7 requests got an error result"), final.message
    results = client.results(final.job_id)
    assert [r.index for r in results] == list(range(len(mixed)))
    ran = [list(results[i].token_ids) for i in (0, 2, 4, 6)]
    alone = [list(r.token_ids) for r in client.run(fitting, 4)]  # the same prompts without the long ones
    assert ran == alone == reference_greedy(model, fitting, 4)
    head = "{n} tokens + max_new_tokens 4 = {t} tokens exceeds the mesh's 40 tokens per sequence " \
           "(--max-tokens-per-sequence): "
    expected = {1: "prompt of " + head.format(n=38, t=42) + "shorten the prompt to at most 36 tokens or lower "
                                                            "max_new_tokens to at most 2",
                3: "prompt of " + head.format(n=37, t=41) + "shorten the prompt to at most 36 tokens or lower "
                                                            "max_new_tokens to at most 3",
                5: "prompt of " + head.format(n=40, t=44) + "shorten the prompt to at most 36 tokens"}
    for i, error in expected.items():
        r = results[i]
        assert (r.finish_reason, r.error_code, r.error) == (coordinator_pb2.FINISH_REASON_ERROR,
                                                            "context_length_exceeded", error), r
        assert list(r.token_ids) == []
    assert all(not results[i].error for i in (0, 2, 4, 6))
    listed = [j for j in client.stub.ListJobs(coordinator_pb2.ListJobsRequest()).jobs if j.job_id == final.job_id]
    assert listed[0].sequences_done == len(mixed) and listed[0].state == coordinator_pb2.JOB_STATE_SUCCEEDED
    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)  # the test session's logging stays
    out = tmp_path / "results.jsonl"
    assert cli(["results", final.job_id, "--coordinator", f"127.0.0.1:{running.port}", "--out", str(out)]) == 0
    assert f"job {final.job_id}: 3 of 7 requests got an error result" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["finish_reason"] for r in rows] == ["length", "error"] * 3 + ["length"]
    assert rows[1]["error"]["code"] == "context_length_exceeded" and "at most 36 tokens" in rows[1]["error"]["message"]


def test_cli_submits_text_and_token_prompts_and_fetches_results(coordinator, tmp_path, capsys, monkeypatch):
    # the CLI configures process-wide logging for its process; leave the test session's logging alone
    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)
    running, client, model = coordinator
    address = f"127.0.0.1:{running.port}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "the cat sat on a mat"}) + "\n" + json.dumps({"token_ids": [9, 8, 7]}) + "\n"
    )
    out = tmp_path / "results.jsonl"
    assert cli(["submit", str(prompts), "--coordinator", address, "--out", str(out), "--max-new-tokens", "4",
                "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert "2/2 sequences" in err and "[########################]" in err
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    tokenizer = AutoTokenizer.from_pretrained(running.jobs.codec.directory)
    tokens = [tokenizer("the cat sat on a mat")["input_ids"], [9, 8, 7]]
    assert tokens[0] == [4, 5, 6, 7, 8, 9]
    assert [r["token_ids"] for r in rows] == reference_greedy(model, tokens, 4)
    assert [r["text"] for r in rows] == [tokenizer.decode(r["token_ids"], skip_special_tokens=True) for r in rows]
    assert [r["index"] for r in rows] == [0, 1] and {r["finish_reason"] for r in rows} == {"length"}
    # the same command again finds the same job (default idempotency key) and `results` prints the same rows
    assert cli(["submit", str(prompts), "--coordinator", address, "--max-new-tokens", "4", "--ignore-eos",
                "--no-wait"]) == 0
    # (in-process, the servers' unconfigured loggers print to the same stdout: keep the command's lines)
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli(["results", job_id, "--coordinator", address]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")] == rows
    assert cli(["jobs", "--coordinator", address]) == 0
    assert job_id in capsys.readouterr().out
    assert cli(["results", "job-nope", "--coordinator", address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_without_model_files_text_needs_a_tokenizer_and_bad_ids_fail_only_their_job(mesh, tmp_path):
    _, model, addresses = mesh
    config = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for(addresses, 2, 3, [(0, 4)]), "tiny-llama",
                               max_sequences=2, max_tokens_per_sequence=16, log_level="warning")
    running = serve(config)  # no --model-root or --tokenizer: token ids only, no EOS id known
    client = Client(running.port)
    try:
        code, details = status_of(lambda: client.submit(["the cat"], 2))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--tokenizer" in details
        code, details = status_of(lambda: client.submit([[5]], 2, stop_on_eos=True))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--eos-token-id" in details
        # without the model's config the vocabulary is unknown: the stage refuses the id, the micro-batch is
        # retried, and after the third loss only that job fails, with the stage's reason
        doomed = client.submit([[5, 6], [7, 999]], 2)
        final = client.wait(doomed)
        assert final.state == coordinator_pb2.JOB_STATE_FAILED
        assert (
            "lost this job's micro-batches 3 times" in final.message
            and "token ids must be within 0..255" in final.message
        )
        assert client.run([[5, 6]], 2)[0].token_ids == reference_greedy(model, [[5, 6]], 2)[0]
    finally:
        client.close()
        running.stop(grace=None)


def test_engine_reloads_a_stage_that_lost_its_plan(mesh, coordinator):
    """Another plan takes the stage: the next micro-batch fails there, and the engine brings the mesh up
    again and reruns the lost sequences."""
    _, _, addresses = mesh
    running, client, model = coordinator
    intruder = Mesh(MeshSpec(plan_for(addresses, 1, 1, [(0, 4)]), "tiny-llama", 1, 8))
    intruder.bring_up()
    intruder.close()
    prompts = mixed_prompts(5, seed=6)
    assert [list(r.token_ids) for r in client.run(prompts, 4)] == reference_greedy(model, prompts, 4)
    assert running.mesh.clients[0].info().plan_id == running.mesh.plan_id


def test_bring_up_names_the_stage_that_refused(mesh, tmp_path):
    root, _, addresses = mesh
    wrong = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for(addresses, 1, 1, [(0, 3)]), "tiny-llama",
                              max_sequences=2, max_tokens_per_sequence=16, log_level="warning")
    with pytest.raises(FailedPrecondition, match=rf"stage 0 \({addresses[0]}, layers \[0, 3\)\) refused LoadShard: "
                                                 "INVALID_ARGUMENT: .*make a first stage, not only"):
        serve(wrong)
    missing = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for(addresses, 1, 1, [(0, 4)]), "no-such-model",
                                max_sequences=2, max_tokens_per_sequence=16, log_level="warning")
    with pytest.raises(
        FailedPrecondition, match="stage 0 .* refused LoadShard: NOT_FOUND: no checkpoint 'no-such-model'"
    ):
        serve(missing)
    nobody = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for(["127.0.0.1:9"], 1, 1, [(0, 4)]), "tiny-llama",
                               max_sequences=2, max_tokens_per_sequence=16, connect_timeout=0.5, log_level="warning")
    with pytest.raises(Unavailable, match=r"stage 0 \(127.0.0.1:9, layers \[0, 4\)\) did not answer within"):
        serve(nobody)
    too_big = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for(addresses, 1, 1, [(0, 4)]), "tiny-llama",
                                max_sequences=100_000, max_tokens_per_sequence=4096, log_level="warning")
    with pytest.raises(FailedPrecondition, match="refused LoadShard: FAILED_PRECONDITION: .*short by"):
        serve(too_big)
