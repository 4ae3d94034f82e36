"""Planning for the job's length distribution vs for one pair of lengths, on the LLM-PQ clusters.

A ShareGPT-like job (log-normal prompt and generation lengths, seeded; medians 180 / 96 tokens,
long tails cut at 1,024 / 256, binned up to multiples of 16) of ``--sequences`` sequences runs
on ``--batch`` KV slots. Three plans per cluster, every one judged by the same whole-job replay
(`planner.mesh_costs.job_seconds`: all the job's sequences, each to its own max_new_tokens, on the
plan's own cost model) over the real distribution:

- ``histogram``: planned from the histograms (`Workload.prompts` / `generations`);
- ``longest``: planned for every prompt and generation at the longest length (what one safe
  ``--prompt-len`` / ``--gen-len`` pair must say: same KV cache, costs at the worst case);
- ``p90``: planned for the 90th percentiles as one pair, with the KV cache still for the longest
  (``kv_tokens``), so the plan runs the same job.

Prints tokens/s of each (generated tokens of the job / replayed job seconds), the ratio histogram /
longest and histogram / p90, the micro-batch sizes and bits each chose, and solve seconds.

Run: ``python bench/planner_lengths.py [--cases 3 5 9] [--batch 16] [--sequences 4000] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

from planner_clusters import CASES

from planner.cluster import Cluster, ClusterEntry, Workload
from planner.mesh_costs import job_seconds, mesh_cost
from planner.request import PlanInputs
from planner.search import plan
from pqmesh.errors import PqmeshError
from pqmesh.lengths import LengthHistogram
from pqmesh.log import configure


def sharegpt_like(sequences: int, seed: int = 0) -> tuple[LengthHistogram, LengthHistogram]:
    """(prompt, generation) histograms of a seeded log-normal job, lengths binned up to multiples of 16."""
    rng = random.Random(seed)

    def draw(median: float, sigma: float, cap: int) -> int:
        n = min(cap, max(1, round(median * math.exp(rng.gauss(0.0, sigma)))))
        return min(cap, 16 * math.ceil(n / 16))

    prompts = [draw(180, 0.9, 1024) for _ in range(sequences)]
    generations = [draw(96, 0.8, 256) for _ in range(sequences)]
    return LengthHistogram.from_lengths(prompts), LengthHistogram.from_lengths(generations)


def _one(name: str, model: str, cluster: Cluster, workload: Workload, judge, time_limit: float) -> dict:
    started = time.monotonic()
    try:
        result = plan(PlanInputs(model, cluster, workload, time_limit_s=time_limit).to_problem(), time_limit)
    except PqmeshError as err:
        return {"plan": name, "error": str(err).splitlines()[0][:160]}
    seconds = job_seconds(judge, result.plan, mesh_cost(judge, result.plan))
    tokens = sum(judge.workload.generation_sample(judge.workload.job_sequences))
    return {"plan": name, "tokens_per_s": tokens / seconds, "job_s": seconds,
            "micro_batches": [result.plan.prefill_micro_batch, result.plan.decode_micro_batch],
            "bits": sorted({int(b) for b in result.plan.bits_per_layer}, reverse=True),
            "solve_s": round(time.monotonic() - started, 2)}


def run_case(case, batch: int, prompts: LengthHistogram, generations: LengthHistogram, time_limit: float) -> dict:
    cluster = Cluster(tuple(ClusterEntry(t, n, host=f"{t.lower()}-host") for t, n in case.devices))
    hist = Workload(batch, prompts=prompts, generations=generations)
    judge = PlanInputs(case.model, cluster, hist).to_problem()
    kv = hist.max_context
    plans = [_one("histogram", case.model, cluster, hist, judge, time_limit),
             _one("longest", case.model, cluster, Workload(batch, prompts.longest, generations.longest), judge,
                  time_limit),
             _one("p90", case.model, cluster, Workload(batch, prompts.quantile(0.9), generations.quantile(0.9),
                                                        kv_tokens=kv), judge, time_limit)]
    row = {"case": case.name, "model": case.model, "cluster": "+".join(f"{n}x{t}" for t, n in case.devices),
           "plans": plans}
    ours = plans[0].get("tokens_per_s")
    for other in plans[1:]:
        if ours and other.get("tokens_per_s"):
            row[f"vs_{other['plan']}"] = ours / other["tokens_per_s"]
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'case':<5}{'model':<11}{'cluster':<22}{'plan':<10}{'tokens/s':>9}{'mb p/d':>9}  {'bits':<10}"
            f"{'solve s':>8}")
    out = [head, "-" * len(head)]
    for row in rows:
        for p in row["plans"]:
            if "error" in p:
                out.append(f"{row['case']:<5}{row['model']:<11}{row['cluster']:<22}{p['plan']:<10}  {p['error']}")
                continue
            mb = "/".join(map(str, p["micro_batches"]))
            bits = ",".join(map(str, p["bits"]))
            out.append(f"{row['case']:<5}{row['model']:<11}{row['cluster']:<22}{p['plan']:<10}"
                       f"{p['tokens_per_s']:>9.1f}{mb:>9}  {bits:<10}{p['solve_s']:>8.2f}")
        ratios = ", ".join(f"histogram / {k[3:]} {v:.2f}x" for k, v in row.items() if k.startswith("vs_"))
        out.append(f"{'':<38}{ratios}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1", "3", "5", "6", "7", "9"], choices=[c.name for c in CASES])
    parser.add_argument("--batch", type=int, default=16, help="KV slots (sequences planned together)")
    parser.add_argument("--sequences", type=int, default=4000, help="sequences in the job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    configure("warning")
    prompts, generations = sharegpt_like(args.sequences, args.seed)
    print(f"job: {args.sequences} sequences on {args.batch} KV slots; prompts mean {prompts.mean:.0f} "
          f"(p90 {prompts.quantile(0.9)}, longest {prompts.longest}), generations mean {generations.mean:.0f} "
          f"(p90 {generations.quantile(0.9)}, longest {generations.longest})")
    rows = [run_case(c, args.batch, prompts, generations, args.time_limit) for c in CASES if c.name in args.cases]
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
