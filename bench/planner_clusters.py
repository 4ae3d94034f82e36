"""Planner benchmark over the 11 heterogeneous clusters of the LLM-PQ evaluation.

For each cluster: predicted throughput of our plan and of every baseline (same cost model), the ratio
to PipeEdge, the summed quality indicator of ours and PipeEdge's (default indicator: uniform int4 =
1.0, which is also the default bound), our throughput again when held to PipeEdge's own summed
indicator (same quality), and the larger optimality gap and solve time of the two solves.
Global batch 32, prompt 512, generation 100 (the second OPT-13B case: prompt 128, generation 200).
Each [[device]] group is one host; hosts talk over the default network
(10 Gbit/s, 100 us). Latency models are the built-in, uncalibrated rooflines.

Run: ``python bench/planner_clusters.py [--time-limit S] [--json]``.

``--large N [N ...]``: instead, one pool of N devices per N (seeded, so reproducible: ``--seed``) of
the five GPU types T4, V100-32G, A10G, A100-40G and A100-80G (at least one of each, the rest drawn
uniformly), in hosts of up to 8 devices of one type, planning OPT-175B (96 layers) for batch 64,
prompt 512, generation 100 in one pipeline. Prints the solve time the planner reports, the wall time
of the whole call (incl. baselines and the whole-mesh replay), the optimality gap and throughput
against PipeEdge. A pool larger than the model's 96 layers cannot be one pipeline (every device
holds a layer): its row says so.

``--large N ... --replicas [--batch B]``: plan each pool as several pipelines (data-parallel replicas,
``planner.replicas``; the coordinator cannot run them yet): the best replica count found within
``--time-limit`` (for the whole search), its throughput, and PipeEdge's on the same split.

``--frontier CASE [CASE ...]``: instead, the throughput-quality frontier of those clusters (the
what-if's: the best plan under each of ``--points`` quality bounds, from the tightest that fits to
the fastest plan's), with PipeEdge's throughput and summed indicator for reference.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace

from planner.baselines import all_baselines
from planner.cluster import Cluster, ClusterEntry, Workload
from planner.indicator import Quality
from planner.plans import BASELINE_NAMES
from planner.replicas import plan_replicas
from planner.request import PlanInputs
from planner.search import plan
from planner.whatif import quality_frontier
from pqmesh.errors import PqmeshError
from pqmesh.log import configure

LARGE_TYPES = ("T4", "V100-32G", "A10G", "A100-40G", "A100-80G")
LARGE_MODEL, LARGE_WORKLOAD, HOST_SIZE = "opt-175b", Workload(64, 512, 100), 8


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    devices: tuple[tuple[str, int], ...]
    prompt: int = 512
    generation: int = 100
    batch: int = 32


CASES = (
    Case("1", "opt-13b", (("V100-32G", 1),)),
    Case("2", "opt-13b", (("V100-32G", 1),), prompt=128, generation=200),
    Case("3", "opt-30b", (("T4", 3), ("V100-32G", 1))),
    Case("4", "opt-30b", (("P100-12G", 3), ("V100-32G", 1))),
    Case("5", "opt-66b", (("T4", 4), ("V100-32G", 2))),
    Case("6", "opt-66b", (("V100-32G", 2), ("A100-40G", 2))),
    Case("7", "bloom-176b", (("V100-32G", 4), ("A100-40G", 4))),
    Case("8", "bloom-176b", (("V100-32G", 4), ("A800-80G", 2))),
    Case("9", "opt-30b", (("T4", 4),)),
    Case("10", "opt-66b", (("V100-32G", 4),)),
    Case("11", "bloom-176b", (("A800-80G", 4),)),
)


def run_case(case: Case, time_limit: float) -> dict:
    cluster = Cluster(tuple(ClusterEntry(t, n, host=f"{t.lower()}-host") for t, n in case.devices))
    inputs = PlanInputs(
        case.model, cluster, Workload(case.batch, case.prompt, case.generation), time_limit_s=time_limit
    )
    result = plan(inputs.to_problem(), time_limit)
    ours = result.predicted.throughput_tokens_per_s
    row = {
        "case": case.name,
        "model": case.model,
        "cluster": "+".join(f"{n}x{t}" for t, n in case.devices),
        "workload": f"{case.batch}x{case.prompt}+{case.generation}",
        "ours": ours,
        "solve_s": result.solve_seconds,
        "gap": result.optimality_gap,
        "bits": sorted({int(b) for b in result.plan.bits_per_layer}, reverse=True),
        "quality": result.predicted.quality,
        "pipeedge_quality": result.baselines["pipeedge"].predicted.quality
        if result.baselines["pipeedge"].feasible
        else None,
        "micro_batches": [result.plan.prefill_micro_batch, result.plan.decode_micro_batch],
    }
    for name in BASELINE_NAMES:
        b = result.baselines[name]
        row[name] = b.predicted.throughput_tokens_per_s if b.feasible else None
    row["vs_pipeedge"] = ours / row["pipeedge"] if row["pipeedge"] else None
    row["same_quality"] = row["same_quality_vs_pipeedge"] = None
    if row["pipeedge"]:  # ours again, held to PipeEdge's own summed indicator
        strict = plan(replace(inputs, quality=Quality(bound=row["pipeedge_quality"])).to_problem(), time_limit)
        row["same_quality"] = strict.predicted.throughput_tokens_per_s
        row["same_quality_vs_pipeedge"] = row["same_quality"] / row["pipeedge"]
        row["solve_s"] = max(row["solve_s"], strict.solve_seconds)
        row["gap"] = max(row["gap"], strict.optimality_gap)
    best_baseline = max((row[n] for n in BASELINE_NAMES if row[n]), default=None)
    row["vs_best_baseline"] = ours / best_baseline if best_baseline else None
    return row


def large_pool(devices: int, seed: int = 0) -> Cluster:
    """`devices` GPUs of the five LARGE_TYPES (each at least once), seeded; hosts of up to 8 of a type."""
    if devices < len(LARGE_TYPES):
        raise SystemExit(f"--large pools need at least {len(LARGE_TYPES)} devices (one of each type)")
    rng = random.Random(seed)
    counts = dict.fromkeys(LARGE_TYPES, 1)
    for _ in range(devices - len(LARGE_TYPES)):
        counts[rng.choice(LARGE_TYPES)] += 1
    entries = []
    for device_type, count in counts.items():
        for h in range(0, count, HOST_SIZE):
            host = f"{device_type.lower()}-h{h // HOST_SIZE}"
            entries.append(ClusterEntry(device_type, min(HOST_SIZE, count - h), name=host, host=host))
    return Cluster(tuple(entries))


def run_large(devices: int, seed: int, time_limit: float) -> dict:
    cluster = large_pool(devices, seed)
    counts = {t: sum(e.count for e in cluster.entries if e.device_type == t) for t in LARGE_TYPES}
    row = {"devices": devices, "seed": seed, "pool": " ".join(f"{n}x{t}" for t, n in counts.items()),
           "model": LARGE_MODEL, "hosts": len(cluster.entries)}
    inputs = PlanInputs(LARGE_MODEL, cluster, LARGE_WORKLOAD, time_limit_s=time_limit)
    started = time.monotonic()
    try:
        result = plan(inputs.to_problem(), time_limit)
    except PqmeshError as err:
        return row | {"error": str(err)}
    pipeedge = result.baselines["pipeedge"]
    row |= {"solve_s": result.solve_seconds, "wall_s": time.monotonic() - started, "gap": result.optimality_gap,
            "ours": result.predicted.throughput_tokens_per_s,
            "pipeedge": pipeedge.predicted.throughput_tokens_per_s if pipeedge.feasible else None,
            "bits": sorted({int(b) for b in result.plan.bits_per_layer}, reverse=True),
            "micro_batches": [result.plan.prefill_micro_batch, result.plan.decode_micro_batch]}
    row["vs_pipeedge"] = row["ours"] / row["pipeedge"] if row["pipeedge"] else None
    return row


def run_replicas(devices: int, seed: int, time_limit: float, batch: int) -> dict:
    """The pool as several pipelines (planner.replicas): the best replica count, its throughput and
    PipeEdge's on the same split."""
    cluster = large_pool(devices, seed)
    counts = {t: sum(e.count for e in cluster.entries if e.device_type == t) for t in LARGE_TYPES}
    row = {"devices": devices, "seed": seed, "pool": " ".join(f"{n}x{t}" for t, n in counts.items()),
           "model": LARGE_MODEL, "hosts": len(cluster.entries), "batch": batch}
    inputs = PlanInputs(LARGE_MODEL, cluster, replace(LARGE_WORKLOAD, batch_size=batch), time_limit_s=time_limit)
    started = time.monotonic()
    try:
        found = plan_replicas(inputs, time_limit=time_limit)
    except PqmeshError as err:
        return row | {"error": str(err)}
    best = found.best
    row |= {"solve_s": found.solve_seconds, "wall_s": time.monotonic() - started, "replicas": len(best.replicas),
            "stages": sorted({len(r.result.plan.stages) for r in best.replicas}), "gap": best.optimality_gap,
            "ours": best.throughput_tokens_per_s, "pipeedge": best.pipeedge_tokens_per_s,
            "tried": {r: (p.throughput_tokens_per_s if not isinstance(p, str) else p) for r, p in found.tried.items()}}
    row["vs_pipeedge"] = row["ours"] / row["pipeedge"] if row["pipeedge"] else None
    return row


