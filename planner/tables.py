"""Integer coefficient tables for the solver, and solver answers turned back into plans.

For one device order this computes, from the cost model in `planner.problem`, every per-layer time
(per stage, bitwidth, micro-batch candidate and decode segment), link times, memory budgets and
scaled quality indicators as integers (`planner.solver_ortools.OrderInput`).
"""

from __future__ import annotations

import functools
import math

from planner import latency as lat
from planner.cluster import Device
from planner.memory import embedding_bytes, head_bytes, logits_bytes, temp_activation_bytes, workspace_bytes
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
    """Bytes left for layers (weights + KV) and the stage's dequantization workspace, per stage and
    micro-batch size: capacity minus the device's reserve, embeddings/head and the phase's largest
    activation. The workspace depends on the widths a stage uses (`workspaces`): callers subtract it."""
    last = len(order) - 1
    return tuple(device_budgets(problem, d, i == 0, i == last, tuple(sizes), phase) for i, d in enumerate(order))


def device_budgets(problem: Problem, device: Device, first: bool, last: bool, sizes: tuple[int, ...],
                   phase: Phase) -> tuple[int, ...]:
    """`budgets` of one device at a position (first and/or last stage or neither), per size."""
    return _device_budgets(problem.shape, problem.workload, problem.element,
                           problem.capacity(device) - problem.reserve(device), first, last, sizes, phase)


def workspaces(problem: Problem) -> tuple[int, ...]:
    """The dequantization workspace a stage holds when its widest-buffer layer is at each allowed width."""
    return tuple(workspace_bytes(problem.shape, b, problem.element) for b in problem.allowed_bits)


@functools.lru_cache(maxsize=16384)
def _device_budgets(shape, workload, e: int, usable: int, first: bool, last: bool,
                    sizes: tuple[int, ...], phase: Phase) -> tuple[int, ...]:
    fixed = (embedding_bytes(shape, e) if first else 0) + (head_bytes(shape, first, e) if last else 0)
    new = workload.max_prompt_length if phase == Phase.PREFILL else 1  # memory: the longest prompt
    context = workload.max_prompt_length if phase == Phase.PREFILL else workload.max_context
    return tuple(usable - fixed - temp_activation_bytes(shape, b, new, context, e)
                 - (logits_bytes(shape, b) if last else 0) for b in sizes)


def stage_classes(order: list[Device]) -> tuple[int, ...]:
    """Interchangeable stages of the count model share a class (the index of its first stage): middle
    stages (neither first nor last) with the same profile. First and last stand alone."""
    first_of: dict = {}
    out = []
    for i, d in enumerate(order):
        if i in (0, len(order) - 1):
            out.append(i)
        else:
            out.append(first_of.setdefault(d.profile, i))
    return tuple(out)


def build_input(problem: Problem, order: list[Device], prefill_sizes: tuple[int, ...], decode_sizes: tuple[int, ...],
                per_layer: bool, relaxed_indicator: bool = False, grouped: bool = False,
                cache: dict | None = None) -> OrderInput:
    """The solver's tables for `order`. `relaxed_indicator`: count model in which each layer keeps its
    own indicator but is not tied to a stage (a lower bound when indicators differ by layer).
    `grouped` (count models only): one stage per class of interchangeable stages, with its
    multiplicity, for the LP bound. `cache`: per-device tables shared between calls of one problem."""
    if grouped and per_layer and not relaxed_indicator:
        raise ValueError("the unit model cannot be grouped")
    classes = stage_classes(order)
    stages, multiplicity = list(range(len(order))), ()
    if grouped:
        stages = sorted(set(classes))
        multiplicity = tuple(classes.count(c) for c in stages)
    common = _time_and_memory_tables(problem, order, stages, prefill_sizes, decode_sizes, cache)
    if grouped:
        common["multiplicity"] = multiplicity
    elif not per_layer:
        common["stage_class"] = classes
    return _with_quality(problem, common, per_layer, relaxed_indicator)


def _with_quality(problem: Problem, common: dict, per_layer: bool, relaxed_indicator: bool) -> OrderInput:
    """`common` (times, budgets, links) plus the quality tables of the model asked for."""
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


