"""Chaos: one greedy job on a 3-stage mesh with two spare devices, while stages are frozen, killed and
restarted, one is killed for good, and the coordinator itself is SIGKILLed during the re-plan.

Everything is a real process on loopback: five `pqmesh-stage` servers, a `pqmesh-planner` with five
registered CPU devices and a `pqmesh-coordinator` (restarted on the same state directory after its
SIGKILL). The faults, drawn from a seeded RNG at points of the job's progress:
1. a stage of the plan is SIGSTOPped for 2-4 s, then SIGCONTed (--step-timeout trips);
2. another is SIGKILLed and started again on its port after ~1 s (the restart path);
3. the third is SIGKILLed and never started again (past --replan-after: a re-plan onto the spares);
4. the coordinator is SIGKILLed as soon as it has its new plan, then started again.
The job must end SUCCEEDED with every output equal to Hugging Face greedy generation, every result
stored exactly once.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from test_coordinator_e2e import mixed_prompts
from test_stage_failure import MAX_NEW, StageProcess, stored_counts
from tiny_models import build_checkpoint, reference_greedy

from coordinator.batch_client import final_progress
from localmesh.processes import Child
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan

BIN = Path(sys.executable).parent
DEVICES = ("cpu-a", "cpu-b", "cpu-c", "spare-d", "spare-e")
PROMPTS = 20


def request_for(model_dir: Path, devices) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        model_config_json=(model_dir / "config.json").read_text(), dtype="float32", allowed_bits=[16],
        devices=[planner_pb2.ClusterDevice(device_type="cpu-test", count=1, name=n, host=n) for n in devices],
        workload=planner_pb2.Workload(batch_size=PROMPTS, prompt_length=20, generation_length=MAX_NEW))


def start_planner(work: Path) -> tuple[Child, planner_pb2_grpc.PlannerServiceStub]:
    planner = Child("planner", [str(BIN / "pqmesh-planner"), "--listen", "127.0.0.1:0", "--state-dir",
                                str(work / "planner")], work / "planner.log")
    planner.wait_ready()
    stub = planner_pb2_grpc.PlannerServiceStub(channel(planner.address))
    for name in DEVICES:
        profile = {"name": name, "device_type": "cpu-test", "memory_bytes": str(1 << 30), "reserve_bytes": "0",
                   "roofline": {"peak_fp16_tflops": 1.0, "memory_bandwidth_gbs": 20.0}, "version": 1}
        stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(
            profile=json_format.ParseDict(profile, planner_pb2.DeviceProfile())), timeout=30)
    return planner, stub


class CoordinatorProcess:
    def __init__(self, work: Path, argv: list[str], number: int) -> None:
        self.child = Child("coordinator", argv, work / f"coordinator-{number}.log", env={"OMP_NUM_THREADS": "1"})
        self.child.wait_ready("coordinator_serving", timeout=120)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel(self.child.address))

    def log_has(self, event: str) -> bool:
        return f'"{event}"' in self.child.log_path.read_text()


def coordinator_argv(work: Path, root: Path, plan_path: Path, request_path: Path, addresses: dict) -> list[str]:
    return [str(BIN / "pqmesh-coordinator"), "--listen", "127.0.0.1:0", "--state-dir", str(work / "state"),
            "--plan", str(plan_path), "--model-id", "tiny-llama", "--model-root", str(root), "--max-sequences", "4",
            "--max-tokens-per-sequence", "48", "--dtype", "float32", "--step-timeout", "3", "--health-interval",
            "0.5", "--stage-recovery-timeout", "90", "--connect-timeout", "5", "--planner", addresses["planner"],
            "--replan-request", str(request_path), "--replan-after", "4",
            *[f"--device-address={n}={addresses[n]}" for n in DEVICES]]


def wait_tokens(coordinator: CoordinatorProcess, job: str, tokens: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while final_progress(coordinator.stub, job).tokens_generated < tokens:
        assert time.monotonic() < deadline, f"the job did not reach {tokens} tokens"
        time.sleep(0.1)


@pytest.mark.slow
def test_job_survives_frozen_killed_and_lost_stages_and_a_coordinator_kill(tmp_path):
    rng = random.Random(20261202)
    root = tmp_path / "models"
    model = build_checkpoint("llama", root / "tiny-llama", layers=6)
    prompts = mixed_prompts(PROMPTS, seed=17)
    reference = reference_greedy(model, prompts, MAX_NEW)
    planner, planner_stub = start_planner(tmp_path)
    stages = {name: StageProcess(root) for name in DEVICES}
    addresses = {name: stage.address() for name, stage in stages.items()} | {"planner": planner.address}
    reply = planner_stub.Plan(request_for(root / "tiny-llama", DEVICES[:3]), timeout=60)
    plan = PipelinePlan.from_proto(reply.plan)
    plan = plan.with_addresses([addresses[s.device] for s in plan.stages])
    plan_path, request_path = tmp_path / "plan.json", tmp_path / "replan-request.json"
    plan_path.write_text(plan.to_json())
    request_path.write_text(json_format.MessageToJson(request_for(root / "tiny-llama", DEVICES)))
    argv = coordinator_argv(tmp_path, root, plan_path, request_path, addresses)
    coordinator = CoordinatorProcess(tmp_path, argv, 0)
    total = PROMPTS * MAX_NEW
    in_plan = [s.device for s in plan.stages]
    try:
        job = coordinator.stub.SubmitJob(coordinator_pb2.SubmitJobRequest(
            idempotency_key="chaos", prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=p))
                                             for p in prompts],
            params=coordinator_pb2.GenerationParams(max_new_tokens=MAX_NEW)), timeout=30).job_id
        frozen, restarted, lost = rng.sample(in_plan, 3)  # a different stage for each fault
        # 1. freeze, thaw
        wait_tokens(coordinator, job, total // 8)
        stages[frozen].proc.send_signal(signal.SIGSTOP)
        time.sleep(rng.uniform(2, 4))
        stages[frozen].proc.send_signal(signal.SIGCONT)
        # 2. kill, restart on the same port
        wait_tokens(coordinator, job, total // 4)
        port = int(addresses[restarted].rpartition(":")[2])
        stages[restarted].kill()
        time.sleep(rng.uniform(0.5, 1.5))
        stages[restarted] = StageProcess(root, port)
        stages[restarted].address()
        # 3. kill for good; 4. kill the coordinator once it has re-planned
        wait_tokens(coordinator, job, total // 2)
        stages[lost].kill()
        deadline = time.monotonic() + 60
        while not coordinator.log_has("replanned"):
            assert time.monotonic() < deadline, "the coordinator did not re-plan"
            time.sleep(0.02)
        coordinator.child.kill()
        coordinator = CoordinatorProcess(tmp_path, argv, 1)
        deadline = time.monotonic() + 180
        while (state := final_progress(coordinator.stub, job)).state not in (coordinator_pb2.JOB_STATE_SUCCEEDED,
                                                                        coordinator_pb2.JOB_STATE_FAILED):
            assert time.monotonic() < deadline, f"the job did not finish: {state}"
            time.sleep(0.2)
        assert state.state == coordinator_pb2.JOB_STATE_SUCCEEDED, state
        results = []
        token = ""
        while True:
            page = coordinator.stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job, page_token=token),
                                               timeout=30)
            results += page.results
            token = page.next_page_token
            if not token:
                break
        assert [list(r.token_ids) for r in sorted(results, key=lambda r: r.index)] == reference
        assert stored_counts(tmp_path / "state", job) == [(i, 1) for i in range(PROMPTS)]
        saved = json.loads((tmp_path / "state" / "replanned_plan.json").read_text())
        assert lost in saved["lost"] and lost not in {s["device"] for s in saved["plan"]["stages"]}
        print(json.dumps({"frozen": frozen, "restarted": restarted, "lost": lost, "plan": in_plan,
                          "replanned": [s["device"] for s in saved["plan"]["stages"]]}))
    finally:
        coordinator.child.kill()
        for stage in stages.values():
            stage.stop()
        planner.kill()
