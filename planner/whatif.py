"""What-if answers about a pool and a job, each with the plan behind it (`PlannerService.WhatIf`,
`pqmesh plan --what-if`):

- **devices**: for every device type of the cluster, the plan with one device more (added to the
  first [[device]] group of that type, on its host) and one less (taken from the last group), and
  the marginal throughput against the base plan; `extra_types` asks about types not in the cluster
  (one device on a host of its own). A change that leaves no plan says why (the planner's message).
- **frontier**: throughput against the quality bound: the best plan under each of `points` bounds,
  from the smallest summed indicator that fits memory to the indicator of the fastest plan (any
  looser bound gives that plan), spaced geometrically (indicators span orders of magnitude).
- **max batch**: the largest global batch, same prompt and generation lengths, for which some plan
  fits memory (every layer at the lowest allowed bits, micro-batches of 1: the smallest footprint)
  and meets the quality bound, and the plan at that batch. Memory alone is exact; with a quality
  bound the answer is the largest batch the exact checks confirmed in their time, and
  `batch_size_bound` the batch above which the LP relaxation proves nothing fits.

`time_limit` is the what-if's budget: each solve gets the time left divided by the solves left (the
base plan, which every marginal is measured against, counts as three and gets their time), but
at least MIN_SHARE_S and what the base plan took (the largest-batch plan, at the edge of memory,
gets a second try with twice that when the first finds nothing); each plan's baselines and
whole-mesh replay come on top of its solve, so a what-if on a large pool takes longer than its
budget (every answer reports its own gap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog

from planner.cluster import MAX_WORKLOAD, Cluster, ClusterEntry, ProfileLookup
from planner.devices import normalize_type
from planner.diagnose import fits, min_quality
from planner.indicator import Quality
from planner.orders import representative_orders
from planner.plans import PlanResult
from planner.problem import QUALITY_TOLERANCE, Problem
from planner.request import PlanInputs
from planner.search import plan
from planner.solver_ortools import quality_lower_bound, solve_order
from planner.tables import QualityScale, build_input
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument, PqmeshError

log = structlog.get_logger(__name__)
DEFAULT_FRONTIER_POINTS = 5
MAX_FRONTIER_POINTS = 50
DEFAULT_WHAT_IF_LIMIT_S = 60.0
EXTRA_HOST = "what-if-host"
BASE_WEIGHT = 3  # the base plan gets three solves' worth of time
MIN_SHARE_S = 1.0  # a solve given less often finds no plan at all on a large pool
EXACT_CHECK_S = 0.5  # per order, each exact quality check of the largest-batch search
FRONTIER_SPAN = 1e-3  # the loosest bound over the tightest, when the tightest fitting indicator is ~0


@dataclass(frozen=True)
class DeviceChange:
    device_type: str
    delta: int  # +1 or -1
    host: str
    result: PlanResult | None
    reason: str = ""
    marginal_tokens_per_s: float = 0.0

    def to_proto(self) -> planner_pb2.DeviceChange:
        msg = planner_pb2.DeviceChange(device_type=self.device_type, delta=self.delta, host=self.host,
                                       feasible=self.result is not None, reason=self.reason,
                                       marginal_tokens_per_s=self.marginal_tokens_per_s)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"device_type": self.device_type, "delta": self.delta, "host": self.host,
                "feasible": self.result is not None, "marginal_tokens_per_s": self.marginal_tokens_per_s,
                **_answer(self.result, self.reason)}


@dataclass(frozen=True)
class FrontierPoint:
    quality_bound: float
    result: PlanResult | None
    reason: str = ""

    def to_proto(self) -> planner_pb2.FrontierPoint:
        msg = planner_pb2.FrontierPoint(quality_bound=self.quality_bound, feasible=self.result is not None,
                                        reason=self.reason)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"quality_bound": self.quality_bound, "feasible": self.result is not None,
                **_answer(self.result, self.reason)}


@dataclass(frozen=True)
class MaxBatch:
    batch_size: int  # 0: not even one sequence fits
    result: PlanResult | None
    reason: str = ""
    batch_size_bound: int = 0  # no larger batch fits; the answer lies in [batch_size, batch_size_bound]

    def to_proto(self) -> planner_pb2.MaxBatch:
        msg = planner_pb2.MaxBatch(batch_size=self.batch_size, feasible=self.result is not None, reason=self.reason,
                                   batch_size_bound=self.batch_size_bound)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"batch_size": self.batch_size, "batch_size_bound": self.batch_size_bound,
                "feasible": self.result is not None, **_answer(self.result, self.reason)}


def _answer(result: PlanResult | None, reason: str) -> dict:
    if result is None:
        return {"throughput_tokens_per_s": 0.0, "reason": reason}
    return {"throughput_tokens_per_s": result.predicted.throughput_tokens_per_s,
            "quality": result.predicted.quality, "plan": result.to_report()}


@dataclass(frozen=True)
class WhatIfResult:
    base: PlanResult
    devices: tuple[DeviceChange, ...]
    frontier: tuple[FrontierPoint, ...]
    max_batch: MaxBatch
    solve_seconds: float

    def to_proto(self) -> planner_pb2.WhatIfResponse:
        return planner_pb2.WhatIfResponse(base=self.base.to_proto(), devices=[d.to_proto() for d in self.devices],
                                          frontier=[f.to_proto() for f in self.frontier],
                                          max_batch=self.max_batch.to_proto(), solve_seconds=self.solve_seconds)

    def to_report(self) -> dict:
        """The `pqmesh plan --what-if --json` object."""
        return {"base": self.base.to_report(), "devices": [d.to_report() for d in self.devices],
                "frontier": [f.to_report() for f in self.frontier], "max_batch": self.max_batch.to_report(),
                "solve_seconds": self.solve_seconds}


class _Clock:
    """Splits the what-if's time limit between its solves: the time left over the solves left."""

    def __init__(self, limit: float, solves: int) -> None:
        self.deadline, self.left, self.floor = time.monotonic() + limit, solves, MIN_SHARE_S

    def share(self, weight: int = 1) -> float:
        """`weight` solves' worth of the time left (at least the floor); counts as `weight` solves."""
        share = max(self.floor, weight * (self.deadline - time.monotonic()) / max(weight, self.left))
        self.left = max(1, self.left - weight)
        return share


