"""The planner's search: device orders x micro-batch pairs x (CP-SAT over layers and bits).

1. Baselines and heuristic plans (balanced by device speed, the highest bits that fit; one order at
   every micro-batch size up front, each other order at an item's sizes when the search first
   solves it) are evaluated; each one that fits memory and meets the quality setting is an
   incumbent: the warm start. The best one sets the cutoff, and each order's best is its hint.
2. Best-first search over a queue of items ordered by lower bound (LP relaxations, GLOP):
   - a micro-batch pair, bounded for every order at once (`planner.tables.pool_input`: one row per
     device profile); taken from the queue it is refined into its orders;
   - an (order, pair), bounded by the LP of that order with one row per class of identical devices
     (`grouped`). Layer-uniform indicators (the default): orders are the undominated
     representatives of `planner.orders`, and the item is solved with the exact count model (CP-SAT
     with symmetry breaking between identical devices). Per-layer indicators: the bound comes from
     the count model whose layers keep their own indicator but not their place (valid for every order
     with the same key), and the item expands into each distinct order of that key, solved with the
     per-layer (unit) model.
   Each solve only looks for a plan better than the incumbent (cutoff); once the best bound in the
   queue reaches the incumbent, everything left is pruned. The time limit bounds the whole request:
   the search stops at it and reports what it proved.
The optimality gap is (best - smallest bound not excluded) / best over all items; 0 means proven
optimal (within the integer rounding of the tables, about 1e-4).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import structlog

from planner.baselines import all_baselines, balanced_sizes, busy_per_stage, layer_caps
from planner.diagnose import raise_infeasible
from planner.mesh_costs import with_mesh_costs
from planner.orders import all_orders, order_key, representative_orders, undominated
from planner.plans import Baseline, PlanResult
from planner.problem import Problem, evaluate
from planner.refine import best_by_replay, length_summaries
from planner.solver_ortools import TIME_SCALE, Hint, lower_bound, solve_order
from planner.tables import (
    build_input,
    counts_of,
    micro_batch_candidates,
    plan_from_bits,
    plan_from_counts,
    plan_from_units,
    pool_input,
)
from pqmesh.errors import InvalidArgument, PqmeshError
from pqmesh.plan import PipelinePlan

log = structlog.get_logger(__name__)
DEFAULT_TIME_LIMIT_S = 10.0
CUTOFF_SLACK = 1e-4  # relative: integer rounding of the tables never moves an objective this far
PAIR, ORDER, SOLVE = 0, 1, 2  # item levels: a micro-batch pair for all orders, an order's bound, a solve


@dataclass
class _State:
    problem: Problem
    deadline: float
    sizes: tuple[int, ...]
    best: tuple[float, PipelinePlan] | None = None
    order_best: dict = field(default_factory=dict)  # labels -> (objective, plan)
    tables: dict = field(default_factory=dict)  # labels -> OrderInput of the full order
    device_tables: dict = field(default_factory=dict)  # planner.tables' per-device cache
    solves: int = 0
    heuristics_tried: set = field(default_factory=set)  # (labels, size)

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

    def try_heuristic(self, order, size: int) -> None:
        tried = (tuple(d.label for d in order), size)
        if tried not in self.heuristics_tried:
            self.heuristics_tried.add(tried)
            heuristic = heuristic_plan(self.problem, order, size)
            if heuristic is not None:
                self.offer(heuristic)

    def hint(self, order) -> Hint | None:
        found = self.order_best.get(tuple(d.label for d in order))
        return None if found is None else Hint(counts_of(self.problem, found[1]))


def heuristic_plan(problem: Problem, order, size: int) -> PipelinePlan | None:
    """Balanced partition by device speed (at the lowest bits, so it fits), then on each device the
    highest allowed bits that fit its share; one micro-batch size for both phases."""
    lowest = problem.allowed_bits[-1]
    busy = busy_per_stage(problem, order, lowest, size)
    sizes = balanced_sizes([b[0] for b in busy], [b[1] for b in busy], layer_caps(problem, order, size, lowest),
                           problem.shape.num_layers)
    if sizes is None:
        return None
    caps = {b: layer_caps(problem, order, size, b) for b in problem.allowed_bits}
    per_stage = []
    for i, n in enumerate(sizes):
        fit = next(b for b in problem.allowed_bits if b == lowest or caps[b][i] >= n)
        per_stage.append([fit] * n)
    return plan_from_bits(order, per_stage, size, size)


@dataclass(order=True)
class _Item:
    bound: float  # seconds
    seq: int
    level: int = field(compare=False)
    kp: int = field(compare=False)
    kd: int = field(compare=False)
    order: list | None = field(default=None, compare=False)
    units: bool = field(default=False, compare=False)


class _Queue:
    """Items by bound, smallest first (ties: first pushed)."""

    def __init__(self) -> None:
        self.heap: list[_Item] = []
        self.seq = itertools.count()

    def push(self, bound: float, level: int, kp: int, kd: int, order=None, units: bool = False) -> None:
        heapq.heappush(self.heap, _Item(bound, next(self.seq), level, kp, kd, order, units))

    def pop(self) -> _Item:
        return heapq.heappop(self.heap)

    def peek(self) -> _Item | None:
        return self.heap[0] if self.heap else None

    def __len__(self) -> int:
        return len(self.heap)


class _Search:
    """The queue and how each level of item is refined or solved."""

    def __init__(self, state: _State, per_layer: bool) -> None:
        problem, self.state, self.per_layer = state.problem, state, per_layer
        reps = representative_orders(problem.devices, problem.network)
        self.orders = reps if per_layer else undominated(reps, problem.network)
        self.by_key: dict = defaultdict(list)
        if per_layer:
            for order in all_orders(problem.devices):
                self.by_key[order_key(order)].append(order)
        self.bound_tables: dict = {}
        self.queue = _Queue()
        pool = pool_input(problem, state.sizes, relaxed_indicator=per_layer, cache=state.device_tables)
        for kp, kd in itertools.product(range(len(state.sizes)), repeat=2):
            lb = lower_bound(pool, kp, kd)
            if lb is not None:  # else no order fits this pair
                self.queue.push(lb / TIME_SCALE, PAIR, kp, kd)
        self.lp_solves = len(state.sizes) ** 2

    def step(self, item: _Item) -> float | None:
        """Refine or solve `item`; a solve returns its proven lower bound (seconds)."""
        if item.level == PAIR:
            self._refine(item)
        elif item.level == ORDER:  # per-layer: every distinct order with this key, same bound
            for order in self.by_key.get(order_key(item.order), []):
                self.queue.push(item.bound, SOLVE, item.kp, item.kd, order, units=True)
        else:
            proven, unfinished = _solve_item(self.state, item, len(self.queue) + 1)
            best = self.state.best
            if not unfinished or (best is not None and proven >= best[0] * (1 - CUTOFF_SLACK)):
                return proven  # proven, or too close to the incumbent to change the reported gap
            # unproven: back into the queue with what it proved, to be taken up again with more time
            self.queue.push(proven, SOLVE, item.kp, item.kd, item.order, item.units)
        return None

    def _refine(self, item: _Item) -> None:
        state = self.state
        for order in self.orders:
            labels = tuple(d.label for d in order)
            if labels not in self.bound_tables:
                self.bound_tables[labels] = build_input(
                    state.problem, order, state.sizes, state.sizes, self.per_layer, relaxed_indicator=self.per_layer,
                    grouped=True, cache=state.device_tables)
            lb = lower_bound(self.bound_tables[labels], item.kp, item.kd)
            self.lp_solves += 1
            if lb is not None:  # the pool bound holds for every order: keep the larger
                self.queue.push(max(item.bound, lb / TIME_SCALE), ORDER if self.per_layer else SOLVE, item.kp,
                                item.kd, order, units=False)


def _solve_item(state: _State, item: _Item, left: int) -> tuple[float, bool]:
    """Solve one item; returns its proven lower bound (seconds) and whether the solve stopped at its
    time slice before proving it (then a longer solve may prove more)."""
    problem = state.problem
    labels = tuple(d.label for d in item.order)
    key = (labels, item.units)
    if key not in state.tables:  # full tables: built once per order, on first use
        state.tables[key] = build_input(problem, item.order, state.sizes, state.sizes, per_layer=item.units,
                                        cache=state.device_tables)
    data = state.tables[key]
    for size in {state.sizes[item.kp], state.sizes[item.kd]}:  # incumbent and hint for this order
        state.try_heuristic(item.order, size)
    cutoff = state.cutoff()
    budget = max(0.05, state.remaining() / max(1, min(left, 4)))
    sol = solve_order(data, item.kp, item.kd, budget, cutoff, state.hint(item.order))
    state.solves += 1
    if sol.found:
        p, d = state.sizes[item.kp], state.sizes[item.kd]
        if item.units:
            state.offer(plan_from_units(problem, item.order, sol.units, p, d))
        else:
            state.offer(plan_from_counts(problem, item.order, sol.counts, p, d))
    exact = not item.units or max(data.unit_sizes) == 1  # grouped layers restrict: their bound is not ours
    if not exact:
        return item.bound, False
    if sol.status == "infeasible":
        return (float("inf") if cutoff is None else cutoff / TIME_SCALE), False
    if sol.status == "optimal":
        return max(item.bound, sol.bound / TIME_SCALE), False
    if sol.status in ("feasible", "unknown"):  # stopped at its time slice
        return max(item.bound, sol.bound / TIME_SCALE if sol.found else 0.0), True
    return item.bound, False


def _search(state: _State, per_layer: bool) -> tuple[float, int]:
    """Run the best-first search until it proves the incumbent or runs out of time; returns the
    smallest lower bound not excluded (inf when everything was) and the LP solves made."""
    search = _Search(state, per_layer)
    bounds = []
    while (item := search.queue.peek()) is not None:
        cutoff = state.cutoff()
        if cutoff is not None and item.bound * TIME_SCALE >= cutoff:
            break  # this and every later item: no better plan
        if state.remaining() <= 0:
            bounds.append(item.bound)  # unexplored: its bound stands
            break
        proven = search.step(search.queue.pop())
        if proven is not None:
            bounds.append(proven)
    return min(bounds, default=float("inf")), search.lp_solves


def _solve(problem: Problem, deadline: float, baselines: dict,
           strict: bool = False) -> tuple[PipelinePlan, float, int, int]:
    """The closed form's best plan (best-first search until ``deadline``): (plan, gap, LP solves, solves).
    ``strict``: the diagnosis of a failure keeps the deadline too."""
    state = _State(problem, deadline, micro_batch_candidates(problem.workload.batch_size))
    for b in baselines.values():
        if b.plan is not None:
            state.offer(b.plan)
    first = undominated(representative_orders(problem.devices, problem.network), problem.network)[0]
    for size in state.sizes:  # one order's heuristics up front; the others' when the search reaches them
        state.try_heuristic(first, size)
    lower, lp_solves = _search(state, not problem.indicator.is_uniform())
    if state.best is None:
        raise_infeasible(problem, deadline if strict else None)
    objective, best = state.best
    lower = min(lower, objective)
    gap = max(0.0, (objective - lower) / objective) if objective > 0 else 0.0
    return best, (0.0 if gap < CUTOFF_SLACK else gap), lp_solves, state.solves


def _for_distribution(problem: Problem, best: PipelinePlan, started: float, time_limit: float) -> PipelinePlan:
    """With length histograms: the plan the job replay finds fastest among the closed form's plans at
    the means (``best``), at the 90th percentiles and at the longest lengths, sizes re-chosen for each."""
    candidates = [best]
    for summary in length_summaries(problem.workload):
        left = started + time_limit - time.monotonic()
        if left <= 0.2 * time_limit:
            break
        try:
            candidates.append(_solve(replace(problem, workload=summary), time.monotonic() + left / 3, {})[0])
        except PqmeshError:
            continue  # e.g. the longest lengths everywhere do not fit where the distribution does
    return best_by_replay(problem, candidates, started + time_limit)


def plan(problem: Problem, time_limit: float = DEFAULT_TIME_LIMIT_S, baselines: dict | None = None,
         strict: bool = False) -> PlanResult:
    """Solve `problem`; raises ResourceExhausted / FailedPrecondition with a fix when nothing fits.
    `time_limit` bounds the whole call (baselines, bounds and solves); `strict`: also the diagnosis of
    a failure and the baselines' whole-mesh replays (one not replayed in time keeps job_s 0), so the
    call ends within the limit plus one replay (the what-if). `baselines`: already evaluated for this
    cluster and workload (they do not depend on the quality setting), offered and returned as they are.
    The optimality gap is the closed form's; with length histograms the plan is then chosen by the job
    replay (`planner.refine`)."""
    if time_limit <= 0:
        raise InvalidArgument(f"time limit must be positive, got {time_limit}")
    started = time.monotonic()
    given = baselines
    baselines = all_baselines(problem) if given is None else given
    histogram = problem.workload.has_histograms
    share = 0.6 if histogram else 1.0
    best, gap, lp_solves, solves = _solve(problem, started + share * time_limit, baselines, strict)
    if histogram:
        best = _for_distribution(problem, best, started, time_limit)
    predicted = evaluate(problem, best).prediction
    seconds = time.monotonic() - started
    log.info(
        "plan_solved",
        model=problem.shape.name,
        devices=len(problem.devices),
        lp_solves=lp_solves,
        solves=solves,
        seconds=round(seconds, 3),
        gap=round(gap, 4),
        throughput=round(predicted.throughput_tokens_per_s, 2),
    )
    result = _replayed(problem, PlanResult(best, predicted, {} if given is not None else baselines, seconds, gap),
                       started + time_limit if strict else None)
    return result if given is None else replace(result, baselines=given)


def _replayed(problem: Problem, result: PlanResult, deadline: float | None) -> PlanResult:
    """`with_mesh_costs`: the plan's whole-mesh replay, and each feasible baseline's, those only while
    `deadline` (time.monotonic(); None: no limit) has not passed."""
    if deadline is None:
        return with_mesh_costs(problem, result)
    out = with_mesh_costs(problem, replace(result, baselines={}))
    baselines = {}
    for name, b in result.baselines.items():
        if b.feasible and b.plan is not None and time.monotonic() < deadline:
            alone = with_mesh_costs(problem, replace(result, plan=b.plan, predicted=b.predicted, baselines={}))
            b = Baseline(True, alone.predicted, alone.plan, b.reason)
        baselines[name] = b
    return replace(out, baselines=baselines)
