"""Reference methods evaluated with the same cost model, so a plan shows what it gains.

- ``pipeedge``: PipeEdge-style. One bitwidth for every layer, the highest (16, 8, 4, 3, 2) for which
  some partition fits; the partition minimizes the busiest device's total time (its layers' prefill
  and decode work over the whole job), over the device orders, with memory caps.
- ``uniform_int8`` / ``uniform_int4``: even partition (sizes differ by at most one layer) in the
  cluster file's device order, every layer at that bitwidth.
- ``adabits``: memory-only mixed precision. Layers split in proportion to device memory (file
  order); each device then runs its share at the highest bitwidth that fits its memory.

None of them is phase-aware: each uses one micro-batch size for both phases (the best one, by
predicted throughput, among the divisors of the batch). Quality bounds do not apply to baselines;
their summed indicator is reported.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

from planner.cluster import Device
from planner.memory import workspace_bytes
from planner.orders import representative_orders
from planner.plans import Baseline
from planner.problem import Evaluation, Problem, evaluate, head_cost, layer_bytes, layer_cost
from planner.tables import device_budgets, micro_batch_candidates, plan_from_bits
from pqmesh.plan import PipelinePlan
from pqmesh.types import ALL_BITS, Bits, Phase
from pqmesh.units import format_bytes


def shortfall_reason(ev: Evaluation, plan: PipelinePlan, what: str) -> str:
    """'device X needs A but has B (short by C)' for the device furthest over its memory."""
    short = ev.shortfalls()
    i = max(range(len(short)), key=short.__getitem__)
    return (
        f"{what}: device {plan.stages[i].device!r} needs {format_bytes(ev.memory[i].total)} "
        f"but has {format_bytes(ev.capacity[i])} "
        f"(short by {format_bytes(short[i])}) at micro-batch {plan.prefill_micro_batch}"
    )


def best_over_sizes(problem: Problem, make: Callable[[int], PipelinePlan | None], what: str) -> Baseline:
    """The best fitting plan over micro-batch sizes (same size in both phases)."""
    best, nearest = None, None
    for size in micro_batch_candidates(problem.workload.batch_size):
        plan = make(size)
        if plan is None:
            continue
        ev = evaluate(problem, plan)
        if ev.fits:
            if best is None or ev.prediction.throughput_tokens_per_s > best[0].prediction.throughput_tokens_per_s:
                best = (ev, plan)
        elif nearest is None or max(ev.shortfalls()) < max(nearest[0].shortfalls()):
            nearest = (ev, plan)
    if best is not None:
        return Baseline(True, best[0].prediction, best[1])
    if nearest is not None:
        return Baseline(False, reason=shortfall_reason(nearest[0], nearest[1], what))
    return Baseline(False, reason=f"{what}: no partition gives every device a layer within its memory")


def even_sizes(layers: int, parts: int) -> list[int]:
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def proportional_sizes(layers: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `layers` in proportion to `weights`, at least one each."""
    spare = layers - len(weights)
    exact = [spare * w / sum(weights) for w in weights]
    sizes = [1 + math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)[
        : layers - sum(sizes)
    ]:
        sizes[i] += 1
    return sizes


def uniform(problem: Problem, bits: Bits) -> Baseline:
    order = list(problem.devices)
    sizes = even_sizes(problem.shape.num_layers, len(order))
    return best_over_sizes(problem, lambda k: plan_from_bits(order, [[bits] * n for n in sizes], k, k),
                           f"even partition at {int(bits)} bits")