def device_changes(cluster: Cluster, extra_types: tuple[str, ...] = ()) -> list[tuple[str, int, str, Cluster | str]]:
    """(type, delta, host, changed cluster or why there is none) for one device more and one less of
    every type in `cluster`, then one more of each of `extra_types` on a host of its own."""
    entries, out = list(cluster.entries), []
    types = list(dict.fromkeys(normalize_type(e.device_type) for e in entries))
    for t in types:
        idx = [i for i, e in enumerate(entries) if normalize_type(e.device_type) == t]
        first, last = idx[0], idx[-1]
        added = entries[:first] + [replace(entries[first], count=entries[first].count + 1)] + entries[first + 1:]
        out.append((t, 1, _host(entries[first], first), replace(cluster, entries=tuple(added))))
        fewer = entries[:last] + ([replace(entries[last], count=entries[last].count - 1)]
                                  if entries[last].count > 1 else []) + entries[last + 1:]
        out.append((t, -1, _host(entries[last], last),
                    replace(cluster, entries=tuple(fewer)) if fewer else "removing it leaves no device"))
    for t in dict.fromkeys(normalize_type(x) for x in extra_types):
        if t not in types:
            extra = ClusterEntry(t, 1, host=EXTRA_HOST)
            out.append((t, 1, EXTRA_HOST, replace(cluster, entries=cluster.entries + (extra,))))
    return out


def _host(entry: ClusterEntry, index: int) -> str:
    return entry.host or f"host{index}-{entry.label}"  # as planner.cluster.expand names it