def replicas_table(rows: list[dict]) -> str:
    head = ("| devices | pool (hosts) | batch | replicas (stages each) | solve s | wall s | gap (worst replica) "
            "| ours tok/s | pipeedge tok/s (same split) | ours/pipeedge | tok/s by replica count |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['pool']} ({r['hosts']}) | {r['batch']} | not planned: {r['error']} |")
            continue
        tried = ", ".join(f"{k}: {_fmt(v) if not isinstance(v, str) else 'none'}" for k, v in r["tried"].items())
        lines.append(f"| {r['devices']} | {r['pool']} ({r['hosts']}) | {r['batch']} | {r['replicas']} {r['stages']} | "
                     f"{r['solve_s']:.2f} | {r['wall_s']:.2f} | {r['gap']:.2%} | {r['ours']:.1f} | "
                     f"{_fmt(r['pipeedge'])} | {_fmt(r['vs_pipeedge'], '.2f')} | {tried} |")
    return "\n".join(lines)


def large_table(rows: list[dict]) -> str:
    head = ("| devices | pool (hosts) | solve s | wall s | gap | ours tok/s | pipeedge tok/s | ours/pipeedge "
            "| bits used | mb (prefill, decode) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['pool']} ({r['hosts']}) | - | - | - | - | - | - | - | "
                         f"not planned: {r['error']} |")
            continue
        lines.append(f"| {r['devices']} | {r['pool']} ({r['hosts']}) | {r['solve_s']:.2f} | {r['wall_s']:.2f} | "
                     f"{r['gap']:.2%} | {r['ours']:.1f} | {_fmt(r['pipeedge'])} | {_fmt(r['vs_pipeedge'], '.2f')} | "
                     f"{r['bits']} | {tuple(r['micro_batches'])} |")
    return "\n".join(lines)


