"""The solver finds the optimum of the cost model's objective: brute force over every device order,
layer split, bitwidth choice and micro-batch pair on small instances."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace

import pytest

from planner import latency as lat
from planner.cluster import Device, Network, Workload
from planner.devices import DeviceProfile, LatencyModel, Roofline
from planner.indicator import Indicator, Quality, default_indicator
from planner.memory import stage_memory
from planner.model_shapes import ModelShape
from planner.orders import all_orders, order_key, representative_orders
from planner.problem import CostConfig, Problem, evaluate, link_times, stage_seconds
from planner.search import plan
from planner.tables import micro_batch_candidates
from pqmesh.types import Bits, Phase

BITS = (Bits.B16, Bits.B8, Bits.B4)
SHAPE = ModelShape(name="tiny", family="opt", num_layers=8, hidden_size=256, intermediate_size=1024, num_heads=4,
                   num_kv_heads=4, head_dim=64, vocab_size=1000, max_positions=64, learned_positions=True)
NET = Network(bandwidth_gbps=1, latency_us=200)


def profile(name: str, slow: float, memory_mb: float) -> DeviceProfile:
    """Prefill: fixed cost + per token (dequantizing costs 20%); decode: weight read scales with bits."""
    models = []
    for b in BITS:
        dq = 1.0 if b == Bits.B16 else 1.2
        models.append(LatencyModel(b, Phase.PREFILL, ("const", "tokens"), (0.002 * slow * dq, 2e-4 * slow * dq)))
        models.append(
            LatencyModel(
                b, Phase.DECODE, ("const", "tokens*context"), (0.002 * slow * (int(b) / 16 + 0.1), 1e-6 * slow)
            )
        )
    return DeviceProfile(
        name, name, int(memory_mb * 2**20), Roofline(1e6, 1e9, 1.0, 1.0, 1.0, 0.0), tuple(models), "tiny"
    )


def problem(devices, quality: Quality, shape: ModelShape = SHAPE, indicator: Indicator | None = None) -> Problem:
    return Problem(shape, tuple(devices), NET, Workload(2, 8, 3), indicator or default_indicator(shape.num_layers),
                   quality, BITS, CostConfig(reserve_bytes=0))


def compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


class _Costs:
    """Memoized stage, link and memory pieces of one problem (keys are plain tuples: cheap to hash)."""

    def __init__(self, pb: Problem) -> None:
        self.pb, self.memo = pb, {}

    def _get(self, key, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def fits(self, i: int, order: tuple, bits: tuple, p: int, d: int) -> bool:
        dev, last = order[i], i == len(order) - 1
        return self._get(("mem", dev.label, i == 0, last, bits, p, d), lambda: stage_memory(
            self.pb.shape, self.pb.workload, list(bits), i == 0, last, p, d, 0).total <= dev.profile.memory_bytes)

    def stage(self, dev: Device, bits: tuple, last: bool, phase: Phase, size: int, context: float) -> float:
        return self._get(("t", dev.label, bits, last, phase, size, context),
                         lambda: stage_seconds(self.pb, dev, dict(Counter(bits)), last, phase, size, context))

    def links(self, order: tuple, phase: Phase, size: int) -> list:
        return self._get(
            ("l", tuple(d.label for d in order), phase, size), lambda: link_times(self.pb, list(order), phase, size)
        )

    def job_seconds(self, order: tuple, stages: list[tuple], p: int, d: int) -> float:
        """Prefill + decode seconds, composed here from the cost model's stage, link and pipeline pieces."""
        pb, last, s = self.pb, len(order) - 1, self.pb.workload.prompt_length
        pre = [self.stage(dev, st, i == last, Phase.PREFILL, p, s) for i, (dev, st) in enumerate(zip(order, stages))]
        total = lat.prefill_seconds(pre + self.links(order, Phase.PREFILL, p), pb.micro_batches(p))
        for rounds, context in pb.segments():
            dec = [
                self.stage(dev, st, i == last, Phase.DECODE, d, context)
                for i, (dev, st) in enumerate(zip(order, stages))
            ]
            total += rounds * lat.decode_round_seconds(dec + self.links(order, Phase.DECODE, d), pb.micro_batches(d))
        return total

    def best(self, order: tuple, stages: list[tuple], sizes) -> float:
        """Best job seconds over micro-batch pairs that fit memory (inf if none)."""
        best = float("inf")
        for p, d in itertools.product(sizes, repeat=2):
            if all(self.fits(i, order, s, p, d) for i, s in enumerate(stages)):
                best = min(best, self.job_seconds(order, stages, p, d))
        return best


