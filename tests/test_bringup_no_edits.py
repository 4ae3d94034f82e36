"""Bring-up without hand edits: devices profiled with `pqmesh profile` flags alone (pinned cores, a
stage budget) plan correctly through the CLI and through a real planner (model_config_json, dtype
from the profiles), real stage servers accept that plan at those budgets, and the job reports its
predicted time beside the measured one (JobProgress, Prometheus gauges, the CLI summary). Also: the
README's grpcurl Plan example, run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format
from tiny_models import build_checkpoint

from coordinator.batch_client import upload
from coordinator.commands import progress_line
from coordinator.prediction import predict_job_seconds
from planner.main import PlannerConfig, start
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.cpuset import available_cpus
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
BUDGETS_MB = {"dev-a": 6, "dev-b": 3}
WORKLOAD = ("--batch", "6", "--prompt-len", "12", "--gen-len", "5")


def _run(*argv: str) -> str:
    done = subprocess.run([str(BIN / "pqmesh"), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A tiny Llama checkpoint and two devices profiled on their own cores with their stage budgets."""
    root = tmp_path_factory.mktemp("bringup")
    build_checkpoint("llama", root / "models" / "tiny-llama", layers=4)
    cores = available_cpus()
    paths = {}
    for i, (name, mb) in enumerate(BUDGETS_MB.items()):
        paths[name] = root / f"{name}.json"
        _run("profile", "--model", str(root / "models" / "tiny-llama"), "--bits", "16,8", "--quick", "--layers", "1",
             "--repeats", "1", "--cpus", str(cores[i % len(cores)]), "--memory-bytes", str(mb << 20), "--name", name,
             "--out", str(paths[name]), "--cache-dir", str(root / "cache"))
    return root, paths


def test_profile_flags_alone_give_a_float32_cpu_profile_at_the_stage_budget(profiled):
    _, paths = profiled
    for name, path in paths.items():
        profile = json.loads(path.read_text())
        assert int(profile["memory_bytes"]) == BUDGETS_MB[name] << 20 and int(profile["reserve_bytes"]) == 0
        assert profile["dtype"] == "float32" and profile["model_fingerprint"] and profile["latency"]
        assert profile["cpus"] == str(available_cpus()[list(BUDGETS_MB).index(name) % len(available_cpus())])


def test_cli_plan_from_profiles_needs_no_edits(profiled):
    root, paths = profiled
    cluster = root / "cluster.toml"
    cluster.write_text("".join(f'[[device]]\ntype = "cpu"\nname = "{n}"\nhost = "here"\n' for n in paths))
    model = root / "models" / "tiny-llama"
    profiles = [a for p in paths.values() for a in ("--profile", str(p))]
    report = json.loads(_run("plan", "--cluster", str(cluster), "--model", str(model), *WORKLOAD, "--bits", "16,8",
                             "--time-limit", "5", "--json", *profiles))
    stages = report["plan"]["stages"]
    for stage, used in zip(stages, report["predicted"]["memory_bytes"]):
        assert used <= BUDGETS_MB[stage["device"]] << 20
    assert report["predicted"]["job_s"] > 0 and "cost" in report["plan"]
    float16 = json.loads(_run("plan", "--cluster", str(cluster), "--model", str(model), *WORKLOAD, "--bits", "16,8",
                              "--time-limit", "5", "--json", "--dtype", "float16", *profiles))
    # no --dtype: the profiles' float32, which takes more memory than float16 for the same stages
    assert sum(report["predicted"]["memory_bytes"]) > sum(float16["predicted"]["memory_bytes"])


