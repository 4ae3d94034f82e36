"""A heterogeneous mesh from this host's resources: every plan measured on the same mesh and prompts.

Builds devices from this host (pinned CPU-core sets with different memory budgets; a budgeted GPU
stage beside CPU stages where there is a GPU), profiles each device under its own pinning with
`pqmesh profile` flags and the loopback hop with `pqmesh profile link`, asks a real planner for a
plan, then runs on one set of stage processes, interleaved and repeated (`--repeat` rounds, the
order rotating each round): the LLM-PQ plan, the PipeEdge-style baseline and uniform int8 / int4
(those that fit). Prints, per plan, the measured job time and tokens/s (median over rounds) beside
the cost model's prediction for that job (the coordinator's `JobProgress.predicted_seconds`), the
job-time error, and the measured ratio against PipeEdge (median of the per-round ratios).

Layouts (`--layout`, default: the largest this host has):
  2core   two single-core devices, budgets 450 / 200 MiB (the demo's: one bitwidth for all layers must be 8,
          uniform int8 / int4 do not fit core 1, so the method matters; `--budgets-mb 430,300`: every plan fits)
  16core  cores 8 + 4 + 2 + 2, budgets 900 / 450 / 300 / 200 MiB
  gpu     cuda:0 with a 600 MiB budget, and two CPU devices of half the remaining cores each, 300 / 200 MiB;
          every stage profiled and run in float32 (one dtype per mesh). Not yet run on a GPU host.

Run: .venv/bin/python bench/hetero_mesh.py [--layout 2core] [--repeat 3] [--prompts 64] [--new-tokens 32]
     [--budgets-mb 450,200]  (other budgets for the layout's devices)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from localmesh import DEFAULT_BUDGETS_MB
from localmesh.demo import COORDINATOR_ENV, demo_prompts
from localmesh.mesh import (
    LocalDevice,
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
from pqmesh.cpuset import available_cpus

PLANS = ("llm-pq", "pipeedge", "uniform_int8", "uniform_int4")


def layout(name: str) -> tuple[LocalDevice, ...]:
    cores = available_cpus()
    if name == "2core":
        return cpu_layout(DEFAULT_BUDGETS_MB, cores[:2])
    if name == "16core":
        if len(cores) < 16:
            raise SystemExit(f"layout 16core needs 16 cores; this process may use {len(cores)}: figures pending")
        sizes, budgets, out, at = (8, 4, 2, 2), (900, 450, 300, 200), [], 0
        for size, mb in zip(sizes, budgets):
            out.append(LocalDevice(f"cpu{cores[at]}-{cores[at + size - 1]}", mb, tuple(cores[at:at + size])))
            at += size
        return tuple(out)
    if name == "gpu":
        import torch

        if not torch.cuda.is_available() or len(cores) < 3:
            raise SystemExit("layout gpu needs a CUDA device and 3 cores (one for the GPU stage): figures pending")
        half = (len(cores) - 1) // 2
        return (LocalDevice("gpu0", 600, device="cuda:0"), *cpu_layout((300, 200), cores[1:1 + 2 * half]))
    raise SystemExit(f"unknown layout {name!r}; use 2core, 16core or gpu")


def with_budgets(devices: tuple[LocalDevice, ...], text: str) -> tuple[LocalDevice, ...]:
    if not text:
        return devices
    budgets = [int(b) for b in text.split(",")]
    if len(budgets) != len(devices):
        raise SystemExit(f"--budgets-mb gives {len(budgets)} budgets for the layout's {len(devices)} devices")
    return tuple(replace(d, budget_mb=b) for d, b in zip(devices, budgets))


def default_layout() -> str:
    import torch

    cores = len(available_cpus())
    return "gpu" if torch.cuda.is_available() and cores >= 3 else "16core" if cores >= 16 else "2core"


def runnable(reply) -> list[tuple[str, object]]:
    out = [("llm-pq", reply.plan)]
    for name in PLANS[1:]:
        base = reply.baselines.get(name)
        if base is not None and base.feasible:
            out.append((name, base.plan))
        else:
            print(f"{name}: infeasible ({base.reason if base else 'not offered'})")
    return out


def measure(args, devices, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from pqmesh.model.embedded import prepare

    model_dir = prepare()
    prompts = demo_prompts(AutoTokenizer.from_pretrained(model_dir), args.prompts)
    dtype = "float32" if any(d.device != "cpu" for d in devices) else ""
    grid = workload_grid(len(prompts), max(map(len, prompts)), args.new_tokens)
    paths = profile_devices(model_dir, devices, workdir, args.bits, args.quick_profile, COORDINATOR_ENV, dtype, grid)
    network = profile_link(workdir, COORDINATOR_ENV)
    print(f"link: {network['intra_host_latency_us']:.0f} us, {network['intra_host_bandwidth_gbps']:.2f} Gbit/s")
    runs: dict[str, list] = {}
    with Children(workdir) as children:
        planner = children.start("planner", [bin_path("pqmesh-planner"), "--listen", "127.0.0.1:0", "--state-dir",
                                             str(workdir / "planner")], COORDINATOR_ENV)
        stages = [children.start(f"stage-{i}", stage_command(model_dir, d), COORDINATOR_ENV)
                  for i, d in enumerate(devices)]
        planner.wait_ready()
        reply = register_and_plan(planner.address, paths, (model_dir / "config.json").read_text(), devices,
                                  (len(prompts), max(map(len, prompts)), args.new_tokens), network, args.bits)
        for stage in stages:
            stage.wait_ready()
        addresses = {d.name: s.address for d, s in zip(devices, stages)}
        plans = runnable(reply)
        for name, plan in plans:
            print(f"{name}: " + ", ".join(f"{s.device} [{s.layers.start},{s.layers.end}) bits "
                                          f"{sorted({int(b) for b in s.bits})}" for s in plan.stages)
                  + f"; micro-batches {plan.prefill_micro_batch}/{plan.decode_micro_batch}")
        for round_ in range(args.repeat):
            order = plans[round_ % len(plans):] + plans[:round_ % len(plans)]
            for name, plan in order:
                result = run_plan(children, workdir, f"{name}-{round_}", plan, addresses, model_dir, prompts,
                                  args.new_tokens, COORDINATOR_ENV, sys.stderr, dtype)
                runs.setdefault(name, []).append(result)
                print(f"round {round_} {name}: {result.seconds:.2f} s measured, {result.predicted_s:.2f} s predicted, "
                      f"{result.tokens_per_s:.1f} tok/s; load {os.getloadavg()[0]:.2f}", flush=True)
    return runs


def report(runs: dict) -> None:
    base = runs.get("pipeedge")
    print("\n| plan | measured job s (runs) | predicted job s | job-time error (median) | measured tok/s | "
          "predicted tok/s | measured / pipeedge | predicted / pipeedge |")
    print("|---|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        seconds = [r.seconds for r in results]
        predicted = statistics.median(r.predicted_s for r in results)
        errors = [(r.predicted_s - r.seconds) / r.seconds for r in results]
        tokens = results[0].tokens
        ratio = predicted_ratio = float("nan")
        if base:
            ratio = statistics.median(b.seconds / r.seconds for r, b in zip(results, base))
            predicted_ratio = statistics.median(b.predicted_s for b in base) / predicted
        print(f"| {name} | {statistics.median(seconds):.2f} ({', '.join(f'{s:.2f}' for s in seconds)}) | "
              f"{predicted:.2f} | {statistics.median(errors):+.1%} ({', '.join(f'{e:+.0%}' for e in errors)}) | "
              f"{tokens / statistics.median(seconds):.1f} | {tokens / predicted:.1f} | {ratio:.2f}x | "
              f"{predicted_ratio:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", default="", help="2core, 16core or gpu (default: the largest this host has)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bits", default="16,8,4")
    parser.add_argument("--quick-profile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--budgets-mb", default="", metavar="MB,MB,...",
                        help="the layout's memory budgets instead of its own (one per device, in order)")
    args = parser.parse_args()
    name = args.layout or default_layout()
    devices = with_budgets(layout(name), args.budgets_mb)
    check_layout(devices)
    print(f"layout {name}: " + "; ".join(d.describe() for d in devices) + f"; load {os.getloadavg()}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pqmesh-hetero-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report(measure(args, devices, workdir))
    print(f"load at the end {os.getloadavg()}; logs in {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
