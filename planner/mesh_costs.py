"""The whole-mesh prediction: a plan's `pqmesh.mesh_cost.MeshCost` from the cost model, and the job
time `pqmesh.mesh_sim` replays with it (`Prediction.job_s`, for the plan and every feasible baseline).

Per stage and phase the time of one micro-batch is made linear in (sequences, new tokens, new tokens
x keys): fitted latency models already are (their coefficients are summed over the stage's layers);
roofline layers and the LM head are replaced by the secant through micro-batches of 1 (2) and the
planned size at the planned lengths. Hops take the network's latency and bandwidth (intra-host
figures from `pqmesh profile link` when the cluster file carries them); the coordinator is assumed on
the first stage's host; its turn-around per reply is `Problem.cost.coordinator_s`.

The solver still ranks plans with the closed-form pipeline model (`planner.latency`); the replay is
what a job is expected to take on the mesh, and what each job's measured time is compared with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from planner.cluster import Device
from planner.latency import head_seconds, layer_seconds
from planner.plans import Baseline, PlanResult, Prediction
from planner.problem import Problem
from pqmesh.mesh_cost import MeshCost, PhaseCost, StageCost
from pqmesh.mesh_sim import simulate
from pqmesh.plan import PipelinePlan
from pqmesh.types import Bits, Phase

_TERMS = {"const": "const_s", "batch": "per_sequence_s", "tokens": "per_token_s", "tokens*context": "per_token_key_s"}


def _secant(fn, size: int, tokens_per_row: int, field: str) -> PhaseCost:
    """const + slope x (rows or tokens) through fn(1 row) and fn(size rows) (2 rows when size is 1)."""
    other = max(size, 2)
    low, high = fn(1), fn(other)
    units = tokens_per_row if field == "per_token_s" else 1
    slope = max(0.0, (high - low) / ((other - 1) * units))
    return PhaseCost(**{"const_s": max(0.0, low - slope * units), field: slope})


def _layer_cost(problem: Problem, device: Device, bits: Bits, phase: Phase, size: int, context: float) -> PhaseCost:
    fitted = device.profile.fitted(problem.shape, bits, phase)
    if fitted is not None:
        return PhaseCost(**{_TERMS[f]: max(0.0, c) for f, c in zip(fitted.features, fitted.coefficients)})
    s = problem.workload.prompt_length
    new = s if phase == Phase.PREFILL else 1
    return _secant(lambda b: layer_seconds(device.profile, problem.shape, bits, phase, b, s, int(context),
                                           problem.element), size, new, "per_token_s")


def phase_cost(problem: Problem, device: Device, counts: dict, last: bool, phase: Phase, size: int) -> PhaseCost:
    """One micro-batch through a stage holding counts[bits] layers (+ the head if last), as a PhaseCost."""
    w = problem.workload
    context = w.prompt_length if phase == Phase.PREFILL else w.prompt_length + w.generation_length / 2
    total = PhaseCost()
    for bits, n in counts.items():
        layer = _layer_cost(problem, device, bits, phase, size, context)
        total = total.plus(PhaseCost(*(n * v for v in layer.__dict__.values())))
    if last:
        total = total.plus(_secant(lambda b: head_seconds(device.profile, problem.shape, b, problem.element),
                                   size, 1, "per_sequence_s"))
    return total


def mesh_cost(problem: Problem, plan: PipelinePlan) -> MeshCost:
    order = [problem.device(s.device) for s in plan.stages]
    net = problem.network
    stages = []
    for i, (stage, device) in enumerate(zip(plan.stages, order)):
        counts = dict(Counter(stage.bits))
        last = i == len(order) - 1
        nxt = order[0] if last else order[i + 1]  # the last hop carries token ids back to the coordinator
        same = nxt.host == device.host
        gbps = net.intra_host_bandwidth_gbps if same else net.bandwidth_gbps
        stages.append(StageCost(phase_cost(problem, device, counts, last, Phase.PREFILL, plan.prefill_micro_batch),
                                phase_cost(problem, device, counts, last, Phase.DECODE, plan.decode_micro_batch),
                                net.link_seconds(0, same), gbps * 1e9 / 8))
    return MeshCost(tuple(stages), problem.shape.hidden_size * problem.element, problem.cost.coordinator_s,
                    net.link_seconds(0, True))


REPLAY_SEQUENCES = 1024  # a job with more (a histogram's total) replays this many and scales the time


def job_seconds(problem: Problem, plan: PipelinePlan, cost: MeshCost, sequences: int = REPLAY_SEQUENCES) -> float:
    """The whole job replayed: `batch_size` KV slots, continuously refilled; with length histograms the
    job's sequences (at most ``sequences`` of them, drawn in proportion, the time scaled up)."""
    w = problem.workload
    n = min(w.job_sequences, sequences)
    seconds = simulate(cost, w.prompt_sample(n), w.generation_sample(n), w.batch_size,
                       plan.prefill_micro_batch, plan.decode_micro_batch).job_s
    return seconds * w.job_sequences / n


def _with_cost(problem: Problem, plan: PipelinePlan, predicted: Prediction) -> tuple[PipelinePlan, Prediction]:
    cost = mesh_cost(problem, plan)
    return replace(plan, cost=cost), replace(predicted, job_s=job_seconds(problem, plan, cost))


def with_mesh_costs(problem: Problem, result: PlanResult) -> PlanResult:
    """The answer with every plan's MeshCost attached and every prediction's whole-mesh job time."""
    plan, predicted = _with_cost(problem, result.plan, result.predicted)
    baselines = {}
    for name, base in result.baselines.items():
        if base.feasible and base.plan is not None:
            base_plan, base_predicted = _with_cost(problem, base.plan, base.predicted)
            base = Baseline(True, base_predicted, base_plan, base.reason)
        baselines[name] = base
    return replace(result, plan=plan, predicted=predicted, baselines=baselines)