def pool_input(problem: Problem, sizes: tuple[int, ...], relaxed_indicator: bool = False,
               cache: dict | None = None) -> OrderInput:
    """A relaxation valid for every device order at once, one row per profile with its multiplicity:
    every device gets a middle stage's budget (no embeddings or head to hold), the LM head costs the
    cheapest device's time as one more serial resource, and every link takes the cheaper of an
    intra-host and a network hop. Its LP optimum for a micro-batch pair bounds that pair in every
    order, so the search refines pairs into orders only while this bound beats the incumbent."""
    reps: dict = {}
    for d in problem.devices:
        reps.setdefault(d.profile, [d, 0])[1] += 1
    devices, cache = [d for d, _ in reps.values()], {} if cache is None else cache
    for d in devices:
        key = (d.profile, False, False, sizes, sizes)
        if key not in cache:
            cache[key] = _device_tables(problem, d, False, False, sizes, sizes)
    column = [tuple(cache[(d.profile, False, False, sizes, sizes)][j] for d in devices) for j in range(6)]
    shape, e, net, count = problem.shape, problem.element, problem.network, len(problem.devices)

    def links(phase: Phase, k: int) -> tuple[int, ...]:
        new = problem.prefill_length(k) if phase == Phase.PREFILL else 1
        hop = lat.activation_bytes(shape, k, new, e)
        out = [min(net.link_seconds(hop, True), net.link_seconds(hop, False))] * (count - 1)
        if phase == Phase.DECODE and count > 1:
            ret = lat.return_bytes(k)
            out.append(min(net.link_seconds(ret, True), net.link_seconds(ret, False)))
        out.append(min(head_cost(d.profile, shape, k, e) for d in devices))  # the head, wherever it runs
        return tuple(_t(t) for t in out)

    common = dict(
        num_layers=shape.num_layers, stages=len(devices),
        layer_bytes=tuple(layer_bytes(problem, b) for b in problem.allowed_bits), workspace=workspaces(problem),
        prefill_counts=tuple(problem.micro_batches(k) for k in sizes), prefill_budget=column[4],
        prefill_layer=column[0], prefill_fixed=column[1],
        prefill_links=tuple(links(Phase.PREFILL, k) for k in sizes),
        decode_counts=tuple(problem.micro_batches(k) for k in sizes), decode_budget=column[5],
        decode_layer=column[2], decode_fixed=column[3], decode_links=tuple(links(Phase.DECODE, k) for k in sizes),
        segment_rounds=tuple(r for r, _ in problem.segments()), multiplicity=tuple(n for _, n in reps.values()),
    )
    return _with_quality(problem, common, per_layer=False, relaxed_indicator=relaxed_indicator)


def _device_tables(problem: Problem, device: Device, first: bool, last: bool, prefill_sizes: tuple[int, ...],
                   decode_sizes: tuple[int, ...]) -> tuple:
    """(prefill per layer [b][k], prefill fixed [k], decode per layer [b][k][q], decode fixed [k][q],
    prefill budget [k], decode budget [k]) of one device at one position kind."""
    shape, s, bits, e = problem.shape, problem.workload.prompt_length, problem.allowed_bits, problem.element
    segments, pad = problem.segments(), problem.prefill_length
    pre_layer = tuple(
        tuple(_t(layer_cost(device.profile, shape, b, Phase.PREFILL, k, pad(k), pad(k), e)) for k in prefill_sizes)
        for b in bits
    )
    pre_fixed = tuple(_t(head_cost(device.profile, shape, k, e)) if last else 0 for k in prefill_sizes)
    dec_layer = tuple(
        tuple(tuple(_t(layer_cost(device.profile, shape, b, Phase.DECODE, k, s, ctx, e)) for _, ctx in segments)
              for k in decode_sizes)
        for b in bits
    )
    dec_fixed = tuple(tuple(_t(head_cost(device.profile, shape, k, e)) if last else 0 for _ in segments)
                      for k in decode_sizes)
    return (pre_layer, pre_fixed, dec_layer, dec_fixed,
            device_budgets(problem, device, first, last, prefill_sizes, Phase.PREFILL),
            device_budgets(problem, device, first, last, decode_sizes, Phase.DECODE))


def _time_and_memory_tables(problem: Problem, order: list[Device], stages: list[int], prefill_sizes: tuple[int, ...],
                            decode_sizes: tuple[int, ...], cache: dict | None) -> dict:
    """The OrderInput fields that do not depend on the quality setting, for the stages `stages` of
    `order` (all of them, or one per class): costs, budgets, links (always the whole order's), counts."""
    cache = {} if cache is None else cache
    last, rows = len(order) - 1, []
    for i in stages:
        key = (order[i].profile, i == 0, i == last, prefill_sizes, decode_sizes)
        if key not in cache:
            cache[key] = _device_tables(problem, order[i], i == 0, i == last, prefill_sizes, decode_sizes)
        rows.append(cache[key])
    column = [tuple(r[j] for r in rows) for j in range(6)]
    return dict(
        num_layers=problem.shape.num_layers,
        stages=len(stages),
        layer_bytes=tuple(layer_bytes(problem, b) for b in problem.allowed_bits), workspace=workspaces(problem),
        prefill_counts=tuple(problem.micro_batches(k) for k in prefill_sizes),
        prefill_budget=column[4],
        prefill_layer=column[0],
        prefill_fixed=column[1],
        prefill_links=tuple(tuple(_t(t) for t in link_times(problem, order, Phase.PREFILL, k)) for k in prefill_sizes),
        decode_counts=tuple(problem.micro_batches(k) for k in decode_sizes),
        decode_budget=column[5],
        decode_layer=column[2],
        decode_fixed=column[3],
        decode_links=tuple(tuple(_t(t) for t in link_times(problem, order, Phase.DECODE, k)) for k in decode_sizes),
        segment_rounds=tuple(r for r, _ in problem.segments()),
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

