"""A lost device rejoins by `ReplanMesh`, with real `pqmesh-stage` processes, a real planner and a real
SIGKILL: a job runs on three devices, one is killed and the coordinator re-plans onto the other two;
the device's stage server comes back on its port, `pqmesh mesh replan` (dry run), then ReplanMesh
switches the mesh back to three devices at a safe point while a second job runs. Both jobs finish
with outputs identical to the undisturbed run, every result stored exactly once. Requests a user can
get wrong are refused with a precise status. With --rejoin-interval the coordinator does the same by
itself once the device answers, when three devices are predicted faster than two (slow device profiles).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import pytest
from google.protobuf import json_format
from test_coordinator_e2e import Client, mixed_prompts
from test_coordinator_replan import DEVICES, coordinator_config, first_plan, plan_request, register
from test_stage_failure import MAX_NEW, StageProcess, kill_mid_job, stored_counts, undisturbed_run
from tiny_models import build_checkpoint

from cli.main import main as pqmesh
from coordinator.batch_client import final_progress
from coordinator.main import serve
from planner.main import PlannerConfig
from planner.main import start as start_planner
from pqmesh.api.coordinator.v1 import coordinator_pb2

THREE = DEVICES[:3]


@pytest.fixture(scope="module")
def three_devices(tmp_path_factory):
    """A tiny Llama, a planner and three stage processes, one per device of THREE (shared by the tests here;
    each leaves all three running)."""
    work = tmp_path_factory.mktemp("rejoin")
    root = work / "models"
    model = build_checkpoint("llama", root / "tiny-llama", layers=6)
    planner, planner_port, _ = start_planner(PlannerConfig("127.0.0.1:0", work / "planner", "warning"))
    stages = {name: StageProcess(root) for name in THREE}
    addresses = {name: stage.address() for name, stage in stages.items()}
    yield root, model, f"127.0.0.1:{planner_port}", stages, addresses
    for stage in stages.values():
        stage.stop()
    planner.stop(None)


def replan_mesh(client: Client, **fields) -> coordinator_pb2.ReplanMeshResponse:
    add = fields.pop("add", None)
    request = coordinator_pb2.ReplanMeshRequest(**fields)
    if add is not None:
        request.add.CopyFrom(coordinator_pb2.MeshDevice(**add))
    return client.stub.ReplanMesh(request, timeout=120)


def refused(client: Client, **fields) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        replan_mesh(client, **fields)
    return info.value.code(), info.value.details()


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_lost_device_rejoins_by_replan_mesh_and_the_job_finishes_identical(tmp_path, three_devices, capsys):
    root, model, planner_address, stages, addresses = three_devices
    register(planner_address, 1 << 30)
    plan = first_plan(planner_address, plan_request(root / "tiny-llama", THREE), addresses)
    assert len(plan.stages) == 3
    request_file = tmp_path / "three.json"
    request_file.write_text(json_format.MessageToJson(plan_request(root / "tiny-llama", THREE)))
    config = replace(coordinator_config(tmp_path, planner_address, plan, addresses, root), replan_request=request_file,
                     device_addresses=tuple((n, addresses[n]) for n in THREE))
    coordinator = serve(config)
    engine = coordinator.engine
    client = Client(coordinator.port)
    prompts = mixed_prompts(32, seed=5)
    try:
        reference = undisturbed_run(client, model, prompts)
        assert refused(client, rejoin=[])[0] == grpc.StatusCode.FAILED_PRECONDITION  # nothing is lost yet
        job = client.submit(prompts, MAX_NEW, key="rejoin")
        lost = plan.stages[1].device
        kill_mid_job(client, job, stages[lost], after_tokens=2 * MAX_NEW)
        wait_until(lambda: len(engine.recoveries) == 1, "the coordinator did not re-plan around the lost stage")
        assert lost not in {s.device for s in engine.mesh.spec.plan.stages}

        code, details = refused(client, rejoin=[lost])  # its stage server is still down
        assert code == grpc.StatusCode.UNAVAILABLE and addresses[lost] in details, details
        code, details = refused(client, rejoin=["cpu-z"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not devices of --replan-request" in details, details
        code, details = refused(client, rejoin=[THREE[0]])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not lost" in details, details
        code, details = refused(client, add={"name": lost, "address": addresses[lost], "device_type": "cpu-test"})
        assert code == grpc.StatusCode.ALREADY_EXISTS and f"rejoin {lost}" in details, details

        stages[lost] = StageProcess(root, int(addresses[lost].rpartition(":")[2]))  # back on its port
        stages[lost].address()
        before = engine.mesh.plan_id
        assert pqmesh(["mesh", "replan", "--coordinator", f"127.0.0.1:{coordinator.port}", "--rejoin", lost,
                       "--dry-run"]) == 0
        printed = [line for line in capsys.readouterr().out.splitlines()
                   if line.startswith(("current plan", "new plan", "not switched"))]  # not the log lines
        assert len(printed) == 3 and lost in printed[1] and printed[2].startswith("not switched: dry run"), printed
        assert engine.mesh.plan_id == before  # a dry run changes nothing

        assert client.wait(job, timeout=120).state == coordinator_pb2.JOB_STATE_SUCCEEDED
        second = client.submit(prompts, MAX_NEW, key="rejoin-2")  # running while the mesh switches
        wait_until(lambda: final_progress(client.stub, second).tokens_generated >= MAX_NEW, "the second job stalled")
        reply = replan_mesh(client, rejoin=[lost], force=True)
        assert reply.switched and list(reply.rejoined) == [lost], reply
        assert lost in reply.new_devices and lost not in reply.old_devices
        assert reply.new_predicted_tokens_per_s > 0 and reply.old_predicted_tokens_per_s > 0
        assert lost in {s.device for s in engine.mesh.spec.plan.stages}
        assert engine.replanning.replanner.lost == set()

        for key in (job, second):
            final = client.wait(key, timeout=120)
            assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, len(prompts)), final
            assert [list(r.token_ids) for r in client.results(key)] == reference  # identical to the undisturbed run
            assert stored_counts(tmp_path / "state", key) == [(i, 1) for i in range(len(prompts))]
        saved = json.loads((tmp_path / "state" / "replanned_plan.json").read_text())
        assert saved["lost"] == [] and lost in {s["device"] for s in saved["plan"]["stages"]}
        switch = engine.recoveries[-1]
        assert switch.reason.startswith(f"re-planning onto ['{lost}']") and switch.replans == 1
        print(json.dumps({"resumed_at_switch": switch.resumed, "old": list(reply.old_devices),
                          "new": list(reply.new_devices), "old_tps": reply.old_predicted_tokens_per_s,
                          "new_tps": reply.new_predicted_tokens_per_s}))
    finally:
        client.close()
        coordinator.stop(grace=None)


def register_slow(planner_address: str) -> None:
    """Profiles slow enough that compute, not the hop, dominates: three stages are predicted faster than two
    (with 8 KV slots: 88.8 vs 76.5 tokens/s for the tiny Llama when this test was written)."""
    from planner.devices import DeviceProfile, Roofline
    from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
    from pqmesh.grpc_server import channel

    with channel(planner_address) as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        for name in THREE:
            profile = DeviceProfile(name, "cpu-test", 1 << 30, Roofline(0.001, 0.02), reserve_bytes=0)
            stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=profile.to_proto()), timeout=30)


def test_with_rejoin_interval_a_returning_device_rejoins_by_itself(tmp_path, three_devices):
    root, model, planner_address, stages, addresses = three_devices
    register_slow(planner_address)
    plan = first_plan(planner_address, plan_request(root / "tiny-llama", THREE), addresses)
    assert len(plan.stages) == 3
    request_file = tmp_path / "three.json"
    request_file.write_text(json_format.MessageToJson(plan_request(root / "tiny-llama", THREE)))
    config = replace(coordinator_config(tmp_path, planner_address, plan, addresses, root), replan_request=request_file,
                     device_addresses=tuple((n, addresses[n]) for n in THREE), max_sequences=8, rejoin_interval=0.5)
    coordinator = serve(config)
    engine = coordinator.engine
    client = Client(coordinator.port)
    prompts = mixed_prompts(32, seed=9)
    try:
        reference = undisturbed_run(client, model, prompts)
        job = client.submit(prompts, MAX_NEW, key="auto")
        lost = plan.stages[1].device
        kill_mid_job(client, job, stages[lost], after_tokens=2 * MAX_NEW)
        wait_until(lambda: len(engine.recoveries) == 1, "the coordinator did not re-plan around the lost stage")
        assert lost not in {s.device for s in engine.mesh.spec.plan.stages}
        stages[lost] = StageProcess(root, int(addresses[lost].rpartition(":")[2]))  # back on its port
        stages[lost].address()
        wait_until(lambda: lost in {s.device for s in engine.mesh.spec.plan.stages}, "the device did not rejoin")
        final = client.wait(job, timeout=120)
        assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, len(prompts)), final
        assert [list(r.token_ids) for r in client.results(job)] == reference
        assert stored_counts(tmp_path / "state", job) == [(i, 1) for i in range(len(prompts))]
        assert engine.replanning.replanner.lost == set()
        wait_until(lambda: len(engine.recoveries) == 2, "the switch did not end")
        assert engine.recoveries[-1].reason.startswith(f"re-planning onto ['{lost}']")
    finally:
        client.close()
        coordinator.stop(grace=None)


def test_replan_for_a_jobs_own_lengths(tmp_path, three_devices, capsys):
    """ReplanMesh(for_job=...): the job's pending requests become the plan's workload; a dry run predicts
    both plans on it; an unknown job is NOT_FOUND, a finished one FAILED_PRECONDITION."""
    root, model, planner_address, stages, addresses = three_devices
    register(planner_address, 1 << 30)
    plan = first_plan(planner_address, plan_request(root / "tiny-llama", THREE), addresses)
    request_file = tmp_path / "three.json"
    request_file.write_text(json_format.MessageToJson(plan_request(root / "tiny-llama", THREE)))
    config = replace(coordinator_config(tmp_path, planner_address, plan, addresses, root), replan_request=request_file,
                     device_addresses=tuple((n, addresses[n]) for n in THREE))
    coordinator = serve(config)
    client = Client(coordinator.port)
    try:
        job = client.submit(mixed_prompts(96, seed=3), MAX_NEW, key="for-job")
        reply = replan_mesh(client, for_job=job, dry_run=True)
        assert not reply.switched and reply.message.startswith("dry run"), reply
        assert reply.new_predicted_tokens_per_s > 0 and reply.old_predicted_tokens_per_s > 0
        assert pqmesh(["mesh", "replan", "--coordinator", f"127.0.0.1:{coordinator.port}", "--for-job", job,
                       "--dry-run"]) == 0
        assert "not switched: dry run" in capsys.readouterr().out
        assert refused(client, for_job="job-nope")[0] == grpc.StatusCode.NOT_FOUND
        assert client.wait(job, timeout=120).state == coordinator_pb2.JOB_STATE_SUCCEEDED
        code, details = refused(client, for_job=job)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no pending request" in details, details
    finally:
        client.close()
        coordinator.stop(grace=None)


def test_add_flag_and_request_checks_say_what_to_change():
    from coordinator.rejoin import MeshChange, joining, parse_added
    from coordinator.replan import AddedDevice, Replanner
    from pqmesh.api.planner.v1 import planner_pb2
    from pqmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument

    assert parse_added("gpu-7=10.0.0.7:50060:A100-80G") == AddedDevice("gpu-7", "10.0.0.7:50060", "A100-80G")
    for bad in ("gpu-7=10.0.0.7:50060", "10.0.0.7:50060:A100", "gpu-7=host:port:A100"):
        with pytest.raises(InvalidArgument, match="NAME=HOST:PORT"):
            parse_added(bad)
    request = planner_pb2.PlanRequest(devices=[planner_pb2.ClusterDevice(device_type="t", count=1, name=n)
                                               for n in ("a", "b", "c")])
    replanner = Replanner("127.0.0.1:1", request, {n: f"127.0.0.1:{i + 1}" for i, n in enumerate("abc")}, lost={"b"})
    assert joining(MeshChange(), replanner) == ("b",)  # every lost device
    assert joining(MeshChange(add=AddedDevice("d", "h:1", "t")), replanner) == ()  # only the added one
    with pytest.raises(AlreadyExists, match="rejoin b instead"):
        joining(MeshChange(add=AddedDevice("b", "h:1", "t")), replanner)
    with pytest.raises(InvalidArgument, match="device_type"):
        joining(MeshChange(add=AddedDevice("d", "h:1", "")), replanner)
    with pytest.raises(InvalidArgument, match="NAME=HOST:PORT"):
        joining(MeshChange(add=AddedDevice("d", "nowhere", "t")), replanner)
    replanner.lost.clear()
    with pytest.raises(FailedPrecondition, match="nothing to rejoin"):
        joining(MeshChange(), replanner)


def test_rejoin_watch_replans_once_per_returning_set_and_retries_refusals():
    from types import SimpleNamespace

    from coordinator.rejoin_watch import RejoinWatch
    from pqmesh.errors import Unavailable

    lost, up, calls, answers = {"b", "c"}, set(), [], []

    def replan(names):
        calls.append(names)
        result = answers.pop(0)
        if isinstance(result, Exception):
            raise result
        return SimpleNamespace(switched=result, message="")  # the fields of coordinator.rejoin.Outcome it reads

    watch = RejoinWatch(lambda: set(lost), lambda name: name in up, replan, interval=1.0)
    assert watch.check() is None and calls == []  # nobody is back
    up.add("b")
    answers += [Unavailable("the mesh is recovering"), False]
    assert watch.check() is None  # refused: tried again next round
    assert not watch.check().switched  # not faster: not asked again while b stays back
    assert watch.check() is None and calls == [("b",), ("b",)]
    up.add("c")
    answers.append(True)  # c is back too: a new set, planned again, and switched
    assert watch.check().switched and calls[-1] == ("b", "c")
    lost.clear()
    assert watch.check() is None and len(calls) == 3  # nothing lost any more
