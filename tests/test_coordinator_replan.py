"""Re-planning onto the devices that remain, with real `pqmesh-stage` processes, a real planner and a
real SIGKILL of a stage that never comes back.

Four CPU "devices" are registered with the planner; the job starts on a plan over three of them (the
fourth is a spare). The middle stage is SIGKILLed in the middle of a greedy job. Past --replan-after
the coordinator asks the planner for a plan without it, loads the new shards (the spare included),
re-prefills every unfinished sequence from prompt + generated tokens and finishes: outputs identical
to the undisturbed run, every result exactly once. A coordinator restarted afterwards runs the plan it
had switched to. When nothing fits any more, the jobs fail with the planner's own reason.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from test_coordinator_e2e import Client, mixed_prompts
from test_stage_failure import MAX_NEW, StageProcess, kill_mid_job, stored_counts, undisturbed_run
from tiny_models import build_checkpoint

from coordinator.config import CoordinatorConfig
from coordinator.main import serve
from planner.devices import DeviceProfile, Roofline
from planner.main import PlannerConfig
from planner.main import start as start_planner
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan

DEVICES = ("cpu-a", "cpu-b", "cpu-c", "cpu-spare")


def register(planner_address: str, memory_bytes: int) -> None:
    with channel(planner_address) as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        for name in DEVICES:
            profile = DeviceProfile(name, "cpu-test", memory_bytes, Roofline(1.0, 20.0), reserve_bytes=0)
            stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=profile.to_proto()), timeout=30)


def plan_request(model_dir: Path, devices) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        model_config_json=(model_dir / "config.json").read_text(), dtype="float32", allowed_bits=[16],
        devices=[planner_pb2.ClusterDevice(device_type="cpu-test", count=1, name=n, host=n) for n in devices],
        workload=planner_pb2.Workload(batch_size=16, prompt_length=20, generation_length=MAX_NEW))


def first_plan(planner_address: str, request, addresses: dict[str, str]) -> PipelinePlan:
    with channel(planner_address) as ch:
        reply = planner_pb2_grpc.PlannerServiceStub(ch).Plan(request, timeout=60)
    plan = PipelinePlan.from_proto(reply.plan)
    return plan.with_addresses([addresses[s.device] for s in plan.stages])


@pytest.fixture
def mesh(tmp_path):
    root = tmp_path / "models"
    model = build_checkpoint("llama", root / "tiny-llama", layers=6)
    planner, planner_port, _ = start_planner(PlannerConfig("127.0.0.1:0", tmp_path / "planner", "warning"))
    stages = {name: StageProcess(root) for name in DEVICES}
    addresses = {name: stage.address() for name, stage in stages.items()}
    yield root, model, f"127.0.0.1:{planner_port}", stages, addresses
    for stage in stages.values():
        stage.stop()
    planner.stop(None)


def coordinator_config(tmp_path, planner_address, plan, addresses, root) -> CoordinatorConfig:
    request_file = tmp_path / "replan-request.json"
    request_file.write_text(json_format.MessageToJson(plan_request(root / "tiny-llama", DEVICES)))
    return CoordinatorConfig(
        "127.0.0.1:0", tmp_path / "state", plan, "tiny-llama", 4, 48, log_level="warning", dtype="float32",
        stage_recovery_timeout=60.0, health_interval=0.5, planner=planner_address, replan_request=request_file,
        device_addresses=tuple(addresses.items()), replan_after=1.0)


def test_a_lost_stage_is_planned_around_and_the_job_finishes_identical(tmp_path, mesh):
    root, model, planner_address, stages, addresses = mesh
    register(planner_address, 1 << 30)
    plan = first_plan(planner_address, plan_request(root / "tiny-llama", DEVICES[:3]), addresses)
    assert len(plan.stages) == 3 and "cpu-spare" not in {s.device for s in plan.stages}
    config = coordinator_config(tmp_path, planner_address, plan, addresses, root)
    coordinator = serve(config)
    client = Client(coordinator.port)
    prompts = mixed_prompts(16, seed=21)
    try:
        reference = undisturbed_run(client, model, prompts)
        job = client.submit(prompts, MAX_NEW, key="nightly")
        lost = plan.stages[1].device
        at_kill = kill_mid_job(client, job, stages[lost], after_tokens=4 * MAX_NEW + 4 * MAX_NEW // 2)
        assert at_kill.sequences_done < len(prompts), "the job must be cut off in the middle"
        final = client.wait(job, timeout=120)
        assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, len(prompts)), final
        assert [list(r.token_ids) for r in client.results(job)] == reference  # identical to the undisturbed run
        assert stored_counts(tmp_path / "state", job) == [(i, 1) for i in range(len(prompts))]
        replanned = coordinator.engine.mesh.spec.plan
        assert lost not in {s.device for s in replanned.stages} and replanned.num_layers == 6
        (outage,) = coordinator.engine.recoveries
        assert outage.replans == 1 and outage.resumed > 0
    finally:
        client.close()
        coordinator.stop(grace=None)
    again = serve(config)  # restarted: runs the plan it had switched to, not the one it was given
    try:
        assert again.engine.mesh.spec.plan.plan_id == replanned.plan_id
        client = Client(again.port)
        assert [list(r.token_ids) for r in client.run(prompts[:4], MAX_NEW)] == reference[:4]
        client.close()
    finally:
        again.stop(grace=None)


def feasible(planner_address: str, request) -> bool:
    with channel(planner_address) as ch:
        try:
            planner_pb2_grpc.PlannerServiceStub(ch).Plan(request, timeout=60)
            return True
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            return False


def test_when_nothing_fits_the_job_fails_with_the_planners_reason(tmp_path, mesh):
    root, model, planner_address, stages, addresses = mesh
    register(planner_address, 1 << 30)
    whole = first_plan(planner_address, plan_request(root / "tiny-llama", DEVICES[:1]), addresses)
    with channel(planner_address) as ch:
        need = planner_pb2_grpc.PlannerServiceStub(ch).Plan(plan_request(root / "tiny-llama", DEVICES[:1]),
                                                            timeout=60).predicted.memory_bytes[0]
    assert whole.num_layers == 6
    for share in (0.40, 0.45, 0.5, 0.55, 0.6):  # memory per device such that three fit and two do not
        register(planner_address, int(share * need))
        if feasible(planner_address, plan_request(root / "tiny-llama", DEVICES[:3])) and not feasible(
                planner_address, plan_request(root / "tiny-llama", DEVICES[:2])):
            break
    else:
        pytest.fail(f"no memory size makes three devices fit and two not (one device needs {need} bytes)")
    request = plan_request(root / "tiny-llama", DEVICES[:3])
    plan = first_plan(planner_address, request, addresses)
    request_only_three = tmp_path / "three.json"
    request_only_three.write_text(json_format.MessageToJson(request))
    config = replace(coordinator_config(tmp_path, planner_address, plan, addresses, root),
                     replan_request=request_only_three, device_addresses=tuple((n, addresses[n]) for n in DEVICES[:3]))
    coordinator = serve(config)
    client = Client(coordinator.port)
    try:
        job = client.submit(mixed_prompts(8, seed=3), MAX_NEW, key="doomed")
        kill_mid_job(client, job, stages[plan.stages[1].device], after_tokens=8)
        final = client.wait(job, timeout=120)
        assert final.state == coordinator_pb2.JOB_STATE_FAILED
        assert "re-planning found no plan" in final.message and "RESOURCE_EXHAUSTED" in final.message, final.message
        print(json.dumps({"message": final.message}))
    finally:
        client.close()
        coordinator.stop(grace=None)
