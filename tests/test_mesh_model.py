"""The whole-mesh cost model: the replay follows the coordinator's real scheduler micro-batch for
micro-batch, adds up exactly on one stage, agrees with the closed form where that is exact, and
travels inside plans (proto and plan file) from the planner to the coordinator."""

from __future__ import annotations

import json
import random

import pytest

from coordinator.scheduler import Scheduler, Sequence
from planner.cluster import Cluster, ClusterEntry, Network, Workload
from planner.request import PlanInputs
from planner.search import plan as solve
from pqmesh.mesh_cost import MeshCost, PhaseCost, StageCost
from pqmesh.mesh_sim import simulate
from pqmesh.plan import PipelinePlan


def _cost(stages: int, coordinator_s: float = 2e-3, hop_s: float = 1e-3) -> MeshCost:
    stage = StageCost(PhaseCost(4e-3, 1e-4, 2e-5, 1e-8), PhaseCost(3e-3, 2e-4, 0.0, 5e-7), hop_s, 1e9)
    return MeshCost((stage,) * stages, 256, coordinator_s, hop_s)


def _real_trace(prompts, max_new, slots, prefill, decode, in_flight, window=8):
    """Drives coordinator.scheduler.Scheduler; replies come back in send order (FIFO stages). Returns
    (phase, sequences) per micro-batch and the context lengths of every prefill's rows."""
    scheduler = Scheduler(slots, max(prompts) + max_new, prefill, decode, in_flight, window)
    for i, n in enumerate(prompts):
        scheduler.add(Sequence("job", i, tuple(range(1, n + 1)), max_new))
    trace, rows, pending = [], [], []

    def sent(batches):
        trace.extend((b.phase.name.lower(), len(b.sequences)) for b in batches)
        rows.extend(b.lengths for b in batches if b.phase.name == "PREFILL")
        pending.extend(batches)

    sent(scheduler.schedule())
    while pending:
        batch = pending.pop(0)
        result = scheduler.update(batch.id, batch.slots, [7] * len(batch.slots))
        scheduler.released(result.release)
        sent(scheduler.schedule())
    assert not scheduler.has_work()
    return trace, rows


@pytest.mark.parametrize("count, max_new, slots, prefill, decode, stages, window", [
    (64, 32, 64, 8, 32, 2, 8),   # the demo's shape: refill interleaves prefill with decode
    (20, 5, 8, 3, 4, 3, 8),      # more prompts than KV slots: continuous refill, partial waves
    (7, 4, 7, 2, 5, 1, 8),       # micro-batch sizes that do not divide the batch
    (40, 6, 12, 4, 4, 2, 1),     # FIFO prefill order
])
def test_replay_sends_the_micro_batches_the_scheduler_sends(count, max_new, slots, prefill, decode, stages, window):
    rng = random.Random(count)
    prompts = [rng.randint(3, 40) for _ in range(count)]
    result = simulate(_cost(stages), prompts, max_new, slots, prefill, decode, group_window=window)
    trace, rows = _real_trace(prompts, max_new, slots, prefill, decode, stages, window)
    assert list(result.trace) == trace
    assert list(result.prefill_rows) == rows  # the same prompts share each prefill (same padded widths)
    assert result.prefill_micro_batches == sum(1 for p, _ in result.trace if p == "prefill")


def test_one_stage_replay_adds_up_every_micro_batch():
    stage = StageCost(PhaseCost(0.01, 0.001, 1e-4, 0.0), PhaseCost(0.02, 0.002, 0.0, 1e-6), 0.0, 1e30)
    cost = MeshCost((stage,), 0, coordinator_s=0.005)
    prompts, max_new = [10, 10, 10, 10], 3
    result = simulate(cost, prompts, max_new, 4, 2, 4)
    # by hand: two prefills of 2 x 10 tokens, then two decode rounds of 4 sequences at keys 11 and 12
    prefill = 0.01 + 0.001 * 2 + 1e-4 * 20
    decodes = [0.02 + 0.002 * 4 + 1e-6 * 4 * keys for keys in (11, 12)]
    expected = 2 * (prefill + 0.005) + sum(d + 0.005 for d in decodes)
    assert result.trace == (("prefill", 2), ("prefill", 2), ("decode", 4), ("decode", 4))
    assert result.job_s == pytest.approx(expected, rel=1e-12)


def test_replay_matches_the_closed_form_where_that_is_exact():
    """One device, one micro-batch per phase, no coordinator cost: both models say the same."""
    inputs = PlanInputs("opt-13b", Cluster((ClusterEntry("V100-32G", 1),), Network()), Workload(8, 64, 16),
                        time_limit_s=5, coordinator_s=0.0)
    result = solve(inputs.to_problem(), 5)
    assert result.plan.cost is not None and result.predicted.job_s > 0
    closed = result.predicted.prefill_s + result.predicted.decode_s
    assert result.predicted.job_s == pytest.approx(closed, rel=0.02)
    for name, base in result.baselines.items():
        if base.feasible:
            assert base.plan.cost is not None and base.predicted.job_s > 0, name


def test_cost_travels_in_the_plan_proto_and_plan_file():
    plan = PipelinePlan.from_json(json.dumps({"stages": [
        {"device": "a", "layers": [0, 2], "bits": [16, 8], "address": "127.0.0.1:1"},
        {"device": "b", "layers": [2, 4], "bits": [4, 4], "address": "127.0.0.1:2"}],
        "prefill_micro_batch": 2, "decode_micro_batch": 4}))
    with_cost = PipelinePlan(plan.stages, 2, 4, cost=_cost(2))
    assert PipelinePlan.from_json(with_cost.to_json()) == with_cost
    assert PipelinePlan.from_proto(with_cost.to_proto()) == PipelinePlan(
        tuple(s.__class__(s.device, s.start, s.end, s.bits) for s in with_cost.stages), 2, 4, cost=_cost(2))
    assert with_cost.plan_id == plan.plan_id  # the cost is not part of the content
    with pytest.raises(Exception, match="describes 1 stages but the plan has 2"):
        PipelinePlan(plan.stages, 2, 4, cost=_cost(1))


def test_phase_cost_rejects_negative_terms():
    with pytest.raises(Exception, match=">= 0"):
        PhaseCost(-1.0)
