"""Batch jobs in the formats people use, on a real coordinator and stages (tiny random Llama with the
embedded SmolLM2 tokenizer and chat template): OpenAI Batch files in and out through the CLI, an
error line per bad line, chat messages rendered with the checkpoint's template, per-request
max_tokens / seed / stop honoured, uploads in chunks with precise refusals, results streamed."""

from __future__ import annotations

import json

import grpc
import pytest
from batch_helpers import build_chat_checkpoint, chat_line, completion_line
from test_coordinator_e2e import Client, plan_for, start_stages, stop_stages
from transformers import AutoTokenizer

from cli.main import main as cli
from coordinator import batch_client
from coordinator.config import CoordinatorConfig
from coordinator.main import serve
from coordinator.requests import Request
from coordinator.resolve import Resolver
from coordinator.settings import GenerationSettings
from coordinator.text import TextCodec
from pqmesh.api.coordinator.v1 import coordinator_pb2

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_chat_checkpoint(root / MODEL)
    stages = start_stages(root, 2)
    yield root, [address for _, address, _ in stages]
    stop_stages(stages)


@pytest.fixture(scope="module")
def coordinator(mesh, tmp_path_factory):
    root, addresses = mesh
    config = CoordinatorConfig("127.0.0.1:0", tmp_path_factory.mktemp("state"),
                               plan_for(addresses, 4, 4, [(0, 1), (1, 2)]), MODEL, max_sequences=6,
                               max_tokens_per_sequence=96, model_root=root, log_level="warning", dtype="float32",
                               max_prompts_per_job=500)
    running = serve(config)
    client = Client(running.port)
    yield running, client
    client.close()
    running.stop(grace=None)


@pytest.fixture(autouse=True)
def _quiet_cli(monkeypatch):
    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)


