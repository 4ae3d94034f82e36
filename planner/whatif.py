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

`time_limit` bounds the whole what-if (within the last step's overshoot: one replay, or the
baselines of a plan begun with little time left): each step gets the time left divided by the steps
left (the base plan, which every marginal is measured against, counts as three and gets their time;
the frontier's tightest bound and the largest-batch search count as one each), but at least MIN_SHARE_S
and what the base plan took while that much is left, and never past the deadline. Every plan is solved
`strict` (`planner.search.plan`): its baselines' replays and its failure's diagnosis stop at its share
too; the frontier's plans reuse the base plan's baselines (same cluster and workload), and the changed
clusters' and the largest batch's plans are solved without any (on a large pool they took most of a
short share, and the heuristic plans warm-start the search as well: docs/BENCHMARKS.md). A step the
clock no longer allows is skipped, and a plan given less than the floor is solved with what is left;
both answers say so (`note`, `cut_short`; on the wire each item's `note`), as does a
largest-batch search stopped by its share (its range is then wider, still true).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog

from planner.cluster import Cluster, ClusterEntry, ProfileLookup
from planner.devices import normalize_type
from planner.diagnose import MIN_SOLVE_S, min_quality
from planner.indicator import Quality
from planner.max_batch import at_batch, largest_batch
from planner.plans import PlanResult
from planner.problem import Problem
from planner.request import PlanInputs
from planner.search import plan
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument, PqmeshError

log = structlog.get_logger(__name__)
DEFAULT_FRONTIER_POINTS = 5
MAX_FRONTIER_POINTS = 50
DEFAULT_WHAT_IF_LIMIT_S = 60.0
EXTRA_HOST = "what-if-host"
BASE_WEIGHT = 3  # the base plan gets three solves' worth of time
MIN_SHARE_S = 1.0  # a solve given less often finds no plan at all on a large pool
MIN_STEP_S = 0.05  # a step given less than this is skipped
EXTRA_STEPS = 3  # besides the plans: the frontier's tightest bound, the largest-batch search and its plan
FRONTIER_SPAN = 1e-3  # the loosest bound over the tightest, when the tightest fitting indicator is ~0


@dataclass(frozen=True)
class DeviceChange:
    device_type: str
    delta: int  # +1 or -1
    host: str
    result: PlanResult | None
    reason: str = ""
    marginal_tokens_per_s: float = 0.0
    note: str = ""  # set when the time limit cut this answer short

    def to_proto(self) -> planner_pb2.DeviceChange:
        msg = planner_pb2.DeviceChange(device_type=self.device_type, delta=self.delta, host=self.host,
                                       feasible=self.result is not None, reason=self.reason, note=self.note,
                                       marginal_tokens_per_s=self.marginal_tokens_per_s)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"device_type": self.device_type, "delta": self.delta, "host": self.host,
                "feasible": self.result is not None, "marginal_tokens_per_s": self.marginal_tokens_per_s,
                **_answer(self.result, self.reason, self.note)}


@dataclass(frozen=True)
class FrontierPoint:
    quality_bound: float
    result: PlanResult | None
    reason: str = ""
    note: str = ""

    def to_proto(self) -> planner_pb2.FrontierPoint:
        msg = planner_pb2.FrontierPoint(quality_bound=self.quality_bound, feasible=self.result is not None,
                                        reason=self.reason, note=self.note)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"quality_bound": self.quality_bound, "feasible": self.result is not None,
                **_answer(self.result, self.reason, self.note)}


@dataclass(frozen=True)
class MaxBatch:
    batch_size: int  # 0: not even one sequence fits
    result: PlanResult | None
    reason: str = ""
    batch_size_bound: int = 0  # no larger batch fits; the answer lies in [batch_size, batch_size_bound]
    note: str = ""

    def to_proto(self) -> planner_pb2.MaxBatch:
        msg = planner_pb2.MaxBatch(batch_size=self.batch_size, feasible=self.result is not None,
                                   reason=self.reason, note=self.note,
                                   batch_size_bound=self.batch_size_bound)
        if self.result is not None:
            msg.plan.CopyFrom(self.result.to_proto())
        return msg

    def to_report(self) -> dict:
        return {"batch_size": self.batch_size, "batch_size_bound": self.batch_size_bound,
                "feasible": self.result is not None, **_answer(self.result, self.reason, self.note)}


def _answer(result: PlanResult | None, reason: str, note: str) -> dict:
    cut = {"cut_short": bool(note), **({"note": note} if note else {})}
    if result is None:
        return {"throughput_tokens_per_s": 0.0, "reason": reason or note, **cut}
    return {"throughput_tokens_per_s": result.predicted.throughput_tokens_per_s,
            "quality": result.predicted.quality, "plan": result.to_report(), **cut}


