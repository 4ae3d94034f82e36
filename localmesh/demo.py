"""`pqmesh demo`: the whole product on one machine, on the embedded SmolLM2-135M.

Prepares the model, profiles this CPU (cached after the first run), starts a planner, three stage
servers with different memory budgets (so the plan must mix bitwidths) and a coordinator as real
processes on loopback; asks the planner for a plan and prints it; runs a batch of chat prompts with a
progress bar; prints sample outputs and tokens/s; then runs the planner's PipeEdge-style baseline
(even partition, one bitwidth) on the same batch and prints the measured ratio and how close the
cost model's predictions came. Everything is shut down on exit, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog
from google.protobuf import json_format

from localmesh import DEFAULT_BUDGETS_MB
from localmesh.processes import Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.errors import FailedPrecondition
from pqmesh.grpc_server import channel

log = structlog.get_logger(__name__)

TOPICS = ("the moon", "a hash table", "bread", "pipeline parallelism", "the ocean", "a bicycle", "GPUs",
          "volcanoes", "chess", "the French Revolution", "photosynthesis", "a compiler")
TEMPLATES = ("Write one sentence about {}.", "Explain {} to a child.", "Give two facts about {}.",
             "What is the most surprising thing about {}?", "Write a haiku about {}.", "Why does {} matter?")


@dataclass(frozen=True)
class DemoOptions:
    prompts: int = 64
    max_new_tokens: int = 32
    budgets_mb: tuple[int, ...] = DEFAULT_BUDGETS_MB
    quick_profile: bool = False
    workdir: Path | None = None
    bits: str = "16,8,4"
    threads_per_process: int = 1


@dataclass
class RunResult:
    name: str
    seconds: float
    tokens: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def demo_prompts(tokenizer, count: int) -> list[list[int]]:
    texts = [
        TEMPLATES[i % len(TEMPLATES)].format(TOPICS[(i // len(TEMPLATES) + i) % len(TOPICS)]) for i in range(count)
    ]
    out = []
    for text in texts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return out


def _bin(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def profile_cpu(model_dir: Path, workdir: Path, options: DemoOptions, env: dict, out: TextIO) -> dict:
    """This CPU's profile (the profiler caches it, so only the first demo run measures)."""
    path = workdir / "cpu-profile.json"
    argv = [_bin("pqmesh"), "profile", "--model", str(model_dir), "--device", "cpu", "--bits", options.bits,
            "--out", str(path), "--name", "demo-cpu"]
    if options.quick_profile:
        argv.append("--quick")
    out.write("profiling this CPU's decoder-layer latency (cached after the first run) ...\n")
    out.flush()
    started = time.perf_counter()
    done = subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise FailedPrecondition(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    out.write(f"  profile ready in {time.perf_counter() - started:.1f} s: {path}\n")
    return json.loads(path.read_text())


def register_devices(stub, profile: dict, budgets_mb: tuple[int, ...]) -> list[str]:
    names = []
    for i, mb in enumerate(budgets_mb):
        name = f"demo-cpu-{'abc'[i] if i < 3 else i}"
        # memory_bytes is exactly the stage's --memory-budget, which counts weights, KV cache and the
        # dequantization workspace; no CUDA-context reserve on a CPU.
        message = json_format.ParseDict({**profile, "name": name, "memory_bytes": str(mb << 20), "reserve_bytes": "0"},
                                        planner_pb2.DeviceProfile())
        stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(profile=message), timeout=30)
        names.append(name)
    return names


def plan_request(config_json: str, model_name: str, devices: list[str], prompt_len: int,
                 options: DemoOptions) -> planner_pb2.PlanRequest:
    config = json.loads(config_json)
    config["_name_or_path"] = model_name  # the name the profile's latency models were fitted under
    return planner_pb2.PlanRequest(
        model_config_json=json.dumps(config),
        dtype="float32",  # CPU stages run float32
        devices=[planner_pb2.ClusterDevice(device_type=name, count=1, name=name, host="localhost") for name in devices],
        workload=planner_pb2.Workload(batch_size=options.prompts, prompt_length=prompt_len,
                                      generation_length=options.max_new_tokens),
        allowed_bits=[int(b) for b in options.bits.split(",")],
        time_limit_seconds=20,
    )


def mesh_plan_json(plan: planner_pb2.Plan, addresses: dict[str, str]) -> str:
    """The coordinator's plan file for a planner Plan, with each device's stage address."""
    return json.dumps({"version": 1, "prefill_micro_batch": plan.prefill_micro_batch,
                       "decode_micro_batch": plan.decode_micro_batch,
                       "stages": [{"device": s.device, "layers": [s.layers.start, s.layers.end], "bits": list(s.bits),
                                   "address": addresses[s.device]} for s in plan.stages]})


