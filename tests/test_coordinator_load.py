"""200 client threads against one real coordinator and stage: SubmitJob, WatchJob, GetResults.

Past --max-pending-jobs a submit answers RESOURCE_EXHAUSTED, past --max-watchers a watch does, both
with a message naming the flag; clients back off and retry. Nothing ends UNKNOWN or INTERNAL, the
queued + running jobs never exceed the limit, every accepted job finishes with its results, and the
whole run ends in bounded time."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import grpc
from test_coordinator_e2e import plan_for
from tiny_models import build_checkpoint

from coordinator.config import CoordinatorConfig
from coordinator.main import serve
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel
from stage_server.config import StageConfig
from stage_server.main import serve as serve_stage

CLIENTS = 200
MAX_PENDING, MAX_WATCHERS = 12, 8
BUDGET_S = 150.0


def test_200_clients_get_answers_or_resource_exhausted_within_bounds(tmp_path):
    build_checkpoint("llama", tmp_path / "models" / "tiny-llama")
    stage, stage_port, servicer = serve_stage(
        StageConfig("127.0.0.1:0", "cpu", 1 << 30, tmp_path / "models", 4, "warning")
    )
    config = CoordinatorConfig("127.0.0.1:0", tmp_path / "state", plan_for([f"127.0.0.1:{stage_port}"], 4, 4, [(0, 4)]),
                               "tiny-llama", 8, 24, log_level="warning", max_pending_jobs=MAX_PENDING,
                               max_watchers=MAX_WATCHERS, max_concurrent_rpcs=CLIENTS + 50)
    coordinator = serve(config)
    channels = [channel(f"127.0.0.1:{coordinator.port}") for _ in range(8)]
    codes: Counter = Counter()
    messages: dict[str, str] = {}
    done, peak = [], [0]
    lock = threading.Lock()
    stop_monitor = threading.Event()

    def note(name: str, err: grpc.RpcError) -> None:
        with lock:
            codes[(name, err.code().name)] += 1
            messages.setdefault(f"{name} {err.code().name}", err.details())

    def retrying(name: str, call, deadline: float):
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                note(name, err)
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.05, 0.3))

    def client(i: int) -> None:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channels[i % len(channels)])
        deadline = started + BUDGET_S - 10
        prompt = [3 + i % 200, 7, 11 + i % 13]
        request = coordinator_pb2.SubmitJobRequest(
            idempotency_key=f"load-{i}",
            prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=prompt))],
            params=coordinator_pb2.GenerationParams(max_new_tokens=3),
        )
        job = retrying("SubmitJob", lambda: stub.SubmitJob(request, timeout=30), deadline).job_id
        final = retrying(
            "WatchJob",
            lambda: list(stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=60))[-1],
            deadline,
        )
        results = retrying(
            "GetResults", lambda: stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job), timeout=30), deadline
        ).results
        with lock:
            done.append((final.state, [len(r.token_ids) for r in results]))

    def monitor() -> None:
        while not stop_monitor.wait(0.05):
            peak[0] = max(peak[0], coordinator.store.count_unfinished())

    started = time.monotonic()
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    failures = []

    def guarded(thread_target, i):
        try:
            thread_target(i)
        except Exception as err:  # noqa: BLE001 - collected and reported below
            failures.append((i, repr(err)))

    threads = [threading.Thread(target=guarded, args=(client, i), daemon=True) for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, started + BUDGET_S - time.monotonic()))
        elapsed = time.monotonic() - started
        stop_monitor.set()
        assert not any(t.is_alive() for t in threads), f"clients still running after {BUDGET_S} s"
        assert failures == [], failures[:5]
        assert not [k for k in codes if k[1] in ("INTERNAL", "UNKNOWN")], codes
        assert set(code for _, code in codes) <= {"RESOURCE_EXHAUSTED"}, codes
        assert len(done) == CLIENTS
        assert all(state == coordinator_pb2.JOB_STATE_SUCCEEDED and lengths == [3] for state, lengths in done)
        assert peak[0] <= MAX_PENDING, peak
        # the limits were really reached, and said which flag to change
        assert (
            codes[("SubmitJob", "RESOURCE_EXHAUSTED")] > 0
            and "--max-pending-jobs" in messages["SubmitJob RESOURCE_EXHAUSTED"]
        )
        assert (
            codes[("WatchJob", "RESOURCE_EXHAUSTED")] > 0
            and "--max-watchers" in messages["WatchJob RESOURCE_EXHAUSTED"]
        )
        print(f"\n{CLIENTS} clients in {elapsed:.1f} s; peak unfinished jobs {peak[0]}; refusals {dict(codes)}")
    finally:
        stop_monitor.set()
        for chan in channels:
            chan.close()
        coordinator.stop(grace=None)
        stage.stop(None)
        servicer.worker.stop()