def run_frontier(case: Case, time_limit: float, points: int) -> list[dict]:
    cluster = Cluster(tuple(ClusterEntry(t, n, host=f"{t.lower()}-host") for t, n in case.devices))
    problem = PlanInputs(case.model, cluster, Workload(case.batch, case.prompt, case.generation)).to_problem()
    started = time.monotonic()
    points_ = quality_frontier(problem, time_limit, points)
    seconds = time.monotonic() - started
    pipeedge = all_baselines(problem)["pipeedge"]
    rows = []
    for f in points_:
        r = f.result
        rows.append({"case": case.name, "model": case.model, "cluster": "+".join(f"{n}x{t}" for t, n in case.devices),
                     "bound": f.quality_bound, "ours": r.predicted.throughput_tokens_per_s if r else None,
                     "quality": r.predicted.quality if r else None, "gap": r.optimality_gap if r else None,
                     "bits": sorted({int(b) for b in r.plan.bits_per_layer}, reverse=True) if r else None,
                     "pipeedge": pipeedge.predicted.throughput_tokens_per_s if pipeedge.feasible else None,
                     "pipeedge_quality": pipeedge.predicted.quality if pipeedge.feasible else None,
                     "frontier_s": seconds, "reason": f.reason})
    return rows


def frontier_table(rows: list[dict]) -> str:
    head = ("| # | model | cluster | quality bound | ours tok/s | quality | bits used | gap | pipeedge tok/s "
            "(quality) | ours/pipeedge | frontier s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r["ours"] / r["pipeedge"] if r["ours"] and r["pipeedge"] else None
        pe = f"{_fmt(r['pipeedge'])} ({_fmt(r['pipeedge_quality'], '.4f')})"
        lines.append(f"| {r['case']} | {r['model']} | {r['cluster']} | {r['bound']:.4g} | {_fmt(r['ours'])} | "
                     f"{_fmt(r['quality'], '.4f')} | {r['bits'] or r['reason']} | {_fmt(r['gap'], '.3f')} | {pe} | "
                     f"{_fmt(ratio, '.2f')} | {r['frontier_s']:.2f} |")
    return "\n".join(lines)


def _fmt(value, spec: str = ".1f") -> str:
    return "OOM" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| # | model | cluster | workload | ours tok/s | pipeedge | uniform_int8 | uniform_int4 | adabits "
            "| ours/pipeedge | ours/best baseline | bits used | mb (prefill, decode) | quality ours / pipeedge "
            "| ours at pipeedge's quality | (ratio) | gap | solve s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['model']} | {r['cluster']} | {r['workload']} | {_fmt(r['ours'])} | "
            + " | ".join(_fmt(r[n]) for n in BASELINE_NAMES)
            + f" | {_fmt(r['vs_pipeedge'], '.2f')} | {_fmt(r['vs_best_baseline'], '.2f')} | {r['bits']} | "
            f"{tuple(r['micro_batches'])} | {r['quality']:.3f} / {_fmt(r['pipeedge_quality'], '.3f')} | "
            f"{_fmt(r['same_quality'])} | {_fmt(r['same_quality_vs_pipeedge'], '.2f')} | "
            f"{r['gap']:.3f} | {r['solve_s']:.2f} |"
        )
    ratios = [r["vs_pipeedge"] for r in rows if r["vs_pipeedge"]]
    if ratios:
        same = [r["same_quality_vs_pipeedge"] for r in rows if r["same_quality_vs_pipeedge"]]
        lines.append(
            f"\nours/pipeedge over {len(ratios)} clusters where PipeEdge fits: mean {statistics.mean(ratios):.2f}x, "
            f"max {max(ratios):.2f}x (default bound); at PipeEdge's quality: mean {statistics.mean(same):.2f}x, "
            f"max {max(same):.2f}x; slowest solve {max(r['solve_s'] for r in rows):.2f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=10.0,
                        help="solver limit per cluster, seconds (--frontier: for all of one cluster's solves)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cluster instead of the table")
    parser.add_argument("--large", type=int, nargs="+", metavar="N",
                        help="plan seeded pools of N devices of 5 GPU types (OPT-175B) instead of the 11 clusters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --large pools (default 0)")
    parser.add_argument("--replicas", action="store_true",
                        help="--large: plan each pool as several pipelines (planner.replicas); --time-limit "
                             "bounds the whole search")
    parser.add_argument("--batch", type=int, default=0, help="--large --replicas: the job's batch (default 64)")
    parser.add_argument("--frontier", nargs="+", metavar="CASE", choices=[c.name for c in CASES],
                        help="print the throughput-quality frontier of these clusters instead")
    parser.add_argument("--points", type=int, default=5, help="plans on each --frontier (default 5)")
    args = parser.parse_args(argv)
    configure("warning")
    rows = []
    if args.frontier:
        for case in (c for c in CASES if c.name in args.frontier):
            rows.extend(run_frontier(case, args.time_limit, args.points))
            if args.json:
                sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows[-args.points:]))
        if not args.json:
            sys.stdout.write(frontier_table(rows) + "\n")
        return 0
    if args.large:
        for n in args.large:
            batch = args.batch or LARGE_WORKLOAD.batch_size
            rows.append(run_replicas(n, args.seed, args.time_limit, batch) if args.replicas
                        else run_large(n, args.seed, args.time_limit))
            if args.json:
                sys.stdout.write(json.dumps(rows[-1]) + "\n")
        if not args.json:
            sys.stdout.write((replicas_table(rows) if args.replicas else large_table(rows)) + "\n")
        return 0
    for case in CASES:
        rows.append(run_case(case, args.time_limit))
        if args.json:
            sys.stdout.write(json.dumps(rows[-1]) + "\n")
    if not args.json:
        sys.stdout.write(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
