"""`pqmesh demo`: the whole product on one machine, on the embedded SmolLM2-135M, on disjoint cores.

Each stage is a device of its own: a `pqmesh-stage --cpus` pinned to its own cores (one per stage on a
2-core machine) with its own memory budget, profiled under the same pinning and budget with
`pqmesh profile` flags alone; the loopback hop is profiled with `pqmesh profile link`. A planner
registers those profiles as written and plans; the demo prints the plan, runs a batch of chat
prompts through it with a progress bar, prints samples and tokens/s, runs the PipeEdge-style
baseline on the same mesh and prompts, and prints the measured ratio and the cost model's error for
each job (its predicted time, reported by the coordinator, against the measured one). The
coordinator and planner are not pinned. Everything is shut down on exit, also on Ctrl-C.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog

from localmesh import DEFAULT_BUDGETS_MB
from localmesh.mesh import (
    LocalDevice,
    RunResult,
    bin_path,
    check_layout,
    cpu_layout,
    profile_devices,
    profile_link,
    register_and_plan,
    run_plan,
    stage_command,
    workload_grid,
)
from localmesh.processes import Children
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.cpuset import available_cpus, format_cpus

log = structlog.get_logger(__name__)

TOPICS = ("the moon", "a hash table", "bread", "pipeline parallelism", "the ocean", "a bicycle", "GPUs",
          "volcanoes", "chess", "the French Revolution", "photosynthesis", "a compiler")
TEMPLATES = ("Write one sentence about {}.", "Explain {} to a child.", "Give two facts about {}.",
             "What is the most surprising thing about {}?", "Write a haiku about {}.", "Why does {} matter?")
COORDINATOR_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class DemoOptions:
    prompts: int = 64
    max_new_tokens: int = 32
    budgets_mb: tuple[int, ...] = DEFAULT_BUDGETS_MB
    quick_profile: bool = False
    workdir: Path | None = None
    bits: str = "16,8,4"


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


def describe_plan(name: str, plan: planner_pb2.Plan, predicted: planner_pb2.Prediction,
                  devices: dict[str, LocalDevice]) -> str:
    lines = [f"{name}: prefill micro-batch {plan.prefill_micro_batch}, decode micro-batch {plan.decode_micro_batch}, "
             f"predicted job {predicted.job_s:.1f} s on this mesh"]
    for i, stage in enumerate(plan.stages):
        bits = list(stage.bits)
        groups, first = [], 0
        for j in range(1, len(bits) + 1):
            if j == len(bits) or bits[j] != bits[first]:
                groups.append(f"[{stage.layers.start + first}, {stage.layers.start + j}) @ {bits[first]}-bit")
                first = j
        memory = predicted.memory_bytes[i] / 2**20 if i < len(predicted.memory_bytes) else float("nan")
        device = devices[stage.device]
        lines.append(f"  stage {i} {stage.device:8s} cores {format_cpus(device.cpus):5s} budget {device.budget_mb:5d} "
                     f"MiB, predicted {memory:5.0f} MiB: " + ", ".join(groups))
    return "\n".join(lines)


def _header(out: TextIO, devices: tuple[LocalDevice, ...], model_dir: Path, prompts: list, options: DemoOptions,
            workdir: Path) -> None:
    out.write(f"model {model_dir.name} ({model_dir}); {len(prompts)} prompts of up to {max(map(len, prompts))} "
              f"tokens, {options.max_new_tokens} new tokens each; logs in {workdir}\n")
    out.write(f"this machine: cores {format_cpus(available_cpus())}; {len(devices)} stage devices on disjoint cores "
              "(coordinator and planner unpinned):\n")
    for device in devices:
        out.write(f"  {device.describe()}\n")


def _profiles(model_dir: Path, devices, workdir: Path, options: DemoOptions, prompts: list,
              out: TextIO) -> tuple[list[Path], dict]:
    out.write("profiling each device under its own pinning and budget, one at a time, and the loopback link "
              "(cached after the first run) ...\n")
    out.flush()
    started = time.perf_counter()
    grid = workload_grid(len(prompts), max(map(len, prompts)), options.max_new_tokens)
    paths = profile_devices(model_dir, devices, workdir, options.bits, options.quick_profile, COORDINATOR_ENV,
                            grid=grid)
    network = profile_link(workdir, COORDINATOR_ENV)
    out.write(f"  profiles ready in {time.perf_counter() - started:.1f} s; link: "
              f"{network['intra_host_latency_us']:.0f} us, {network['intra_host_bandwidth_gbps']:.2f} Gbit/s\n")
    return paths, network


def _budget_note(reply: planner_pb2.PlanResponse, out: TextIO) -> None:
    """Says why these budgets make the method matter (which one-bitwidth plans fit)."""
    pipeedge = reply.baselines.get("pipeedge")
    if pipeedge is not None and pipeedge.feasible:
        bits = sorted({int(b) for s in pipeedge.plan.stages for b in s.bits})
        out.write(f"budgets: the highest single bitwidth that fits these budgets is {bits[0]}-bit (PipeEdge-style); "
                  "the LLM-PQ plan may mix bitwidths per layer and balance the stages\n")
    else:
        out.write(f"budgets: no single bitwidth fits ({pipeedge.reason if pipeedge else 'no baseline'})\n")


def run_demo(options: DemoOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> dict:
    """Runs the demo; returns its measured figures (also printed)."""
    from transformers import AutoTokenizer

    from pqmesh.model.embedded import prepare

    devices = cpu_layout(options.budgets_mb)
    check_layout(devices)
    model_dir = prepare()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = demo_prompts(tokenizer, options.prompts)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="pqmesh-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _header(out, devices, model_dir, prompts, options, workdir)
    paths, network = _profiles(model_dir, devices, workdir, options, prompts, out)
    by_name = {d.name: d for d in devices}
    with Children(workdir) as children:
        planner = children.start("planner", [bin_path("pqmesh-planner"), "--listen", "127.0.0.1:0",
                                             "--state-dir", str(workdir / "planner")], COORDINATOR_ENV)
        stages = [children.start(f"stage-{i}", stage_command(model_dir, d), COORDINATOR_ENV)
                  for i, d in enumerate(devices)]
        planner.wait_ready()
        started = time.perf_counter()
        reply = register_and_plan(planner.address, paths, (model_dir / "config.json").read_text(), devices,
                                  (len(prompts), max(map(len, prompts)), options.max_new_tokens), network, options.bits)
        out.write(f"planner answered in {time.perf_counter() - started:.1f} s\n")
        for stage in stages:
            stage.wait_ready()
        addresses = {d.name: s.address for d, s in zip(devices, stages)}
        runs = _plans_to_run(reply, by_name, out)
        _budget_note(reply, out)
        results = []
        for tag, (name, plan, predicted) in zip(("plan", "baseline"), runs):
            result = run_plan(children, workdir, tag, plan, addresses, model_dir, prompts, options.max_new_tokens,
                              COORDINATOR_ENV, err)
            results.append((name, result, predicted))
            out.write(f"  {name}: {result.tokens} tokens in {result.seconds:.1f} s = {result.tokens_per_s:.1f} "
                      f"tokens/s (predicted {result.predicted_s:.1f} s)\n")
    _print_samples(tokenizer, prompts, results[0][1], out)
    return _report(results, out)


def _plans_to_run(reply: planner_pb2.PlanResponse, devices: dict, out: TextIO) -> list[tuple]:
    """(name, plan, prediction) of the LLM-PQ plan and, when it fits, the PipeEdge-style baseline; printed."""
    out.write(describe_plan("LLM-PQ plan", reply.plan, reply.predicted, devices) + "\n")
    runs = [("pqmesh plan", reply.plan, reply.predicted)]
    baseline = reply.baselines.get("pipeedge")
    if baseline is not None and baseline.feasible:
        out.write(describe_plan("PipeEdge-style baseline", baseline.plan, baseline.predicted, devices) + "\n")
        runs.append(("pipeedge baseline", baseline.plan, baseline.predicted))
    else:
        out.write(f"PipeEdge-style baseline: infeasible ({baseline.reason if baseline else 'not offered'})\n")
    return runs


def _print_samples(tokenizer, prompts: list, ours: RunResult, out: TextIO) -> None:
    out.write("\nsample outputs (pqmesh plan):\n")
    eos = tokenizer.eos_token_id
    for prompt, tokens in list(zip(prompts, ours.outputs))[:4]:
        question = tokenizer.decode(prompt, skip_special_tokens=True).split("user\n")[-1].split("\n")[0]
        shown = tokens[:tokens.index(eos)] if eos in tokens else tokens  # the job ran on past EOS (equal work per plan)
        out.write(f"> {question}\n  {tokenizer.decode(shown, skip_special_tokens=True).strip()}\n")


def _report(results: list, out: TextIO) -> dict:
    """Prints tokens/s, each job's prediction error and the measured plan / baseline ratio; returns them."""
    figures: dict = {}
    out.write("\n")
    for key, (name, result, _) in zip(("ours", "baseline"), results):
        error = (result.predicted_s - result.seconds) / result.seconds
        figures[f"{key}_tokens_per_s"], figures[f"{key}_prediction_error"] = result.tokens_per_s, error
        out.write(f"{name}: {result.tokens_per_s:.1f} tokens/s measured; cost model predicted the job at "
                  f"{result.predicted_s:.1f} s vs {result.seconds:.1f} s measured ({error:+.0%})\n")
    figures["prediction_error"] = figures["ours_prediction_error"]
    if len(results) > 1:
        ours, base = results[0][1], results[1][1]
        figures["ratio"] = ours.tokens_per_s / base.tokens_per_s
        predicted = base.predicted_s / ours.predicted_s if ours.predicted_s > 0 else float("nan")
        out.write(f"measured throughput, pqmesh plan / PipeEdge-style baseline: {figures['ratio']:.2f}x "
                  f"(predicted {predicted:.2f}x)\n")
    return figures