def frontier_bounds(lowest: float, fastest: float, points: int) -> list[float]:
    """`points` quality bounds from `lowest` (the tightest that fits) to `fastest` (the indicator of the
    fastest plan), geometric; a zero or tiny `lowest` comes first, then the geometric run from
    fastest x FRONTIER_SPAN."""
    if fastest <= lowest * (1 + 1e-9):
        return [fastest]
    start = max(lowest, fastest * FRONTIER_SPAN)
    head = [lowest] if start > lowest else []
    n = points - len(head)
    ratio = (fastest / start) ** (1 / (n - 1)) if n > 1 else 1.0
    return head + [start * ratio ** k for k in range(n - 1)] + [fastest]


def _try(problem_of, share: float) -> tuple[PlanResult | None, str]:
    try:
        return plan(problem_of(), share), ""
    except PqmeshError as err:
        return None, str(err)


def _at(problem: Problem, batch: int) -> Problem:
    return replace(problem, workload=replace(problem.workload, batch_size=batch))


def _largest(ok, lo: int, hi: int) -> int:
    """The largest b in [lo, hi) with ok(b), given ok(lo) and ok monotone (true, then false)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _memory_classes(problem: Problem) -> list:
    """One order per (first, last) device profile: all memory and quality depend on (not links)."""
    seen: dict = {}
    for order in representative_orders(problem.devices, problem.network):
        seen.setdefault((order[0].profile, order[-1].profile), order)
    return list(seen.values())


def _quality_relaxed(problem: Problem) -> float:
    """A lower bound on the smallest summed indicator that fits memory (micro-batches of 1): the LP
    relaxation, per class of orders."""
    scale, best, sizes = QualityScale(problem), float("inf"), (1,)
    for order in _memory_classes(problem):
        data = build_input(problem, order, sizes, sizes, per_layer=False, relaxed_indicator=True)
        q = quality_lower_bound(data, 0, 0)
        if q is not None:
            best = min(best, q / scale.scale)
    return best


def _quality_fits(problem: Problem, bound: float, time_limit: float) -> bool:
    """Whether some plan at micro-batches of 1 fits memory within the summed-indicator `bound`
    (layers not tied to stages, as `planner.diagnose.min_quality`): CP-SAT per class of orders,
    `time_limit` each, stopping at the first that fits; one that finds nothing in time does not."""
    scale, sizes = QualityScale(problem), (1,)
    for order in _memory_classes(problem):
        data = build_input(problem, order, sizes, sizes, per_layer=False, relaxed_indicator=True)
        sol = solve_order(data, 0, 0, time_limit, minimize_quality=True)
        if sol.found and sol.objective / scale.scale <= bound:
            return True
    return False


def largest_batch(problem: Problem, exact_limit: float = EXACT_CHECK_S) -> tuple[int, int]:
    """(largest batch found that fits memory and the quality bound, a batch no larger one fits);
    0 when none fits. Memory by doubling then bisection (cheap); then the quality bound where memory
    fits: bisection on the LP relaxation (a proof that every larger batch is out), then exact checks
    (a CP-SAT solve per order, `exact_limit` seconds each; one that finds nothing in time counts as
    not fitting) galloping down from there. Both only get harder as the batch grows (the KV cache
    grows with it)."""
    bound = problem.quality.bound

    def memory(b: int) -> bool:
        return fits(_at(problem, b))

    def relaxed(b: int) -> bool:
        return _quality_relaxed(_at(problem, b)) <= bound * (1 + QUALITY_TOLERANCE) + QUALITY_TOLERANCE

    def exact(b: int) -> bool:
        return _quality_fits(_at(problem, b), bound * (1 + QUALITY_TOLERANCE) + QUALITY_TOLERANCE, exact_limit)

    if not memory(1):
        return 0, 0
    lo, hi = 1, max(2, problem.workload.batch_size)
    while hi <= MAX_WORKLOAD and memory(hi):
        lo, hi = hi, hi * 2
    batch = _largest(memory, lo, min(hi, MAX_WORKLOAD + 1))
    if bound is None:
        return batch, batch
    if not relaxed(batch):
        batch = _largest(relaxed, 1, batch) if relaxed(1) else 0
    if batch == 0 or exact(batch):
        return batch, batch
    known = min(problem.workload.batch_size, batch - 1)  # the request's own batch has a plan
    if not exact(known):
        return (_largest(exact, 1, known) if exact(1) else 0), batch
    hi, step = batch, 1  # gallop down from the relaxation's edge
    while hi - step > known and not exact(hi - step):
        hi, step = hi - step, step * 2
    return _largest(exact, max(known, hi - step), hi), batch


def what_if(inputs: PlanInputs, lookup: ProfileLookup | None = None, time_limit: float = DEFAULT_WHAT_IF_LIMIT_S,
            frontier_points: int = DEFAULT_FRONTIER_POINTS, extra_types: tuple[str, ...] = ()) -> WhatIfResult:
    """Every what-if answer for `inputs`; raises the planner's error when the request itself has no plan."""
    if not time_limit > 0:
        raise InvalidArgument(f"what-if time limit must be positive seconds, got {time_limit}")
    if not 2 <= frontier_points <= MAX_FRONTIER_POINTS:
        raise InvalidArgument(f"frontier points must be within 2..{MAX_FRONTIER_POINTS}, got {frontier_points}")
    started = time.monotonic()
    changes = device_changes(inputs.cluster, extra_types)
    clock = _Clock(time_limit, BASE_WEIGHT + len(changes) + frontier_points + 1)
    problem = inputs.to_problem(lookup)
    base = plan(problem, clock.share(BASE_WEIGHT))  # every marginal is against it: the most time
    clock.floor = max(MIN_SHARE_S, base.solve_seconds)  # what the request's own plan needed
    devices = []
    for device_type, delta, host, changed in changes:
        if isinstance(changed, str):
            result, reason = None, changed
        else:
            result, reason = _try(lambda c=changed: replace(inputs, cluster=c).to_problem(lookup), clock.share())
        marginal = result.predicted.throughput_tokens_per_s - base.predicted.throughput_tokens_per_s if result else 0.0
        devices.append(DeviceChange(device_type, delta, host, result, reason, marginal))
    frontier = _frontier(problem, clock, frontier_points)
    max_batch = _max_batch(problem, clock)
    seconds = time.monotonic() - started
    log.info("what_if_answered", model=problem.shape.name, devices=len(problem.devices), changes=len(devices),
             frontier=len(frontier), max_batch=max_batch.batch_size, seconds=round(seconds, 3))
    return WhatIfResult(base, tuple(devices), frontier, max_batch, seconds)