@dataclass(frozen=True)
class WhatIfResult:
    base: PlanResult
    devices: tuple[DeviceChange, ...]
    frontier: tuple[FrontierPoint, ...]
    max_batch: MaxBatch
    solve_seconds: float
    time_limit_s: float = DEFAULT_WHAT_IF_LIMIT_S

    @property
    def cut_short(self) -> int:
        """Answers the time limit cut short (skipped, solved with less than the floor, or a wider range)."""
        return sum(bool(a.note) for a in (*self.devices, *self.frontier, self.max_batch))

    def to_proto(self) -> planner_pb2.WhatIfResponse:
        return planner_pb2.WhatIfResponse(base=self.base.to_proto(), devices=[d.to_proto() for d in self.devices],
                                          frontier=[f.to_proto() for f in self.frontier],
                                          max_batch=self.max_batch.to_proto(), solve_seconds=self.solve_seconds)

    def to_report(self) -> dict:
        """The `pqmesh plan --what-if --json` object."""
        return {"base": self.base.to_report(), "devices": [d.to_report() for d in self.devices],
                "frontier": [f.to_report() for f in self.frontier], "max_batch": self.max_batch.to_report(),
                "solve_seconds": self.solve_seconds, "time_limit_s": self.time_limit_s,
                "cut_short": self.cut_short}


class _Clock:
    """Splits the what-if's time limit between its steps: the time left over the steps left, at least
    the floor while that much is left, never past the deadline; None once less than `skip_below` is left."""

    def __init__(self, limit: float, steps: int) -> None:
        self.limit, self.deadline, self.left = limit, time.monotonic() + limit, steps
        self.floor = self.skip_below = MIN_SHARE_S

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, weight: int = 1) -> float | None:
        """`weight` steps' worth of the time left; counts as `weight` steps. None: skip the step."""
        left = self.remaining()
        even = weight * left / max(weight, self.left)
        self.left = max(1, self.left - weight)
        return None if left < self.skip_below else min(max(self.floor, even), left)

    @property
    def skipped(self) -> str:
        return (f"not answered: the what-if's {self.limit:g} s time limit ran out before this step; raise the time "
                "limit (time_limit_seconds, --time-limit) to answer it")

    def short(self, share: float) -> str:
        """The note of a plan solved in `share` seconds ('' when it got the floor)."""
        if share >= self.floor * (1 - 1e-9):
            return ""
        return (f"solved in {share:.2f} s, less than the {self.floor:.2f} s each plan gets, as the what-if's "
                f"{self.limit:g} s time limit ran short: read its optimality gap")


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


def _try(problem_of, share: float, baselines: dict | None = None) -> tuple[PlanResult | None, str]:
    try:
        return plan(problem_of(), share, baselines, strict=True), ""
    except PqmeshError as err:
        return None, str(err)


def what_if(inputs: PlanInputs, lookup: ProfileLookup | None = None, time_limit: float = DEFAULT_WHAT_IF_LIMIT_S,
            frontier_points: int = DEFAULT_FRONTIER_POINTS, extra_types: tuple[str, ...] = ()) -> WhatIfResult:
    """Every what-if answer for `inputs`; raises the planner's error when the request itself has no plan."""
    if not time_limit > 0:
        raise InvalidArgument(f"what-if time limit must be positive seconds, got {time_limit}")
    if not 2 <= frontier_points <= MAX_FRONTIER_POINTS:
        raise InvalidArgument(f"frontier points must be within 2..{MAX_FRONTIER_POINTS}, got {frontier_points}")
    started = time.monotonic()
    changes = device_changes(inputs.cluster, extra_types)
    clock = _Clock(time_limit, BASE_WEIGHT + len(changes) + frontier_points + EXTRA_STEPS)
    problem = inputs.to_problem(lookup)
    share = clock.share(BASE_WEIGHT) or max(clock.remaining(), MIN_STEP_S)  # the base plan is always solved
    base = plan(problem, share, strict=True)  # every marginal is against it: the most time
    clock.floor = max(MIN_SHARE_S, base.solve_seconds)  # what the request's own plan needed
    clock.skip_below = max(MIN_STEP_S, min(MIN_SHARE_S, time.monotonic() - started))
    devices = tuple(_device_answer(inputs, lookup, change, base, clock) for change in changes)
    frontier = _frontier(problem, clock, frontier_points, base.baselines)
    max_batch = _max_batch(problem, clock, base)
    result = WhatIfResult(base, devices, frontier, max_batch, time.monotonic() - started, time_limit)
    log.info("what_if_answered", model=problem.shape.name, devices=len(problem.devices), changes=len(devices),
             frontier=len(frontier), max_batch=max_batch.batch_size, seconds=round(result.solve_seconds, 3),
             time_limit=time_limit, cut_short=result.cut_short)
    return result