def describe_plan(name: str, plan: planner_pb2.Plan, predicted: planner_pb2.Prediction, budgets: dict[str, int]) -> str:
    lines = [f"{name}: prefill micro-batch {plan.prefill_micro_batch}, decode micro-batch {plan.decode_micro_batch}, "
             f"predicted {predicted.throughput_tokens_per_s:.1f} tokens/s "
             f"(prefill {predicted.prefill_s:.2f} s + decode {predicted.decode_s:.2f} s)"]
    for i, stage in enumerate(plan.stages):
        bits = list(stage.bits)
        groups, first = [], 0
        for j in range(1, len(bits) + 1):
            if j == len(bits) or bits[j] != bits[first]:
                groups.append(f"[{stage.layers.start + first}, {stage.layers.start + j}) @ {bits[first]}-bit")
                first = j
        memory = predicted.memory_bytes[i] / 2**20 if i < len(predicted.memory_bytes) else float("nan")
        lines.append(f"  stage {i} {stage.device:11s} budget {budgets[stage.device] / 2**20:5.0f} MiB, "
                     f"predicted {memory:5.0f} MiB: " + ", ".join(groups))
    return "\n".join(lines)


def run_batch(address: str, prompts: list[list[int]], new_tokens: int, name: str, err: TextIO) -> RunResult:
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
            raise FailedPrecondition(
                f"{name}: job {job} ended as {final and coordinator_pb2.JobState.Name(final.state)}: "
                f"{final and final.message}"
            )
        outputs, token = {}, ""
        while True:
            page = stub.GetResults(
                coordinator_pb2.GetResultsRequest(job_id=job, page_size=500, page_token=token), timeout=60
            )
            outputs.update({r.index: list(r.token_ids) for r in page.results})
            token = page.next_page_token
            if not token:
                break
    ordered = [outputs[i] for i in range(len(prompts))]
    return RunResult(name, seconds, sum(map(len, ordered)), ordered)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> dict:
    """Runs the demo; returns its measured figures (also printed)."""
    from transformers import AutoTokenizer

    from pqmesh.model.embedded import prepare

    model_dir = prepare()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = demo_prompts(tokenizer, options.prompts)
    prompt_len = max(map(len, prompts))
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="pqmesh-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(options.threads_per_process), "PYTHONUNBUFFERED": "1"}
    out.write(f"model {model_dir.name} ({model_dir}); {len(prompts)} prompts of up to {prompt_len} tokens, "
              f"{options.max_new_tokens} new tokens each; logs in {workdir}\n")
    profile = profile_cpu(model_dir, workdir, options, env, out)
    with Children(workdir) as children:
        planner = children.start("planner", [_bin("pqmesh-planner"), "--listen", "127.0.0.1:0",
                                             "--state-dir", str(workdir / "planner")], env)
        stages = [children.start(f"stage-{i}", _stage_command(model_dir, mb), env)
                  for i, mb in enumerate(options.budgets_mb)]
        planner.wait_ready()
        names, reply = _ask_for_plan(planner.address, model_dir, profile, prompt_len, options, out)
        for stage in stages:
            stage.wait_ready()
        addresses = {n: s.address for n, s in zip(names, stages)}
        runs = _plans_to_run(reply, {n: mb << 20 for n, mb in zip(names, options.budgets_mb)}, out)
        results = []
        for i, (name, plan, predicted) in enumerate(runs):
            plan_path = workdir / f"plan-{i}.json"
            plan_path.write_text(mesh_plan_json(plan, addresses))
            command = _coordinator_command(model_dir, workdir / f"coordinator-{i}", plan_path, options, prompt_len)
            coordinator = children.start(f"coordinator-{i}", command, env)
            coordinator.wait_ready("coordinator_serving", timeout=300)
            result = run_batch(coordinator.address, prompts, options.max_new_tokens, name, err)
            children.stop(coordinator)
            results.append((result, predicted))
            out.write(
                f"  {name}: {result.tokens} tokens in {result.seconds:.1f} s = {result.tokens_per_s:.1f} tokens/s "
                f"(predicted job time {predicted.prefill_s + predicted.decode_s:.1f} s)\n"
            )
    _print_samples(tokenizer, prompts, results[0][0], out)
    return _report(results, reply, options, out)


