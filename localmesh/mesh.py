"""A mesh of this host's resources, as real processes: devices (pinned CPU-core sets with memory
budgets, or a budgeted GPU), each profiled under its own pinning with `pqmesh profile` flags alone,
the loopback link profiled with `pqmesh profile link`, a planner that registers those profiles as
written, one `pqmesh-stage` per device, and one coordinator per plan run. `localmesh.demo` and
`bench/hetero_mesh.py` drive it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from localmesh.processes import Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.cpuset import available_cpus, check_available, check_disjoint, format_cpus
from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan


@dataclass(frozen=True)
class LocalDevice:
    """One device of the local mesh: CPU cores (``cpus``) or a GPU (``device`` cuda:N), with a budget."""

    name: str
    budget_mb: int
    cpus: tuple[int, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.budget_mb < 1:
            raise InvalidArgument(f"device {self.name}: the memory budget must be >= 1 MiB")
        if self.device == "cpu" and not self.cpus:
            raise InvalidArgument(f"device {self.name}: a CPU device needs its cores (--cpus)")

    def describe(self) -> str:
        where = f"cores {format_cpus(self.cpus)}" if self.device == "cpu" else self.device
        return f"{self.name}: {where}, budget {self.budget_mb} MiB"


def cpu_layout(budgets_mb: Sequence[int], cores: Sequence[int] | None = None) -> tuple[LocalDevice, ...]:
    """One device per budget, each on its own share of this process's cores (disjoint, contiguous)."""
    cores = list(available_cpus() if cores is None else cores)
    if len(budgets_mb) > len(cores):
        raise InvalidArgument(f"{len(budgets_mb)} stages need {len(budgets_mb)} disjoint cores but this process may "
                              f"use {len(cores)} ({format_cpus(cores)}): give at most {len(cores)} budgets")
    share, devices = len(cores) // len(budgets_mb), []
    for i, mb in enumerate(budgets_mb):
        devices.append(LocalDevice(f"cpu{format_cpus(cores[i * share:(i + 1) * share])}", int(mb),
                                   tuple(cores[i * share:(i + 1) * share])))
    return tuple(devices)


def check_layout(devices: Sequence[LocalDevice]) -> None:
    for d in devices:
        if d.cpus:
            check_available(d.cpus)
    check_disjoint({d.name: d.cpus for d in devices if d.cpus})


def bin_path(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _run(argv: list[str], env: dict) -> None:
    _wait([_start(argv, env)])


def _start(argv: list[str], env: dict) -> tuple[list[str], subprocess.Popen]:
    return argv, subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)


def _wait(started: list[tuple[list[str], subprocess.Popen]]) -> None:
    failures = []
    for argv, proc in started:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"`{' '.join(argv)}` failed ({proc.returncode}):\n{stderr[-2000:]}")
    if failures:
        raise FailedPrecondition("\n".join(failures))


