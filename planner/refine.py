"""For workloads given as length histograms: the plan chosen by the whole-job replay.

The solver ranks plans with the closed-form pipeline model at one pair of lengths, which cannot see
what a distribution does under continuous refill: sequences finish at different times, a decode
micro-batch waits until that many are ready, prefills of new sequences cut into decode rounds. So
for a histogram workload `planner.search.plan` solves the closed form at several summaries of the
distribution (the means, the 90th percentiles, the longest lengths: `length_summaries`, each with
the distribution's KV cache), and `best_by_replay` keeps the candidate whose job `pqmesh.mesh_sim`
replays fastest (RANK_SEQUENCES of the job's sequences, on each plan's own cost model), after
re-choosing each candidate's micro-batch sizes the same way (coordinate descent: decode sizes, then
prefill sizes; a size is kept only if the plan still fits memory and the replay is faster).
Fixed-length workloads are left as the solver chose them (`planner.search.plan` calls this only for
histograms). Bounded by the request's deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import structlog

from planner.cluster import Workload
from planner.mesh_costs import job_seconds, mesh_cost
from planner.problem import Problem, evaluate
from planner.tables import micro_batch_candidates
from pqmesh.plan import PipelinePlan

log = structlog.get_logger(__name__)
RANK_SEQUENCES = 256


def _replay_seconds(problem: Problem, plan: PipelinePlan) -> float:
    """The job replayed on RANK_SEQUENCES of its sequences (inf when the plan does not fit)."""
    if not evaluate(problem, plan).feasible:
        return math.inf
    return job_seconds(problem, plan, mesh_cost(problem, plan), RANK_SEQUENCES)


def refine_micro_batches(problem: Problem, plan: PipelinePlan, deadline: float) -> PipelinePlan:
    """`plan` with the micro-batch sizes the replay finds fastest."""
    best, best_s = plan, _replay_seconds(problem, plan)
    first = best_s
    sizes = micro_batch_candidates(problem.workload.batch_size)
    for field in ("decode_micro_batch", "prefill_micro_batch"):
        for size in sizes:
            if time.monotonic() >= deadline:
                break
            if size == getattr(best, field):
                continue
            candidate = replace(best, **{field: size}, plan_id="", cost=None)
            seconds = _replay_seconds(problem, candidate)
            if seconds < best_s * (1 - 1e-6):
                best, best_s = candidate, seconds
    if best is not plan:
        log.info("micro_batches_refined", before=[plan.prefill_micro_batch, plan.decode_micro_batch],
                 after=[best.prefill_micro_batch, best.decode_micro_batch], replay_gain=round(first / best_s, 4))
    return best


def length_summaries(w: Workload) -> list[Workload]:
    """Fixed-length workloads standing for ``w``'s distribution at the 90th percentiles and at the
    longest lengths, each keeping ``w``'s KV cache per sequence (so a plan for one runs ``w``'s job)."""
    out = []
    for q in (0.9, 1.0):
        prompt = w.prompts.quantile(q) if w.prompts is not None else w.prompt_length
        gen = w.generations.quantile(q) if w.generations is not None else w.generation_length
        summary = Workload(w.batch_size, prompt, gen, kv_tokens=w.max_context)
        if summary not in out and (prompt, gen) != (w.prompt_length, w.generation_length):
            out.append(summary)
    return out


def best_by_replay(problem: Problem, candidates: list[PipelinePlan], deadline: float) -> PipelinePlan:
    """The candidate (micro-batches refined) whose replayed job is fastest; the first on a tie."""
    scored = []
    for plan in candidates:
        refined = refine_micro_batches(problem, plan, deadline)
        scored.append((_replay_seconds(problem, refined), len(scored), refined))
    seconds, index, best = min(scored, key=lambda t: t[:2])
    log.info("plan_chosen_by_replay", candidates=len(candidates), chosen=index,
             replay_s=[round(s, 3) for s, _, _ in scored])
    return best