@pytest.mark.slow
def test_planner_registered_profiles_plan_a_mesh_the_stages_accept(profiled, tmp_path):
    from test_coordinator_e2e import Client, stop_stages

    from coordinator.config import CoordinatorConfig
    from coordinator.main import serve
    from coordinator.metrics import CoordinatorMetrics

    root, paths = profiled
    server, port, _ = start(PlannerConfig("127.0.0.1:0", tmp_path / "planner"))
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = planner_pb2_grpc.PlannerServiceStub(ch)
            for path in paths.values():  # the files as written
                stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(
                    profile=json_format.Parse(path.read_text(), planner_pb2.DeviceProfile())))
            config = json.loads((root / "models" / "tiny-llama" / "config.json").read_text())
            config["_name_or_path"] = "some-other-name"  # fitted entries match by shape, not by name
            reply = stub.Plan(planner_pb2.PlanRequest(
                model_config_json=json.dumps(config), workload=planner_pb2.Workload(
                    batch_size=6, prompt_length=12, generation_length=5),
                devices=[planner_pb2.ClusterDevice(device_type=n, name=n, host="here") for n in paths],
                allowed_bits=[16, 8], time_limit_seconds=5), timeout=60)
    finally:
        server.stop(0).wait()
    plan = PipelinePlan.from_proto(reply.plan)
    assert plan.cost is not None and reply.predicted.job_s > 0
    budgets = {"dev-a": BUDGETS_MB["dev-a"] << 20, "dev-b": BUDGETS_MB["dev-b"] << 20}
    stages = []
    from stage_server.config import StageConfig
    from stage_server.main import serve as serve_stage

    for stage in plan.stages:  # each stage at exactly its device's budget
        srv, stage_port, servicer = serve_stage(StageConfig("127.0.0.1:0", "cpu", budgets[stage.device],
                                                            root / "models", 4, "warning"))
        stages.append((srv, f"127.0.0.1:{stage_port}", servicer))
    metrics = CoordinatorMetrics()
    coordinator = serve(CoordinatorConfig("127.0.0.1:0", tmp_path / "coord",
                                          plan.with_addresses([a for _, a, _ in stages]), "tiny-llama", 6, 17,
                                          log_level="warning", dtype="float32"), metrics)
    client = Client(coordinator.port)
    try:
        prompts = [[3 + i] * (7 + i) for i in range(6)]
        job = client.submit(prompts, 5)
        final = client.wait(job)
        assert final.state == 3, final  # SUCCEEDED
        expected = predict_job_seconds(plan, [len(p) for p in prompts], 5, 6)
        assert final.predicted_seconds == pytest.approx(expected) and expected > 0
        assert final.elapsed_seconds > 0
        registry = metrics.registry
        assert registry.get_sample_value("pqmesh_coordinator_last_job_predicted_seconds") == pytest.approx(expected)
        measured = registry.get_sample_value("pqmesh_coordinator_last_job_measured_seconds")
        assert measured == pytest.approx(final.elapsed_seconds, rel=1e-6)
        error = registry.get_sample_value("pqmesh_coordinator_last_job_prediction_error_ratio")
        assert error == pytest.approx((expected - measured) / measured)
        assert re.search(r"predicted \d+\.\d s vs \d+\.\d s measured \([+-]\d+%\)", progress_line(final))

        # an uploaded file predicts too: its lines resolved as the feeder resolves them, own max_tokens each
        lines = tmp_path / "job.jsonl"
        lines.write_text("".join(json.dumps({"token_ids": p, "max_tokens": 2 + i % 3}) + "\n"
                                 for i, p in enumerate(prompts)))
        uploaded = upload(client.stub, lines, coordinator_pb2.GenerationParams(max_new_tokens=5), "up").job_id
        final = client.wait(uploaded)
        expected = predict_job_seconds(plan, [len(p) for p in prompts], [2 + i % 3 for i in range(6)], 6)
        assert final.state == 3 and final.predicted_seconds == pytest.approx(expected) and expected > 0
    finally:
        client.close()
        coordinator.stop()
        stop_stages(stages)


def _readme_plan_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(grpcurl[^`]*?PlannerService/Plan)\n```", text, re.S)
    assert block, "README.md lost its grpcurl Plan example"
    return next(c for c in re.split(r"\n(?=grpcurl )", block.group(1)) if "PlannerService/Plan" in c)


def test_readme_grpcurl_plan_example_works_as_written(tmp_path):
    command = _readme_plan_example()
    assert '"count": 3' in command and command.count("device_type") == 2  # one device leaves count out
    server, port, _ = start(PlannerConfig("127.0.0.1:0", tmp_path / "planner"))
    try:
        # as written, but for the port: 50050 may be taken on a test machine
        done = subprocess.run(command.replace("localhost:50050", f"localhost:{port}"), shell=True,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    finally:
        server.stop(0).wait()
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert len(reply["plan"]["stages"]) == 4 and reply["predicted"]["throughput_tokens_per_s"] > 0