def run_lines(tmp_path, coordinator, lines: list[str], *flags: str) -> list[dict]:
    running, _ = coordinator
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert cli(["run-batch", "-i", str(source), "-o", str(out), "--coordinator", f"127.0.0.1:{running.port}",
                *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_openai_file_every_custom_id_once_with_usage_and_an_error_line_per_bad_line(tmp_path, coordinator):
    good = [chat_line(f"chat-{i}", f"Say something about {i}.", max_tokens=5) for i in range(8)]
    good += [completion_line(f"text-{i}", f"Once upon a time {i}", max_tokens=4) for i in range(4)]
    bad = {
        "not-json": '{"custom_id": "not-json", "body": ',
        "bad-url": json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        "n-two": chat_line("n-two", "hi", n=2),
        "logprobs": chat_line("logprobs", "hi", logprobs=True),
        "other-model": chat_line("other-model", "hi", model="gpt-4o"),
        "top-p": completion_line("top-p", "hi", top_p=2.0),
        "too-long": completion_line("too-long", "hi", max_tokens=500),
        "unknown": completion_line("unknown", "hi", best_of=3),
    }
    rows = run_lines(tmp_path, coordinator, good[:5] + list(bad.values()) + good[5:])
    by_id = {}
    for row in rows:
        assert row["custom_id"] not in by_id or row["custom_id"] is None, row
        by_id[row["custom_id"]] = row
    assert len(rows) == len(good) + len(bad)
    for i in range(8):
        body = by_id[f"chat-{i}"]["response"]["body"]
        assert by_id[f"chat-{i}"]["error"] is None and by_id[f"chat-{i}"]["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        usage = body["usage"]
        assert usage["prompt_tokens"] > 10 and 1 <= usage["completion_tokens"] <= 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    for i in range(4):
        body = by_id[f"text-{i}"]["response"]["body"]
        assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    codes = {"bad-url": "invalid_url", "n-two": "unsupported_parameter", "logprobs": "unsupported_parameter",
             "other-model": "model_not_found", "top-p": "invalid_request", "too-long": "context_length_exceeded",
             "unknown": "unsupported_parameter"}
    for custom_id, code in codes.items():
        row = by_id[custom_id]
        assert row["response"]["status_code"] == 400 and row["error"]["code"] == code, row
        assert row["error"]["message"]
    assert "+ max_tokens 500 = " in by_id["too-long"]["error"]["message"]
    assert "max_tokens alone fills it, so lower max_tokens to at most " in by_id["too-long"]["error"]["message"]
    unparseable = by_id[None]  # its custom_id could not be read
    assert unparseable["error"]["code"] == "invalid_json"


def test_chat_messages_use_the_checkpoints_template(mesh, coordinator, tmp_path):
    root, _ = mesh
    tokenizer = AutoTokenizer.from_pretrained(root / MODEL)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    codec = TextCodec(root / MODEL)
    resolved = Resolver(96, codec, eos_ids=frozenset({2})).resolve(
        0, Request(messages=tuple((m["role"], m["content"]) for m in messages), stop_on_eos=True),
        GenerationSettings(8))
    assert list(resolved.prompt) == expected
    assert 2 in resolved.stop_ids and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"  # the end-of-turn token

    line = json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": messages, "max_tokens": 6}})
    [chat] = run_lines(tmp_path, coordinator, [line])
    _, client = coordinator
    [same] = client.run([expected], 6)  # the rendered ids sent as token ids generate the same tokens
    assert chat["response"]["body"]["usage"]["prompt_tokens"] == len(expected)
    assert chat["response"]["body"]["choices"][0]["message"]["content"] == same.text


def test_per_request_max_tokens_seed_and_stop_strings(coordinator, tmp_path):
    lines = [completion_line("two", "The sky is", max_tokens=2, temperature=0),
             completion_line("twelve", "The sky is", max_tokens=12, temperature=0),
             completion_line("seed-a", "Tell me", max_tokens=8, temperature=1.0, seed=7),
             completion_line("seed-b", "Tell me", max_tokens=8, temperature=1.0, seed=7),
             completion_line("seed-c", "Tell me", max_tokens=8, temperature=1.0, seed=8)]
    rows = {r["custom_id"]: r["response"]["body"] for r in run_lines(tmp_path, coordinator, lines)}
    assert rows["two"]["usage"]["completion_tokens"] == 2 and rows["two"]["choices"][0]["finish_reason"] == "length"
    assert rows["twelve"]["usage"]["completion_tokens"] == 12
    assert rows["twelve"]["choices"][0]["text"].startswith(rows["two"]["choices"][0]["text"])
    texts = {k: rows[k]["choices"][0]["text"] for k in ("seed-a", "seed-b", "seed-c")}
    assert texts["seed-a"] == texts["seed-b"] != texts["seed-c"]

    full = rows["twelve"]["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    [cut] = run_lines(tmp_path, coordinator, [completion_line("stop", "The sky is", max_tokens=12, stop=[stop])])
    choice = cut["response"]["body"]["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


def test_plain_lines_keep_working_with_per_line_parameters(coordinator, tmp_path):
    lines = [json.dumps({"prompt": "hello there", "max_tokens": 3}), json.dumps({"token_ids": [5, 6, 7]}),
             json.dumps({"prompt": "x", "custom_id": "mine", "max_tokens": 0})]
    rows = sorted(run_lines(tmp_path, coordinator, lines, "--max-new-tokens", "5", "--ignore-eos"),
                  key=lambda r: r["index"])
    assert [len(r["token_ids"]) for r in rows[:2]] == [3, 5]
    assert rows[0]["usage"]["completion_tokens"] == 3 and rows[0]["finish_reason"] == "length"
    assert rows[2]["custom_id"] == "mine" and rows[2]["error"]["code"] == "invalid_request"


def test_upload_refusals_are_precise_and_results_stream_as_they_finish(coordinator):
    running, client = coordinator
    stub = client.stub
    params = coordinator_pb2.GenerationParams(max_new_tokens=3, stop_on_eos=False)
    job = stub.CreateJob(coordinator_pb2.CreateJobRequest(idempotency_key="k1", params=params, content_digest="d1"))
    assert job.state == coordinator_pb2.JOB_STATE_UPLOADING and job.prompts_received == 0
    prompts = [coordinator_pb2.Prompt(jsonl_line=json.dumps({"token_ids": [9, i + 10]})) for i in range(20)]

    def refused(call):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        return caught.value.code(), caught.value.details()

    append = stub.AppendPrompts
    assert append(coordinator_pb2.AppendPromptsRequest(job_id=job.job_id, offset=0, prompts=prompts[:12])) \
        .prompts_received == 12
    code, message = refused(lambda: append(coordinator_pb2.AppendPromptsRequest(job_id=job.job_id, offset=15,
                                                                               prompts=prompts[15:])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "append from offset 12" in message
    # a retried chunk (offset 8) stores only what is new
    assert append(coordinator_pb2.AppendPromptsRequest(job_id=job.job_id, offset=8, prompts=prompts[8:])) \
        .prompts_received == 20
    code, message = refused(lambda: stub.StartJob(coordinator_pb2.StartJobRequest(job_id=job.job_id,
                                                                                  prompts_total=25)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "from offset 20" in message
    code, message = refused(lambda: stub.CreateJob(coordinator_pb2.CreateJobRequest(
        idempotency_key="k1", params=params, content_digest="other")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "different request" in message
    again = stub.CreateJob(coordinator_pb2.CreateJobRequest(idempotency_key="k1", params=params, content_digest="d1"))
    assert (again.job_id, again.prompts_received) == (job.job_id, 20)
    stub.StartJob(coordinator_pb2.StartJobRequest(job_id=job.job_id, prompts_total=20))
    code, message = refused(lambda: append(coordinator_pb2.AppendPromptsRequest(job_id=job.job_id, offset=20,
                                                                               prompts=prompts[:1])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not uploading" in message

    streamed = list(stub.StreamResults(coordinator_pb2.StreamResultsRequest(job_id=job.job_id), timeout=60))
    assert sorted(r.index for r in streamed) == list(range(20))
    assert all(r.completion_tokens == 3 and r.prompt_tokens == 2 for r in streamed)
    tail = list(stub.StreamResults(coordinator_pb2.StreamResultsRequest(job_id=job.job_id, resume_from=15)))
    assert [r.index for r in tail] == [r.index for r in streamed[15:]]

    big = stub.CreateJob(coordinator_pb2.CreateJobRequest(idempotency_key="k2", params=params))
    code, message = refused(lambda: append(coordinator_pb2.AppendPromptsRequest(
        job_id=big.job_id, offset=0, prompts=prompts * 26)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-prompts-per-job" in message
    stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=big.job_id))


def test_rerunning_the_same_file_returns_the_same_job(coordinator, tmp_path):
    running, client = coordinator
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(completion_line(f"r{i}", "abc", max_tokens=2) for i in range(5)) + "\n")
    params = coordinator_pb2.GenerationParams(max_new_tokens=4)
    first = batch_client.upload(client.stub, source, params, batch_client.default_key(source, params))
    second = batch_client.upload(client.stub, source, params, batch_client.default_key(source, params))
    assert first.job_id == second.job_id and (first.total, second.total, second.resumed_from) == (5, 5, 5)
