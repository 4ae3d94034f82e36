"""Prometheus metrics on real servers: each process exports its own registry on a free port, real
requests move the counters, and failed calls are counted under their method and status code."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
import tiny_models
import torch
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from test_coordinator_e2e import Client, plan_for
from test_planner_service import PLAN_REQUEST
from tiny_models import build_checkpoint

from coordinator.config import CoordinatorConfig
from coordinator.main import serve as serve_coordinator
from planner.main import PlannerConfig
from planner.main import start as start_planner
from planner.metrics import PlannerMetrics
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.grpc_server import channel
from pqmesh.stage_client import StageClient
from stage_server.config import StageConfig
from stage_server.main import serve as serve_stage

PREFILL = tensor_pb2.PHASE_PREFILL


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_checkpoint("llama", root / "tiny-llama")
    return root


def start_stage(model_root: Path, metrics: str = "127.0.0.1:0"):
    config = StageConfig("127.0.0.1:0", tiny_models.DEVICE, 1 << 30, model_root, 4, "warning", metrics_listen=metrics)
    return serve_stage(config)


def stop_stage(server, servicer) -> None:
    server.stop(None)
    servicer.worker.stop()
    servicer.metrics.close()


def test_stage_forward_and_errors_move_the_counters(model_root):
    server, port, servicer = start_stage(model_root)
    client = StageClient(f"127.0.0.1:{port}")
    try:
        before = scrape(servicer.metrics.port)
        assert value(before, "pqmesh_stage_kv_slots_capacity") == 0
        assert value(before, "pqmesh_stage_compute_seconds_count", phase="prefill") == 0

        bad = stage_pb2.LoadShardRequest(model_id="tiny-llama")  # no plan_id
        assert status_of(lambda: client.load_shard(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        client.load_shard(stage_pb2.LoadShardRequest(
            plan_id="p", model_id="tiny-llama", layers=tensor_pb2.LayerRange(start=0, end=4), bits=[16] * 4,
            role=stage_pb2.ROLE_ONLY, max_sequences=3, max_tokens_per_sequence=16))
        stream = client.forward()
        stream.send_batch("p", 0, PREFILL, [0, 1], [5, 5], torch.randint(4, 200, (2, 5)))
        reply = next(iter(stream.responses))
        assert len(reply.token_ids) == 2
        # scraped before closing the stream: the close puts an end-of-stream marker through the
        # compute queue at a moment of the reader thread's choosing
        after = scrape(servicer.metrics.port)
        stream.close()
        assert value(after, "pqmesh_stage_compute_seconds_count", phase="prefill") == 1
        assert value(after, "pqmesh_stage_compute_seconds_sum", phase="prefill") == pytest.approx(
            reply.compute_ns / 1e9
        )
        assert value(after, "pqmesh_stage_queue_wait_seconds_count", phase="prefill") == 1
        assert value(after, "pqmesh_stage_tokens_processed_total", phase="prefill") == 10
        assert value(after, "pqmesh_stage_tokens_sampled_total") == 2
        assert value(after, "pqmesh_stage_kv_slots_capacity") == 3
        assert value(after, "pqmesh_stage_kv_slots_used") == 2
        assert value(after, "pqmesh_stage_queue_depth") == 0 and value(after, "pqmesh_stage_queue_capacity") == 4
        assert value(after, "pqmesh_rpc_errors_total", method="StageService/LoadShard", code="INVALID_ARGUMENT") == 1

        # a streaming call that fails: a micro-batch for a plan this stage does not hold
        stream = client.forward()
        stream.send_batch("other-plan", 1, PREFILL, [2], [3], torch.randint(4, 200, (1, 3)))
        assert status_of(lambda: next(iter(stream.responses))) == grpc.StatusCode.FAILED_PRECONDITION
        stream.close()
        errors = value(scrape(servicer.metrics.port), "pqmesh_rpc_errors_total", method="StageService/Forward",
                       code="FAILED_PRECONDITION")
        assert errors == 1
    finally:
        client.close()
        stop_stage(server, servicer)


def test_metrics_are_off_by_default_and_servers_do_not_share_a_registry(model_root):
    quiet = start_stage(model_root, metrics="")
    loud = start_stage(model_root)
    try:
        assert quiet[2].metrics.port is None
        # a second exporter in the same process has its own registry: no duplicate-metric clash
        assert value(scrape(loud[2].metrics.port), "pqmesh_stage_kv_slots_capacity") == 0
    finally:
        stop_stage(quiet[0], quiet[2])
        stop_stage(loud[0], loud[2])


def test_planner_plan_requests_and_solve_time(tmp_path):
    metrics = PlannerMetrics()
    server, port, _ = start_planner(PlannerConfig("127.0.0.1:0", tmp_path / "state", metrics_listen="127.0.0.1:0"),
                                    metrics)
    chan = channel(f"127.0.0.1:{port}")
    stub = planner_pb2_grpc.PlannerServiceStub(chan)
    try:
        request = json_format.ParseDict(PLAN_REQUEST, planner_pb2.PlanRequest())
        reply = stub.Plan(request)
        too_long = json_format.ParseDict(PLAN_REQUEST | {"time_limit_seconds": 1000}, planner_pb2.PlanRequest())
        assert status_of(lambda: stub.Plan(too_long)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: stub.GetDevice(planner_pb2.GetDeviceRequest(name="nope"))) == grpc.StatusCode.NOT_FOUND

        samples = scrape(metrics.port)
        assert value(samples, "pqmesh_planner_plan_requests_total", outcome="ok") == 1
        assert value(samples, "pqmesh_planner_plan_requests_total", outcome="error") == 1
        assert value(samples, "pqmesh_planner_solve_seconds_count") == 1
        assert value(samples, "pqmesh_planner_solve_seconds_sum") == pytest.approx(reply.solve_seconds)
        assert value(samples, "pqmesh_planner_registered_devices") == 0
        assert value(samples, "pqmesh_rpc_errors_total", method="PlannerService/Plan", code="INVALID_ARGUMENT") == 1
        assert value(samples, "pqmesh_rpc_errors_total", method="PlannerService/GetDevice", code="NOT_FOUND") == 1
    finally:
        chan.close()
        server.stop(None)
        metrics.close()


def test_coordinator_tokens_queues_and_jobs_by_state(model_root, tmp_path):
    stage_server, stage_port, stage = start_stage(model_root, metrics="")
    config = CoordinatorConfig("127.0.0.1:0", tmp_path / "state", plan_for([f"127.0.0.1:{stage_port}"], 2, 2, [(0, 4)]),
                               "tiny-llama", max_sequences=2, max_tokens_per_sequence=32, log_level="warning",
                               metrics_listen="127.0.0.1:0")
    running = serve_coordinator(config)
    client = Client(running.port)
    try:
        samples = scrape(running.metrics.port)
        assert value(samples, "pqmesh_coordinator_in_flight_capacity") == 1
        assert value(samples, "pqmesh_coordinator_jobs", state="queued") == 0
        job = client.submit([[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_new_tokens=4)
        assert client.wait(job).sequences_done == 3
        assert status_of(lambda: client.results("job-missing")) == grpc.StatusCode.NOT_FOUND

        samples = scrape(running.metrics.port)
        assert value(samples, "pqmesh_tokens_generated_total") == 3 * 4
        assert value(samples, "pqmesh_coordinator_jobs", state="succeeded") == 1
        assert value(samples, "pqmesh_coordinator_jobs", state="running") == 0
        assert value(samples, "pqmesh_coordinator_micro_batches_total", phase="prefill") >= 2  # 3 prompts, 2 slots
        assert value(samples, "pqmesh_coordinator_waiting_sequences") == 0
        assert value(samples, "pqmesh_coordinator_in_flight_micro_batches") == 0
        assert value(samples, "pqmesh_rpc_errors_total", method="CoordinatorService/GetResults", code="NOT_FOUND") == 1
        # the stage recorded the same work (not exported: read from its registry)
        assert stage.metrics.registry.get_sample_value("pqmesh_stage_compute_seconds_count", {"phase": "prefill"}) >= 2
    finally:
        client.close()
        running.stop(grace=None)
        stop_stage(stage_server, stage)