def quality_frontier(problem: Problem, time_limit: float, points: int = DEFAULT_FRONTIER_POINTS
                     ) -> tuple[FrontierPoint, ...]:
    """The frontier alone (bench/planner_clusters.py --frontier), `time_limit` for all its solves."""
    return _frontier(problem, _Clock(time_limit, points), points)


def _frontier(problem: Problem, clock: _Clock, points: int) -> tuple[FrontierPoint, ...]:
    loosest = sum(problem.indicator.value(i, problem.allowed_bits[-1]) for i in range(problem.shape.num_layers))
    fastest, reason = _try(lambda: replace(problem, quality=Quality(bound=loosest)), clock.share())
    if fastest is None:
        return (FrontierPoint(loosest, None, reason),)
    lowest = min_quality(problem)
    bounds = frontier_bounds(lowest, fastest.predicted.quality, points)
    out = []
    for bound in bounds[:-1]:
        result, why = _try(lambda b=bound: replace(problem, quality=Quality(bound=b)), clock.share())
        out.append(FrontierPoint(bound, result, why))
    out.append(FrontierPoint(bounds[-1], fastest))
    return tuple(out)


def _max_batch(problem: Problem, clock: _Clock) -> MaxBatch:
    batch, bound = largest_batch(problem)
    if batch == 0:
        return MaxBatch(0, None, "not even one sequence fits; see the Plan error for what to change", bound)
    share = clock.share()
    result, reason = _try(lambda: _at(problem, batch), share)
    if result is None and "time limit" in reason:  # at the edge of memory plans are hard to find
        result, reason = _try(lambda: _at(problem, batch), 2 * share)
    return MaxBatch(batch, result, reason, bound)