def _device_answer(inputs: PlanInputs, lookup, change: tuple, base: PlanResult, clock: _Clock) -> DeviceChange:
    device_type, delta, host, changed = change
    share = clock.share()
    if isinstance(changed, str):
        return DeviceChange(device_type, delta, host, None, changed)
    if share is None:
        return DeviceChange(device_type, delta, host, None, note=clock.skipped)
    result, reason = _try(lambda: replace(inputs, cluster=changed).to_problem(lookup), share, {})  # no baselines
    marginal = result.predicted.throughput_tokens_per_s - base.predicted.throughput_tokens_per_s if result else 0.0
    return DeviceChange(device_type, delta, host, result, reason, marginal, clock.short(share))


def quality_frontier(problem: Problem, time_limit: float, points: int = DEFAULT_FRONTIER_POINTS
                     ) -> tuple[FrontierPoint, ...]:
    """The frontier alone (bench/planner_clusters.py --frontier), `time_limit` for all its solves."""
    return _frontier(problem, _Clock(time_limit, points + 1), points)


def _frontier(problem: Problem, clock: _Clock, points: int, baselines: dict | None = None
              ) -> tuple[FrontierPoint, ...]:
    """The fastest plan with no bound to speak of, the tightest bound that fits, then the bounds between."""
    loosest = sum(problem.indicator.value(i, problem.allowed_bits[-1]) for i in range(problem.shape.num_layers))
    share = clock.share()
    if share is None:
        return (FrontierPoint(loosest, None, note=clock.skipped),)
    fastest, reason = _try(lambda: replace(problem, quality=Quality(bound=loosest)), share, baselines)
    if fastest is None:
        return (FrontierPoint(loosest, None, reason, clock.short(share)),)
    fastest_note, share = clock.short(share), clock.share()
    searched = time.monotonic() + (share or 0.0)
    lowest = min_quality(problem, deadline=searched) if share is not None else float("inf")
    tight_note = ("the tightest bound found before the time limit stopped the search over device orders; a "
                  "tighter one may fit" if time.monotonic() >= searched - MIN_SOLVE_S else "")
    if lowest == float("inf"):  # min_quality found nothing in its share
        fastest_note = "the only point: no tightest bound that fits was found within the what-if's time limit"
    bounds = frontier_bounds(lowest, fastest.predicted.quality, points)
    out = []
    for k, bound in enumerate(bounds[:-1]):
        share = clock.share()
        if share is None:
            out.append(FrontierPoint(bound, None, note=clock.skipped))
            continue
        result, why = _try(lambda b=bound: replace(problem, quality=Quality(bound=b)), share, baselines)
        out.append(FrontierPoint(bound, result, why, clock.short(share) or (tight_note if k == 0 else "")))
    out.append(FrontierPoint(bounds[-1], fastest, note=fastest_note))
    return tuple(out)


def _max_batch(problem: Problem, clock: _Clock, base: PlanResult) -> MaxBatch:
    share = clock.share()  # the search: all but a plan's floor of what is left (it is the last step but one)
    search_s = max(share or 0.0, clock.remaining() - clock.floor) if share is not None else 0.0
    found = largest_batch(problem, deadline=time.monotonic() + search_s)  # 0: memory's edge, the request's batch
    note = ("the largest-batch search stopped at the what-if's time limit: the largest batch is at least "
            f"{found.batch} and at most {found.bound}" if found.cut_short else "")
    if found.batch == 0:
        return MaxBatch(0, None, "not even one sequence fits; see the Plan error for what to change", found.bound)
    if found.batch == problem.workload.batch_size:  # the request's own: its plan is the base plan
        return MaxBatch(found.batch, base, "", found.bound, note)
    share = clock.share()
    if share is None:
        return MaxBatch(found.batch, None, "", found.bound, note or clock.skipped)
    result, reason = _try(lambda: at_batch(problem, found.batch), share, {})
    retry = min(2 * share, clock.remaining())
    if result is None and "time limit" in reason and retry >= clock.skip_below:  # plans are hard at memory's edge
        result, reason = _try(lambda: at_batch(problem, found.batch), retry, {})
    return MaxBatch(found.batch, result, reason, found.bound, note or clock.short(share))
