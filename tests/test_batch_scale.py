"""Batch jobs against `pqmesh-coordinator` as a real process: a 150,000-line OpenAI Batch file (over the
8 MiB message limit) goes in over gRPC while the coordinator's memory stays bounded, and a coordinator
killed with SIGKILL in the middle of an upload and again in the middle of the job loses nothing it
accepted: every custom_id comes back exactly once."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from batch_helpers import completion_line, free_port, rss_kib
from test_coordinator_e2e import plan_for, start_stages, stop_stages
from test_coordinator_restart import CoordinatorProcess
from tiny_models import build_checkpoint

from coordinator import batch_client
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_checkpoint("llama", root / "tiny-llama", layers=2)
    stages = start_stages(root, 1)
    yield root, [address for _, address, _ in stages]
    stop_stages(stages)


def coordinator_args(tmp_path, addresses, port: int, max_sequences: int = 4) -> list[str]:
    plan = tmp_path / "plan.json"
    plan.write_text(plan_for(addresses, 2, 4, [(0, 2)]).to_json())
    return ["--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"), "--plan", str(plan),
            "--model-id", "tiny-llama", "--max-sequences", str(max_sequences), "--max-tokens-per-sequence", "32",
            "--dtype", "float32", "--log-level", "info"]


def token_line(i: int) -> str:
    return json.dumps({"custom_id": f"req-{i:06d}", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny-llama", "prompt": [5 + i % 200, 7, 9 + i % 31], "max_tokens": 3}})


def count(tmp_path, table: str) -> int:
    with sqlite3.connect(tmp_path / "state" / "coordinator.sqlite3", timeout=30) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.mark.slow
def test_a_150k_line_file_goes_in_over_grpc_with_bounded_coordinator_memory(tmp_path, mesh):
    _, addresses = mesh
    source = tmp_path / "big.jsonl"
    with source.open("w") as f:
        for i in range(150_000):
            f.write(token_line(i) + "\n")
    assert source.stat().st_size > 8 << 20
    process = CoordinatorProcess(coordinator_args(tmp_path, addresses, 0))
    try:
        port = process.wait_for("coordinator_serving")["port"]
        before = rss_kib(process.proc.pid)
        with channel(f"127.0.0.1:{port}") as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            params = coordinator_pb2.GenerationParams(max_new_tokens=3)
            job = batch_client.upload(stub, source, params, "big-file")
            assert job.total == 150_000
            time.sleep(1.0)  # the engine feeds its first window and runs
            peak = rss_kib(process.proc.pid, "VmHWM")
            progress = batch_client.final_progress(stub, job.job_id)
            assert progress.sequences_total == 150_000 and progress.state == coordinator_pb2.JOB_STATE_RUNNING
            stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id))
        assert count(tmp_path, "prompts") == 150_000
        # the file is 10 MiB and as Python objects would be several times that: the upload adds far less
        assert (peak - before) < 48 * 1024, f"coordinator RSS grew from {before} KiB to a peak of {peak} KiB"
    finally:
        process.kill()


class SlowDisplay:
    """Paces the upload (a pause after every chunk) so the coordinator can be killed in the middle."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, count: int) -> None:
        self.n += count
        time.sleep(0.15)

    def write(self, text: str) -> None:
        pass


@pytest.mark.slow
def test_sigkill_mid_upload_and_mid_job_loses_nothing_accepted(tmp_path, mesh, monkeypatch):
    _, addresses = mesh
    monkeypatch.setattr(batch_client, "CHUNK_PROMPTS", 40)
    total = 240
    source = tmp_path / "in.jsonl"
    source.write_text("".join(completion_line(f"id-{i}", [5 + i % 100, 6, 7], max_tokens=3) + "\n"
                              for i in range(total)))
    port = free_port()
    args = coordinator_args(tmp_path, addresses, port, max_sequences=6)
    first = CoordinatorProcess(args)
    first.wait_for("coordinator_serving")
    done: dict = {}

    def client() -> None:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            params = coordinator_pb2.GenerationParams(max_new_tokens=4)
            done["upload"] = batch_client.upload(stub, source, params, "nightly", SlowDisplay(), reconnect_s=90)

    thread = threading.Thread(target=client)
    thread.start()
    processes = [first]
    try:
        deadline = time.monotonic() + 60
        while count(tmp_path, "prompts") < 80 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.kill()  # mid-upload: some chunks stored, the client is between appends
        stored = count(tmp_path, "prompts")
        assert 80 <= stored < total
        second = CoordinatorProcess(args)
        processes.append(second)
        second.wait_for("coordinator_serving")
        thread.join(120)
        assert done["upload"].total == total and count(tmp_path, "prompts") == total

        deadline = time.monotonic() + 60
        while count(tmp_path, "results") < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        second.kill()  # mid-job: results stored, sequences in flight
        finished = count(tmp_path, "results")
        assert 20 <= finished < total
        third = CoordinatorProcess(args)
        processes.append(third)
        third.wait_for("coordinator_serving")
        out = tmp_path / "out.jsonl"
        with channel(f"127.0.0.1:{port}") as ch, out.open("w") as sink:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            written = batch_client.follow(stub, done["upload"].job_id, sink, True)
            final = batch_client.final_progress(stub, done["upload"].job_id)
        assert final.state == coordinator_pb2.JOB_STATE_SUCCEEDED and written == total
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["custom_id"] for r in rows) == sorted(f"id-{i}" for i in range(total))
        assert all(r["response"]["body"]["usage"]["completion_tokens"] == 3 for r in rows)
        succeeded = third.wait_for("job_succeeded")
        assert succeeded["tokens"] == 3 * total and succeeded["tokens_per_s"] > 0
    finally:
        for process in processes:
            if process.proc.poll() is None:
                process.kill()
        thread.join(5)
