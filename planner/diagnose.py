"""Why no plan exists, in numbers, and what would change that.

Memory first: with every layer at the lowest allowed bitwidth and micro-batches of one sequence
(the smallest footprint any plan can have), how many layers each device can hold, over the device
orders. If the layers still do not fit, `ResourceExhausted` names the device that is short at the
closest plan, by how many bytes, and the largest batch, the longest prompt, lower bits or the extra
device that would make it fit. If memory is fine, the quality bound is what excludes every plan:
`FailedPrecondition` gives the smallest summed indicator that fits memory.
"""

from __future__ import annotations

import time
from dataclasses import replace

from planner.cluster import Device, Workload
from planner.memory import workspace_bytes
from planner.orders import representative_orders
from planner.problem import Problem, layer_bytes
from planner.solver_ortools import solve_order
from planner.tables import QualityScale, budgets, build_input
from pqmesh.errors import FailedPrecondition, ResourceExhausted
from pqmesh.types import ALL_BITS, Bits, Phase
from pqmesh.units import format_bytes

MIN_SOLVE_S = 0.05  # a quality solve given less than this is not started


def _closest(problem: Problem, bits: Bits) -> tuple[int, str, int, int, int]:
    """The closest plan at `bits`, micro-batch 1: (total bytes short, worst device, its bytes needed,
    its capacity, its bytes short). Every device holds >= 1 layer; layers beyond what fits go to the
    device with the most room left. 0 short means the layers fit."""
    per_layer, layers, best = layer_bytes(problem, bits), problem.shape.num_layers, None
    workspace = workspace_bytes(problem.shape, bits, problem.element)
    for order in representative_orders(problem.devices, problem.network):
        pre, dec = budgets(problem, order, (1,), Phase.PREFILL), budgets(problem, order, (1,), Phase.DECODE)
        room = [min(p[0], d[0]) - workspace for p, d in zip(pre, dec)]
        held = [max(1, r // per_layer) for r in room]
        over = layers - sum(held)
        if over > 0:
            i = max(range(len(order)), key=lambda i: room[i] - held[i] * per_layer)
            held[i] += over
        shorts = [max(0, n * per_layer - r) for n, r in zip(held, room)]
        i = max(range(len(order)), key=shorts.__getitem__)
        capacity = problem.capacity(order[i])
        candidate = (sum(shorts), order[i].label, capacity - room[i] + held[i] * per_layer, capacity, shorts[i])
        if best is None or candidate[0] < best[0]:
            best = candidate
    return best


def fits(problem: Problem) -> bool:
    return _closest(problem, problem.allowed_bits[-1])[0] == 0


def _largest_batch(problem: Problem) -> int:
    w = problem.workload
    return max(
        (b for b in range(1, w.batch_size) if fits(replace(problem, workload=replace(w, batch_size=b)))), default=0
    )


def _longest_prompt(problem: Problem) -> int:
    """The longest prompt that fits beside the longest generation, every prompt that long."""
    w, lo, hi = problem.workload, 0, problem.workload.max_prompt_length - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(replace(problem, workload=Workload(w.batch_size, mid, w.max_generation_length))):
            lo = mid
        else:
            hi = mid - 1
    return lo


def memory_message(problem: Problem) -> str:
    lowest = problem.allowed_bits[-1]
    w = problem.workload
    total, label, need, capacity, short = _closest(problem, lowest)
    parts = [
        f"the model does not fit: even with every layer at {int(lowest)} bits and micro-batches of 1 sequence, "
        f"device {label!r} needs {format_bytes(need)} but has {format_bytes(capacity)} "
        f"(short by {format_bytes(short)}; "
        f"{format_bytes(total)} short over all devices) at the closest plan, whose KV cache holds "
        f"{w.batch_size} sequences x {w.max_context} tokens"
    ]
    fixes = []
    batch = _largest_batch(problem)
    if batch:
        fixes.append(f"a batch of at most {batch} sequences (--batch)")
    prompt = _longest_prompt(problem)
    if prompt:
        flag = "--prompt-len" if w.prompts is None else "--prompt-lengths: drop or cut the longer ones"
        fixes.append(f"prompts of at most {prompt} tokens ({flag})")
    if lowest != ALL_BITS[-1]:
        fixes.append(f"bits down to {int(ALL_BITS[-1])} (--bits)")
    big = max(problem.devices, key=lambda d: d.profile.memory_bytes)
    extra = replace(problem, devices=problem.devices + (Device("extra", big.profile, "extra-host"),))
    if len(extra.devices) <= problem.shape.num_layers and fits(extra):
        fixes.append(f"one more {big.profile.device_type} device")
    else:
        fixes.append(f"more devices with at least {format_bytes(total)} of memory in total")
    return "; ".join(parts) + ". To fit: " + ", or ".join(fixes)


def min_quality(problem: Problem, time_limit: float = 2.0, deadline: float | None = None) -> float:
    """Smallest summed indicator of any plan that fits memory (layers not tied to stages: a bound);
    `time_limit` per order (an order whose solve finds nothing in time counts as not fitting). With a
    `deadline` (time.monotonic()) no order is solved past it (most take a fraction of a second); the
    answer is then the smallest of the orders solved."""
    scale, best = QualityScale(problem), None
    sizes = (1,)
    for order in representative_orders(problem.devices, problem.network):
        limit = time_limit if deadline is None else min(time_limit, deadline - time.monotonic())
        if limit < MIN_SOLVE_S:
            break
        sol = solve_order(build_input(problem, order, sizes, sizes, per_layer=False, relaxed_indicator=True), 0, 0,
                          limit, minimize_quality=True)
        if sol.found:
            best = sol.objective if best is None else min(best, sol.objective)
    return float("inf") if best is None else best / scale.scale


def raise_infeasible(problem: Problem, deadline: float | None = None) -> None:
    """Raise the error that explains why `problem` has no plan (its quality search stops at `deadline`)."""
    if not fits(problem):
        raise ResourceExhausted(memory_message(problem))
    bound = problem.quality.bound
    q = min_quality(problem, deadline=deadline) if bound is not None else 0.0
    if bound is None or q <= bound or q == float("inf"):  # inf: no quality solve found a plan in time
        raise FailedPrecondition("plans fit memory and the quality setting, but the solver found none within its time "
                                 "limit; raise --time-limit")
    raise FailedPrecondition(f"no plan meets the quality bound {bound:.6g}: the smallest summed indicator that fits "
                             f"memory is {q:.6g}; raise --quality-bound to at least {q:.6g}, weigh quality with "
                             "--theta instead, or add devices")