def layer_caps(problem: Problem, order: list[Device], size: int, bits: Bits) -> list[int]:
    """Most layers at `bits` each stage of `order` holds at micro-batch `size` (both phases)."""
    per_layer, last, memo, out = layer_bytes(problem, bits), len(order) - 1, {}, []
    workspace = workspace_bytes(problem.shape, bits, problem.element)
    for i, d in enumerate(order):
        key = (id(d.profile), i == 0, i == last)  # identical devices: computed once
        if key not in memo:
            pre = device_budgets(problem, d, i == 0, i == last, (size,), Phase.PREFILL)[0]
            dec = device_budgets(problem, d, i == 0, i == last, (size,), Phase.DECODE)[0]
            memo[key] = max(0, (min(pre, dec) - workspace) // per_layer)
        out.append(memo[key])
    return out


def adabits(problem: Problem) -> Baseline:
    order = list(problem.devices)
    sizes = proportional_sizes(problem.shape.num_layers, [problem.capacity(d) for d in order])

    def make(size: int) -> PipelinePlan | None:
        per_stage = []
        for i, n in enumerate(sizes):
            fit = next((b for b in ALL_BITS if layer_caps(problem, order, size, b)[i] >= n), None)
            if fit is None:
                return None
            per_stage.append([fit] * n)
        return plan_from_bits(order, per_stage, size, size)

    return best_over_sizes(problem, make, "memory-proportional partition at the highest bits per device")


def balanced_sizes(work: list[float], fixed: list[float], caps: list[int], layers: int) -> list[int] | None:
    """Layers per stage (>= 1, <= cap, summing to `layers`) minimizing max(n_i * work_i + fixed_i)."""
    if any(c < 1 for c in caps) or sum(caps) < layers:
        return None
    levels = sorted({n * w + f for w, f, c in zip(work, fixed, caps) for n in range(1, min(c, layers) + 1)})

    def take(level: float) -> list[int]:
        return [min(c, int((level - f) / w + 1e-9) if w > 0 else c) for w, f, c in zip(work, fixed, caps)]

    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        got = take(levels[mid])
        if min(got) >= 1 and sum(got) >= layers:
            hi = mid
        else:
            lo = mid + 1
    sizes = take(levels[lo])
    if min(sizes) < 1 or sum(sizes) < layers:
        return None
    busiest = [(-(n * w + f), i) for i, (n, w, f) in enumerate(zip(sizes, work, fixed)) if n > 1]
    heapq.heapify(busiest)
    for _ in range(sum(sizes) - layers):  # drop surplus layers from the busiest stages (ties: first)
        _, i = heapq.heappop(busiest)
        sizes[i] -= 1
        if sizes[i] > 1:
            heapq.heappush(busiest, (-(sizes[i] * work[i] + fixed[i]), i))
    return sizes


def busy_seconds(problem: Problem, device: Device, bits: Bits, size: int, last: bool) -> tuple[float, float]:
    """(per-layer, fixed) busy seconds of a device over the whole job at micro-batch `size`."""
    shape, s, m = problem.shape, problem.workload.prompt_length, problem.micro_batches(size)
    e = problem.element
    pad = problem.prefill_length(size)
    per_layer = m * layer_cost(device.profile, shape, bits, Phase.PREFILL, size, pad, pad, e)
    per_layer += sum(
        r * m * layer_cost(device.profile, shape, bits, Phase.DECODE, size, s, ctx, e) for r, ctx in problem.segments()
    )
    rounds = 1 + sum(r for r, _ in problem.segments())
    return per_layer, (rounds * m * head_cost(device.profile, shape, size, e) if last else 0.0)


def busy_per_stage(problem: Problem, order: list[Device], bits: Bits, size: int) -> list[tuple[float, float]]:
    """`busy_seconds` of every stage of `order` (identical devices computed once)."""
    last, memo, out = len(order) - 1, {}, []
    for i, d in enumerate(order):
        key = (id(d.profile), i == last)
        if key not in memo:
            memo[key] = busy_seconds(problem, d, bits, size, i == last)
        out.append(memo[key])
    return out


def pipeedge(problem: Problem) -> Baseline:
    orders = representative_orders(problem.devices, problem.network)
    for bits in ALL_BITS:
        candidates = []
        for order in orders:
            def make(size: int, order=order) -> PipelinePlan | None:
                busy = busy_per_stage(problem, order, bits, size)
                sizes = balanced_sizes([b[0] for b in busy], [b[1] for b in busy],
                                       layer_caps(problem, order, size, bits), problem.shape.num_layers)
                return None if sizes is None else plan_from_bits(order, [[bits] * n for n in sizes], size, size)
            candidates.append(best_over_sizes(problem, make, f"balanced partition at {int(bits)} bits"))
        fitting = [c for c in candidates if c.feasible]
        if fitting:
            return max(fitting, key=lambda c: c.predicted.throughput_tokens_per_s)
    return Baseline(False, reason=f"no single bitwidth down to {int(ALL_BITS[-1])} bits fits: " + candidates[0].reason)


def all_baselines(problem: Problem) -> dict[str, Baseline]:
    return {"pipeedge": pipeedge(problem), "uniform_int8": uniform(problem, Bits.B8),
            "uniform_int4": uniform(problem, Bits.B4), "adabits": adabits(problem)}
