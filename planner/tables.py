"""Integer coefficient tables for the solver, and solver answers turned back into plans.

For one device order this computes, from the cost model in `planner.problem`, every per-layer time
(per stage, bitwidth, micro-batch candidate and decode segment), link times, memory budgets and
scaled quality indicators as integers (`planner.solver_ortools.OrderInput`).
"""

from __future__ import annotations

import math

from planner.cluster import Device
from planner.memory import embedding_bytes, head_bytes, logits_bytes, stage_workspace_bytes, temp_activation_bytes
from planner.problem import Problem, head_cost, layer_bytes, layer_cost, link_times
from planner.solver_ortools import TIME_SCALE, OrderInput
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.types import Bits, Phase

MAX_UNITS = 24  # per-layer model: at most this many layer groups


def micro_batch_candidates(batch: int, limit: int = 10) -> tuple[int, ...]:
    """Divisors of the global batch (so every micro-batch is full); thinned to powers of two and
    batch / k for small k when there are many."""
    small = [d for d in range(1, math.isqrt(batch) + 1) if batch % d == 0]  # O(sqrt(batch)): batches may be huge
    divisors = sorted({*small, *(batch // d for d in small)})
    if len(divisors) > limit:
        keep = {d for d in divisors if d & (d - 1) == 0} | {batch // k for k in range(1, 9) if batch % k == 0}
        divisors = sorted(keep)
    return tuple(divisors)


def _t(seconds: float) -> int:
    return int(round(seconds * TIME_SCALE))


def unit_sizes(num_layers: int, max_units: int = MAX_UNITS) -> tuple[int, ...]:
    """Consecutive layer groups of near-equal size, at most `max_units` of them."""
    count = min(num_layers, max_units)
    bounds = [round(i * num_layers / count) for i in range(count + 1)]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


class QualityScale:
    """Indicator values as integers: value x scale, rounded; bounds get the rounding slack."""

    def __init__(self, problem: Problem) -> None:
        ind = problem.indicator
        top = max((ind.value(li, b) for li in range(ind.num_layers) for b in problem.allowed_bits), default=0.0)
        self.scale = 1e9 / top if top > 0 else 1.0
        self.problem = problem

    def value(self, seconds_or_value: float) -> int:
        return int(round(seconds_or_value * self.scale))

    def bound(self, units: int) -> int | None:
        b = self.problem.quality.bound
        return None if b is None else math.floor(b * self.scale + units / 2)


def budgets(problem: Problem, order: list[Device], sizes: tuple[int, ...], phase: Phase) -> tuple:
    """Bytes left for layers (weights + KV) per stage and micro-batch size: capacity minus the
    device's reserve, embeddings/head, the phase's largest activation and the dequantization
    workspace (that of the allowed bits needing the most: conservative for stages that use fewer)."""
    shape, w, e = problem.shape, problem.workload, problem.element
    workspace = stage_workspace_bytes(shape, problem.allowed_bits, e)
    out = []
    for i, device in enumerate(order):
        first, last = i == 0, i == len(order) - 1
        fixed = (embedding_bytes(shape, e) if first else 0) + (head_bytes(shape, first, e) if last else 0)
        row = []
        for b in sizes:
            new = w.prompt_length if phase == Phase.PREFILL else 1
            context = w.prompt_length if phase == Phase.PREFILL else w.max_context
            temp = temp_activation_bytes(shape, b, new, context, e) + (logits_bytes(shape, b) if last else 0)
            row.append(problem.capacity(device) - problem.reserve(device) - fixed - temp - workspace)
        out.append(tuple(row))
    return tuple(out)


def build_input(problem: Problem, order: list[Device], prefill_sizes: tuple[int, ...], decode_sizes: tuple[int, ...],
                per_layer: bool, relaxed_indicator: bool = False) -> OrderInput:
    """The solver's tables for `order`. `relaxed_indicator`: count model in which each layer keeps its
    own indicator but is not tied to a stage (a lower bound when indicators differ by layer)."""
    common = _time_and_memory_tables(problem, order, prefill_sizes, decode_sizes)
    shape, bits = problem.shape, problem.allowed_bits
    qs, ind, theta = QualityScale(problem), problem.indicator, problem.quality.theta
    bounded = problem.quality.bound is not None
    common["quality_bound"] = qs.bound(shape.num_layers)
    if per_layer and not relaxed_indicator:
        sizes = unit_sizes(shape.num_layers)
        starts = [sum(sizes[:u]) for u in range(len(sizes))]
        unit_value = [[sum(ind.value(li, b) for li in range(a, a + n)) for b in bits] for a, n in zip(starts, sizes)]
        return OrderInput(
            **common,
            unit_sizes=sizes,
            unit_quality=tuple(tuple(qs.value(v) for v in row) for row in unit_value) if bounded else (),
            unit_theta=tuple(tuple(_t(theta * v) for v in row) for row in unit_value) if theta else (),
        )
    if relaxed_indicator:  # layers keep their own indicator but may sit anywhere
        rows = [[ind.value(li, b) for b in bits] for li in range(ind.num_layers)]
        return OrderInput(
            **common,
            free_quality=tuple(tuple(qs.value(v) for v in r) for r in rows) if bounded else (),
            free_theta=tuple(tuple(_t(theta * v) for v in r) for r in rows) if theta else (),
        )
    row = [ind.value(0, b) for b in bits]  # layer-uniform
    return OrderInput(**common, quality_per_bits=tuple(qs.value(v) for v in row) if bounded else (),
                      theta_per_bits=tuple(_t(theta * v) for v in row) if theta else ())


def _time_and_memory_tables(problem: Problem, order: list[Device], prefill_sizes: tuple[int, ...],
                            decode_sizes: tuple[int, ...]) -> dict:
    """The OrderInput fields that do not depend on the quality setting: costs, budgets, links, counts."""
    shape, s, bits, last = problem.shape, problem.workload.prompt_length, problem.allowed_bits, len(order) - 1
    segments, e = problem.segments(), problem.element
    pre_layer = tuple(
        tuple(
            tuple(_t(layer_cost(d.profile, shape, b, Phase.PREFILL, k, s, s, e)) for k in prefill_sizes) for b in bits
        )
        for d in order
    )
    pre_fixed = tuple(tuple(_t(head_cost(d.profile, shape, k, e)) if i == last else 0 for k in prefill_sizes)
                      for i, d in enumerate(order))
    dec_layer = tuple(
        tuple(
            tuple(tuple(_t(layer_cost(d.profile, shape, b, Phase.DECODE, k, s, ctx, e)) for _, ctx in segments)
                  for k in decode_sizes)
            for b in bits
        )
        for d in order
    )
    dec_fixed = tuple(tuple(tuple(_t(head_cost(d.profile, shape, k, e)) if i == last else 0 for _ in segments)
                            for k in decode_sizes) for i, d in enumerate(order))
    return dict(
        num_layers=shape.num_layers,
        stages=len(order),
        layer_bytes=tuple(layer_bytes(problem, b) for b in bits),
        prefill_counts=tuple(problem.micro_batches(k) for k in prefill_sizes),
        prefill_budget=budgets(problem, order, prefill_sizes, Phase.PREFILL),
        prefill_layer=pre_layer,
        prefill_fixed=pre_fixed,
        prefill_links=tuple(tuple(_t(t) for t in link_times(problem, order, Phase.PREFILL, k)) for k in prefill_sizes),
        decode_counts=tuple(problem.micro_batches(k) for k in decode_sizes),
        decode_budget=budgets(problem, order, decode_sizes, Phase.DECODE),
        decode_layer=dec_layer,
        decode_fixed=dec_fixed,
        decode_links=tuple(tuple(_t(t) for t in link_times(problem, order, Phase.DECODE, k)) for k in decode_sizes),
        segment_rounds=tuple(r for r, _ in segments),
    )


def arrange(problem: Problem, counts: list[list[int]]) -> list[list[Bits]]:
    """Bits per layer for each stage given counts per bitwidth: within a stage the layers most
    sensitive (largest indicator at the lowest allowed bits) get the highest bits."""
    bits, ind, lowest = problem.allowed_bits, problem.indicator, problem.allowed_bits[-1]
    out, start = [], 0
    for row in counts:
        size = sum(row)
        layers = sorted(range(start, start + size), key=lambda li: -ind.value(li, lowest))
        chosen = [b for b, n in zip(bits, row) for _ in range(n)]  # highest first
        per_layer = dict(zip(layers, chosen))
        out.append([per_layer[li] for li in range(start, start + size)])
        start += size
    return out


def plan_from_counts(problem: Problem, order: list[Device], counts, prefill_mb: int, decode_mb: int) -> PipelinePlan:
    return plan_from_bits(order, arrange(problem, [list(r) for r in counts]), prefill_mb, decode_mb)


def plan_from_units(problem: Problem, order: list[Device], units, prefill_mb: int, decode_mb: int) -> PipelinePlan:
    sizes = unit_sizes(problem.shape.num_layers)
    per_stage: list[list[Bits]] = [[] for _ in order]
    for (stage, b), n in zip(units, sizes):
        per_stage[stage].extend([problem.allowed_bits[b]] * n)
    return plan_from_bits(order, per_stage, prefill_mb, decode_mb)


def plan_from_bits(order: list[Device], per_stage: list[list[Bits]], prefill_mb: int, decode_mb: int) -> PipelinePlan:
    stages, start = [], 0
    for device, bits in zip(order, per_stage):
        stages.append(StagePlan(device.label, start, start + len(bits), tuple(bits)))
        start += len(bits)
    return PipelinePlan(tuple(stages), prefill_mb, decode_mb)


def counts_of(problem: Problem, plan: PipelinePlan) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(s.bits.count(b) for b in problem.allowed_bits) for s in plan.stages)