def _stage_command(model_dir: Path, budget_mb: int) -> list[str]:
    return [_bin("pqmesh-stage"), "--listen", "127.0.0.1:0", "--device", "cpu", "--memory-budget",
            str(budget_mb << 20), "--model-root", str(model_dir.parent)]


def _coordinator_command(model_dir: Path, state_dir: Path, plan_path: Path, options: DemoOptions,
                         prompt_len: int) -> list[str]:
    return [_bin("pqmesh-coordinator"), "--listen", "127.0.0.1:0", "--state-dir", str(state_dir),
            "--plan", str(plan_path), "--model-id", model_dir.name, "--model-root", str(model_dir.parent),
            "--max-sequences", str(options.prompts),
            "--max-tokens-per-sequence", str(prompt_len + options.max_new_tokens)]


def _ask_for_plan(address: str, model_dir: Path, profile: dict, prompt_len: int, options: DemoOptions,
                  out: TextIO) -> tuple[list[str], planner_pb2.PlanResponse]:
    """Registers the demo's devices and asks the planner for a plan; the device names and its answer."""
    with channel(address) as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        names = register_devices(stub, profile, options.budgets_mb)
        request = plan_request((model_dir / "config.json").read_text(), profile.get("model", ""), names, prompt_len,
                               options)
        started = time.perf_counter()
        reply = stub.Plan(request, timeout=120)
    out.write(f"planner answered in {time.perf_counter() - started:.1f} s\n")
    return names, reply


def _plans_to_run(reply: planner_pb2.PlanResponse, budgets: dict, out: TextIO) -> list[tuple]:
    """(name, plan, prediction) of the LLM-PQ plan and, when it fits, the PipeEdge-style baseline; printed."""
    out.write(describe_plan("LLM-PQ plan", reply.plan, reply.predicted, budgets) + "\n")
    runs = [("pqmesh plan", reply.plan, reply.predicted)]
    baseline = reply.baselines.get("pipeedge")
    if baseline is not None and baseline.feasible:
        out.write(describe_plan("PipeEdge-style baseline", baseline.plan, baseline.predicted, budgets) + "\n")
        runs.append(("pipeedge baseline", baseline.plan, baseline.predicted))
    else:
        out.write(f"PipeEdge-style baseline: infeasible ({baseline.reason if baseline else 'not offered'})\n")
    return runs


def _print_samples(tokenizer, prompts: list, ours, out: TextIO) -> None:
    out.write("\nsample outputs (pqmesh plan):\n")
    eos = tokenizer.eos_token_id
    for prompt, tokens in list(zip(prompts, ours.outputs))[:4]:
        question = tokenizer.decode(prompt, skip_special_tokens=True).split("user\n")[-1].split("\n")[0]
        shown = tokens[:tokens.index(eos)] if eos in tokens else tokens  # the job ran on past EOS (equal work per plan)
        out.write(f"> {question}\n  {tokenizer.decode(shown, skip_special_tokens=True).strip()}\n")


def _report(results: list, reply: planner_pb2.PlanResponse, options: DemoOptions, out: TextIO) -> dict:
    """Prints tokens/s, the cost model's error and the measured plan / baseline ratio; returns them."""
    ours, ours_predicted = results[0]
    figures: dict = {"ours_tokens_per_s": ours.tokens_per_s}
    predicted_s = ours_predicted.prefill_s + ours_predicted.decode_s
    figures["prediction_error"] = (predicted_s - ours.seconds) / ours.seconds
    out.write(f"\npqmesh plan: {ours.tokens_per_s:.1f} tokens/s measured; cost model predicted the job at "
              f"{predicted_s:.1f} s vs {ours.seconds:.1f} s measured ({figures['prediction_error']:+.0%})\n")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if len(options.budgets_mb) + 1 > cores:
        out.write(
            f"  note: {len(options.budgets_mb)} stage processes and the coordinator share {cores} CPU cores here, so "
            "stages cannot overlap as the cost model assumes for separate devices; expect the measured time "
            "to exceed the prediction (one stage, --budgets-mb 2000, checks the cost model itself)\n"
        )
    if len(results) > 1:
        base, base_predicted = results[1]
        figures["baseline_tokens_per_s"] = base.tokens_per_s
        figures["ratio"] = ours.tokens_per_s / base.tokens_per_s
        predicted_ratio = reply.predicted.throughput_tokens_per_s / base_predicted.throughput_tokens_per_s
        out.write(f"measured throughput, pqmesh plan / PipeEdge-style baseline: {figures['ratio']:.2f}x "
                  f"(predicted {predicted_ratio:.2f}x)\n")
    return figures
