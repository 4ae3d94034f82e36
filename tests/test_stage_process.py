"""`pqmesh-stage` as a real process: serves health and reflection, logs JSON, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pqmesh.stage_client import StageClient

STAGE = str(Path(sys.executable).parent / "pqmesh-stage")


def test_stage_process_serves_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [STAGE, "--listen", "127.0.0.1:0", "--model-root", str(tmp_path), "--memory-budget", "1GiB"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in proc.stderr:
            event = json.loads(line)  # stderr is not a terminal: every log line is JSON
            if event["event"] == "stage_serving":
                port = event["port"]
                assert event["budget"] == 1 << 30
                break
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pqmesh.stage.v1.StageService")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(
                reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            )
            names = {s.name for s in reply.list_services_response.service}
            assert "pqmesh.stage.v1.StageService" in names
        client = StageClient(address)
        info = client.info()
        assert (info.device, info.memory_budget_bytes, info.plan_id) == ("cpu", 1 << 30, "")
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