def workload_grid(prompts: int, prompt_len: int, new_tokens: int) -> list[str]:
    """`pqmesh profile` grid flags around the job's own shapes: micro-batches up to the batch, prompt
    lengths up to its longest prompt, decode contexts up to prompt + new tokens (a fit is most accurate
    where it was measured; the default grid would extrapolate to the batch)."""
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= prompts} | {min(prompts, 64)})
    lengths = sorted({max(2, prompt_len // 4), max(2, prompt_len // 2), prompt_len})
    contexts = sorted({prompt_len + 1, prompt_len + max(1, new_tokens // 2), prompt_len + new_tokens})
    text = ",".join
    return ["--prefill-batches", text(map(str, batches)), "--prompt-lengths", text(map(str, lengths)),
            "--decode-batches", text(map(str, batches)), "--contexts", text(map(str, contexts))]


def profile_devices(model_dir: Path, devices: Sequence[LocalDevice], workdir: Path, bits: str, quick: bool,
                    env: dict, dtype: str = "", grid: Sequence[str] = ()) -> list[Path]:
    """`pqmesh profile` of every device under its own pinning and budget, one device at a time. (Measured
    all at once, every core is busy all the time, which a mesh's stages are not: on the 2-core demo host
    such profiles predicted jobs 10-44% long, docs/BENCHMARKS.md.) The profile files (samples are cached
    per device and setting). ``dtype`` "" is each device's default (float32 on a CPU, float16 on CUDA);
    a mesh mixing both runs one dtype, so pass it."""
    paths = []
    for device in devices:
        path = workdir / f"profile-{device.name}.json"
        argv = [bin_path("pqmesh"), "profile", "--model", str(model_dir), "--device", device.device, "--bits", bits,
                "--out", str(path), "--name", device.name, "--memory-bytes", str(device.budget_mb << 20)]
        if device.cpus:
            argv += ["--cpus", format_cpus(device.cpus)]
        argv += ["--quick"] if quick else list(grid)
        if dtype:
            argv += ["--dtype", dtype]
        _wait([_start(argv, env)])
        paths.append(path)
    return paths


def profile_link(workdir: Path, env: dict) -> dict:
    """The loopback gRPC hop (`pqmesh profile link`): {"intra_host_latency_us", "intra_host_bandwidth_gbps"}."""
    path = workdir / "link.json"
    _run([bin_path("pqmesh"), "profile", "link", "--out", str(path)], env)
    link = json.loads(path.read_text())
    return {"intra_host_latency_us": link["latency_us"], "intra_host_bandwidth_gbps": link["bandwidth_gbps"]}


def stage_command(model_dir: Path, device: LocalDevice) -> list[str]:
    argv = [bin_path("pqmesh-stage"), "--listen", "127.0.0.1:0", "--device", device.device, "--memory-budget",
            str(device.budget_mb << 20), "--model-root", str(model_dir.parent)]
    return argv + (["--cpus", format_cpus(device.cpus)] if device.cpus else [])


def register_and_plan(address: str, profiles: Sequence[Path], config_json: str, devices: Sequence[LocalDevice],
                      workload: tuple[int, int, int], network: dict, bits: str,
                      time_limit_s: float = 20) -> planner_pb2.PlanResponse:
    """Registers the profile files as written and asks for a plan: no field is edited on the way."""
    from google.protobuf import json_format

    batch, prompt_len, gen_len = workload
    with channel(address) as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        for path in profiles:
            profile = json_format.Parse(path.read_text(), planner_pb2.DeviceProfile())
            stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=profile), timeout=30)
        request = planner_pb2.PlanRequest(
            model_config_json=config_json,
            devices=[planner_pb2.ClusterDevice(device_type=d.name, name=d.name, host="localhost") for d in devices],
            network=planner_pb2.Network(bandwidth_gbps=network["intra_host_bandwidth_gbps"],
                                        latency_us=network["intra_host_latency_us"], **network),
            workload=planner_pb2.Workload(batch_size=batch, prompt_length=prompt_len, generation_length=gen_len),
            allowed_bits=[int(b) for b in bits.split(",")], time_limit_seconds=time_limit_s)
        return stub.Plan(request, timeout=120)


@dataclass
class RunResult:
    name: str
    seconds: float  # SubmitJob until WatchJob reports SUCCEEDED
    tokens: int
    outputs: list[list[int]]
    predicted_s: float = 0.0  # the coordinator's prediction for this job (JobProgress.predicted_seconds)
    coordinator_s: float = 0.0  # the coordinator's measured time (JobProgress.elapsed_seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_batch(address: str, prompts: list[list[int]], new_tokens: int, name: str, err: TextIO) -> RunResult:
    """Submits one job, shows its progress, and reads its results back."""
    from coordinator.commands import progress_line

    with channel(address) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        request = coordinator_pb2.SubmitJobRequest(
            prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=p)) for p in prompts],
            params=coordinator_pb2.GenerationParams(max_new_tokens=new_tokens, stop_on_eos=False))
        started = time.perf_counter()
        job = stub.SubmitJob(request, timeout=60).job_id
        final = None
        for final in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job)):
            err.write(f"\r  {name}: " + progress_line(final))
            err.flush()
        seconds = time.perf_counter() - started
        err.write("\n")
        if final is None or final.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
            state = final and coordinator_pb2.JobState.Name(final.state)
            raise FailedPrecondition(f"{name}: job {job} ended as {state}: {final and final.message}")
        outputs = _results(stub, job)
    ordered = [outputs[i] for i in range(len(prompts))]
    return RunResult(name, seconds, sum(map(len, ordered)), ordered, final.predicted_seconds, final.elapsed_seconds)


def _results(stub, job: str) -> dict[int, list[int]]:
    outputs, token = {}, ""
    while True:
        page = stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job, page_size=500, page_token=token),
                               timeout=60)
        outputs.update({r.index: list(r.token_ids) for r in page.results})
        token = page.next_page_token
        if not token:
            return outputs


def run_plan(children: Children, workdir: Path, tag: str, plan: planner_pb2.Plan, addresses: dict[str, str],
             model_dir: Path, prompts: list[list[int]], new_tokens: int, env: dict, err: TextIO,
             dtype: str = "") -> RunResult:
    """One coordinator for ``plan`` (the planner's answer, its cost included), one job, then it stops.
    ``dtype`` "" lets each stage run its device's default."""
    pipeline = PipelinePlan.from_proto(plan)
    pipeline = pipeline.with_addresses([addresses[s.device] for s in pipeline.stages])
    plan_path = workdir / f"plan-{tag}.json"
    plan_path.write_text(pipeline.to_json())
    max_tokens = max(map(len, prompts)) + new_tokens
    command = [bin_path("pqmesh-coordinator"), "--listen", "127.0.0.1:0", "--state-dir", str(workdir / f"coord-{tag}"),
               "--plan", str(plan_path), "--model-id", model_dir.name, "--model-root", str(model_dir.parent),
               "--max-sequences", str(len(prompts)), "--max-tokens-per-sequence", str(max_tokens)]
    command += ["--dtype", dtype] if dtype else []
    coordinator = children.start(f"coordinator-{tag}", command, env)
    try:
        coordinator.wait_ready("coordinator_serving", timeout=300)
        return run_batch(coordinator.address, prompts, new_tokens, tag, err)
    finally:
        children.stop(coordinator)