def brute_force(pb: Problem) -> float:
    """Smallest objective over every permutation of the devices, split, bits per layer and micro-batch pair."""
    sizes, best, L = micro_batch_candidates(pb.workload.batch_size), float("inf"), pb.shape.num_layers
    theta, bound, costs = pb.quality.theta or 0.0, pb.quality.bound, _Costs(pb)
    for order in itertools.permutations(pb.devices):
        for split in compositions(L, len(order)):
            for bits in itertools.product(BITS, repeat=L):
                quality = pb.indicator.total(bits)
                if bound is not None and quality > bound * (1 + 1e-9):
                    continue
                stages, start = [], 0
                for n in split:
                    stages.append(tuple(sorted(bits[start:start + n])))
                    start += n
                best = min(best, costs.best(order, stages, sizes) + theta * quality)
    return best


def _uniform_brute_force(pb: Problem) -> float:
    """Same search, but layers are interchangeable: bit counts per stage instead of bits per layer."""
    sizes, best, L = micro_batch_candidates(pb.workload.batch_size), float("inf"), pb.shape.num_layers
    theta, bound, row, costs = pb.quality.theta or 0.0, pb.quality.bound, pb.indicator.row(0), _Costs(pb)
    for order in itertools.permutations(pb.devices):
        for split in compositions(L, len(order)):
            per_stage = [[c for c in itertools.product(range(n + 1), repeat=len(BITS)) if sum(c) == n] for n in split]
            for choice in itertools.product(*per_stage):
                quality = sum(n * row[b] for c in choice for n, b in zip(c, BITS))
                if bound is not None and quality > bound * (1 + 1e-9):
                    continue
                stages = [tuple(sorted(b for n, b in zip(c, BITS) for _ in range(n))) for c in choice]
                best = min(best, costs.best(order, stages, sizes) + theta * quality)
    return best


MIXED = [
    Device("a", profile("a", 1.0, 2.5), "h1"),
    Device("b", profile("b", 1.6, 5.0), "h1"),
    Device("c", profile("c", 1.2, 3.0), "h2"),
]
TWINS = [
    Device("a:0", profile("a", 1.0, 2.5), "h1"),
    Device("a:1", profile("a", 1.0, 2.5), "h1"),
    Device("c", profile("c", 1.3, 4.0), "h2"),
]


def _check(pb: Problem, brute: float) -> None:
    result = plan(pb, time_limit=20)
    ev = evaluate(pb, result.plan)
    assert ev.feasible
    assert ev.objective == pytest.approx(brute, rel=1e-4)  # the tables round times to 1e-7 s
    assert ev.objective >= brute * (1 - 1e-9)
    assert result.optimality_gap == 0.0


@pytest.mark.parametrize("devices", [MIXED, TWINS], ids=["three-kinds", "identical-pair"])
@pytest.mark.parametrize("quality", [Quality(bound=0.4), Quality(theta=0.05)], ids=["bound", "theta"])
def test_solver_matches_brute_force(devices, quality):
    pb = problem(devices, quality)
    brute = _uniform_brute_force(pb)
    assert brute < float("inf")
    _check(pb, brute)


def test_instance_is_not_trivial():
    """The optimum mixes bitwidths and the best order beats the worst by a margin."""
    pb = problem(MIXED, Quality(bound=0.4))
    result = plan(pb, time_limit=20)
    assert len(set(result.plan.bits_per_layer)) > 1
    assert not evaluate(
        pb,
        replace(
            result.plan,
            stages=tuple(replace(s, bits=(Bits.B16,) * len(s.bits)) for s in result.plan.stages),
            plan_id="x",
        ),
    ).fits


def test_per_layer_indicator_matches_brute_force():
    rng = random.Random(7)
    shape = replace(SHAPE, num_layers=6)
    rows = tuple({Bits.B16: 0.0, Bits.B8: rng.uniform(0.001, 0.02), Bits.B4: rng.uniform(0.05, 0.4)} for _ in range(6))
    pb = problem(MIXED, Quality(bound=0.35), shape, Indicator(rows, model="tiny", kind="variance"))
    _check(pb, brute_force(pb))


def test_representative_orders_cover_every_cost_class():
    keys = {order_key(o) for o in all_orders(tuple(MIXED))}
    reps = representative_orders(tuple(MIXED), NET)
    # one per (first kind, last kind), each with the fewest host crossings of its class
    assert {(k[0], k[1]) for k in keys} == {(order_key(o)[0], order_key(o)[1]) for o in reps}
    for o in reps:
        assert order_key(o)[2] == min(k[2] for k in keys if k[:2] == order_key(o)[:2])
    assert len(all_orders(tuple(TWINS))) == 3  # a:0 and a:1 are interchangeable


@pytest.mark.parametrize("workload", [Workload(1, 1, 1), Workload(3, 7, 2), Workload(6, 4, 1)])
def test_edge_workloads(workload):
    """One sequence, one token, odd batch sizes, no decode rounds at all."""
    pb = replace(problem(MIXED, Quality(theta=0.0)), workload=workload)
    result = plan(pb, time_limit=10)
    assert evaluate(pb, result.plan).feasible
    assert workload.batch_size % result.plan.prefill_micro_batch == 0
    if workload.generation_length == 1:
        assert result.predicted.decode_s == 0.0
