"""The planner's search: device orders x micro-batch pairs x (CP-SAT over layers and bits).

1. Baselines and a heuristic plan per order and micro-batch size (balanced by device speed, the
   highest bits that fit) are evaluated; each one that fits memory and meets the quality setting is
   an incumbent: the warm start. The best one sets the cutoff, and each order's best is its hint.
2. Every (order, prefill size, decode size) gets a lower bound from the LP relaxation of its model.
   Layer-uniform indicators (the default): orders are the representatives of `planner.orders`, the
   model is the exact count model. Per-layer indicators: the bound comes from the count model with
   each bitwidth's smallest indicator (valid for every order with the same key), and each distinct
   order is then solved with the per-layer (unit) model.
3. Items are solved best bound first with CP-SAT, each only looking for a plan better than the
   incumbent (cutoff); once the next bound reaches the incumbent, everything left is pruned.
The optimality gap is (best - smallest bound not excluded) / best over all items; 0 means proven
optimal (within the integer rounding of the tables, about 1e-4).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import structlog

from planner.baselines import all_baselines, balanced_sizes, busy_seconds, layer_caps
from planner.diagnose import raise_infeasible
from planner.mesh_costs import with_mesh_costs
from planner.orders import all_orders, order_key, representative_orders
from planner.plans import PlanResult
from planner.problem import Problem, evaluate
from planner.solver_ortools import TIME_SCALE, Hint, lower_bound, solve_order
from planner.tables import (
    build_input,
    counts_of,
    micro_batch_candidates,
    plan_from_bits,
    plan_from_counts,
    plan_from_units,
)
from pqmesh.errors import InvalidArgument
from pqmesh.plan import PipelinePlan

log = structlog.get_logger(__name__)
DEFAULT_TIME_LIMIT_S = 10.0
CUTOFF_SLACK = 1e-4  # relative: integer rounding of the tables never moves an objective this far


@dataclass
class _State:
    problem: Problem
    deadline: float
    sizes: tuple[int, ...]
    best: tuple[float, PipelinePlan] | None = None
    order_best: dict = field(default_factory=dict)  # labels -> (objective, plan)
    tables: dict = field(default_factory=dict)  # labels -> per-layer OrderInput
    solves: int = 0

    def offer(self, plan: PipelinePlan) -> None:
        if any(b not in self.problem.allowed_bits for b in plan.bits_per_layer):
            return
        ev = evaluate(self.problem, plan)
        if not ev.feasible:
            return
        labels = tuple(s.device for s in plan.stages)
        if labels not in self.order_best or ev.objective < self.order_best[labels][0]:
            self.order_best[labels] = (ev.objective, plan)
        if self.best is None or ev.objective < self.best[0]:
            self.best = (ev.objective, plan)

    def cutoff(self) -> int | None:
        return None if self.best is None else int(self.best[0] * TIME_SCALE * (1 + CUTOFF_SLACK)) + 1

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def hint(self, order) -> Hint | None:
        found = self.order_best.get(tuple(d.label for d in order))
        return None if found is None else Hint(counts_of(self.problem, found[1]))


def heuristic_plan(problem: Problem, order, size: int) -> PipelinePlan | None:
    """Balanced partition by device speed (at the lowest bits, so it fits), then on each device the
    highest allowed bits that fit its share; one micro-batch size for both phases."""
    lowest = problem.allowed_bits[-1]
    busy = [busy_seconds(problem, d, lowest, size, i == len(order) - 1) for i, d in enumerate(order)]
    sizes = balanced_sizes([b[0] for b in busy], [b[1] for b in busy], layer_caps(problem, order, size, lowest),
                           problem.shape.num_layers)
    if sizes is None:
        return None
    per_stage = []
    for i, n in enumerate(sizes):
        fit = next(b for b in problem.allowed_bits if b == lowest or layer_caps(problem, order, size, b)[i] >= n)
        per_stage.append([fit] * n)
    return plan_from_bits(order, per_stage, size, size)


@dataclass
class _Item:
    bound: float  # seconds
    order: list
    data: object
    kp: int
    kd: int
    units: bool


def _items(state: _State, per_layer: bool) -> list[_Item]:
    """Every (order, kp, kd) with its LP bound, best first; LP-infeasible pairs are dropped."""
    problem, pairs = state.problem, list(itertools.product(range(len(state.sizes)), repeat=2))
    reps = representative_orders(problem.devices, problem.network)
    key_bounds, items = {}, []
    for order in reps:
        data = build_input(problem, order, state.sizes, state.sizes, per_layer, relaxed_indicator=per_layer)
        for kp, kd in pairs:
            lb = lower_bound(data, kp, kd)
            if lb is not None:
                key_bounds[(order_key(order), kp, kd)] = lb / TIME_SCALE
                if not per_layer:
                    items.append(_Item(lb / TIME_SCALE, order, data, kp, kd, False))
    if per_layer:
        for order in all_orders(problem.devices):
            data = None  # built on first use
            for kp, kd in pairs:
                lb = key_bounds.get((order_key(order), kp, kd))
                if lb is not None:
                    items.append(_Item(lb, order, data, kp, kd, True))
    return sorted(items, key=lambda item: item.bound)


def _solve_item(state: _State, item: _Item, left: int) -> float:
    """Solve one item; returns its proven lower bound (seconds)."""
    problem = state.problem
    if item.data is None:  # per-layer tables: built once per order, on first use
        labels = tuple(d.label for d in item.order)
        if labels not in state.tables:
            state.tables[labels] = build_input(problem, item.order, state.sizes, state.sizes, per_layer=True)
        item.data = state.tables[labels]
    cutoff = state.cutoff()
    budget = max(0.05, state.remaining() / max(1, min(left, 4)))
    sol = solve_order(item.data, item.kp, item.kd, budget, cutoff, state.hint(item.order))
    state.solves += 1
    if sol.found:
        p, d = state.sizes[item.kp], state.sizes[item.kd]
        if item.units:
            state.offer(plan_from_units(problem, item.order, sol.units, p, d))
        else:
            state.offer(plan_from_counts(problem, item.order, sol.counts, p, d))
    exact = not item.units or max(item.data.unit_sizes) == 1  # grouped layers restrict: their bound is not ours
    if sol.status == "infeasible" and exact:
        return float("inf") if cutoff is None else cutoff / TIME_SCALE
    if sol.found and exact:
        return max(item.bound, sol.bound / TIME_SCALE)
    return item.bound


def plan(problem: Problem, time_limit: float = DEFAULT_TIME_LIMIT_S) -> PlanResult:
    """Solve `problem`; raises ResourceExhausted / FailedPrecondition with a fix when nothing fits."""
    if time_limit <= 0:
        raise InvalidArgument(f"time limit must be positive, got {time_limit}")
    started = time.monotonic()
    state = _State(problem, started + time_limit, micro_batch_candidates(problem.workload.batch_size))
    baselines = all_baselines(problem)
    for b in baselines.values():
        if b.plan is not None:
            state.offer(b.plan)
    for order in representative_orders(problem.devices, problem.network):
        for size in state.sizes:
            heuristic = heuristic_plan(problem, order, size)
            if heuristic is not None:
                state.offer(heuristic)
    per_layer = not problem.indicator.is_uniform()
    items = _items(state, per_layer)
    bounds = []
    for n, item in enumerate(items):
        cutoff = state.cutoff()
        if cutoff is not None and item.bound * TIME_SCALE >= cutoff:
            bounds.append(float("inf"))  # this and every later item: no better plan
            break
        if state.remaining() <= 0:
            bounds.append(item.bound)  # unexplored: its LP bound stands
            break
        bounds.append(_solve_item(state, item, len(items) - n))
    if state.best is None:
        raise_infeasible(problem)
    objective, best = state.best
    lower = min(bounds, default=objective)
    gap = max(0.0, (objective - lower) / objective) if objective > 0 else 0.0
    gap = 0.0 if gap < CUTOFF_SLACK else gap
    predicted = evaluate(problem, best).prediction
    seconds = time.monotonic() - started
    log.info(
        "plan_solved",
        model=problem.shape.name,
        devices=len(problem.devices),
        items=len(items),
        solves=state.solves,
        seconds=round(seconds, 3),
        gap=round(gap, 4),
        throughput=round(predicted.throughput_tokens_per_s, 2),
    )
    return with_mesh_costs(problem, PlanResult(best, predicted, baselines, seconds, gap))
