"""The largest global batch that fits (the what-if's `max_batch`), same prompt and generation lengths:
memory at its smallest footprint (every layer at the lowest allowed bits, micro-batches of 1), then
the quality bound where memory fits.

Memory alone is exact and cheap. With a quality bound the answer is a range: the LP relaxation proves
that no batch above `bound` fits, and exact CP-SAT checks confirm `batch`. Both checks only get harder
as the batch grows (the KV cache grows with it). Given a deadline, the search stops at it: an LP step
it did not take keeps the memory edge as the bound, and an exact check it did not make counts as not
confirmed, so the range stays true, only wider (`cut_short`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from planner.cluster import MAX_WORKLOAD
from planner.diagnose import fits
from planner.orders import representative_orders
from planner.problem import QUALITY_TOLERANCE, Problem
from planner.solver_ortools import quality_lower_bound, solve_order
from planner.tables import QualityScale, build_input

EXACT_CHECK_S = 0.5  # per order, each exact quality check of the largest-batch search
MIN_CHECK_S = 0.05  # an exact check given less than this is not started


@dataclass(frozen=True)
class BatchRange:
    batch: int  # the largest batch found that fits memory and the quality bound; 0: none fits
    bound: int  # no larger batch fits (memory, or the LP relaxation of the quality bound)
    cut_short: bool = False  # the deadline stopped the search: batch may be larger, bound smaller


class _Deadline:
    """A wall-clock deadline that remembers whether it stopped any work."""

    def __init__(self, at: float | None) -> None:
        self.at, self.hit = at, False

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.monotonic()

    def out(self, needed: float = 0.0) -> bool:
        if self.left() <= needed:
            self.hit = True
        return self.hit


def at_batch(problem: Problem, batch: int) -> Problem:
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


def _quality_relaxed(problem: Problem, deadline: _Deadline) -> float:
    """A lower bound on the smallest summed indicator that fits memory (micro-batches of 1): the LP
    relaxation, per class of orders; -inf (nothing proven) when the deadline stops it."""
    scale, best, sizes = QualityScale(problem), float("inf"), (1,)
    for order in _memory_classes(problem):
        if deadline.out():
            return float("-inf")
        data = build_input(problem, order, sizes, sizes, per_layer=False, relaxed_indicator=True)
        q = quality_lower_bound(data, 0, 0)
        if q is not None:
            best = min(best, q / scale.scale)
    return best


def _quality_fits(problem: Problem, bound: float, time_limit: float, deadline: _Deadline) -> bool:
    """Whether some plan at micro-batches of 1 fits memory within the summed-indicator `bound`
    (layers not tied to stages, as `planner.diagnose.min_quality`): CP-SAT per class of orders,
    `time_limit` each (less when the deadline is nearer), stopping at the first that fits; one that
    finds nothing in time does not."""
    scale, sizes = QualityScale(problem), (1,)
    for order in _memory_classes(problem):
        if deadline.out(MIN_CHECK_S):
            return False
        data = build_input(problem, order, sizes, sizes, per_layer=False, relaxed_indicator=True)
        sol = solve_order(data, 0, 0, min(time_limit, deadline.left()), minimize_quality=True)
        if sol.found and sol.objective / scale.scale <= bound:
            return True
    return False


def largest_batch(problem: Problem, exact_limit: float = EXACT_CHECK_S, deadline: float | None = None) -> BatchRange:
    """The largest batch that fits memory and the quality bound, and one no larger batch fits. Memory
    by doubling then bisection; then the quality bound where memory fits: bisection on the LP
    relaxation (a proof that every larger batch is out), then exact checks (`exact_limit` seconds per
    order) by bisection between the request's batch and there. With a `deadline` (time.monotonic())
    the quality steps stop at it; the request's own batch (or the largest below the bound) then counts
    as confirmed: the caller's plan for the request vouches for it."""
    quality, clock = problem.quality.bound, _Deadline(deadline)
    limit = None if quality is None else quality * (1 + QUALITY_TOLERANCE) + QUALITY_TOLERANCE

    def memory(b: int) -> bool:
        return fits(at_batch(problem, b))

    def relaxed(b: int) -> bool:  # out of time: not excluded
        return _quality_relaxed(at_batch(problem, b), clock) <= limit

    def exact(b: int) -> bool:  # out of time: not confirmed
        return not clock.out(MIN_CHECK_S) and _quality_fits(at_batch(problem, b), limit, exact_limit, clock)

    if not memory(1):
        return BatchRange(0, 0)
    lo, hi = 1, max(2, problem.workload.batch_size)
    while hi <= MAX_WORKLOAD and memory(hi):
        lo, hi = hi, hi * 2
    batch = _largest(memory, lo, min(hi, MAX_WORKLOAD + 1))
    if limit is None:
        return BatchRange(batch, batch)
    if not relaxed(batch):
        batch = _largest(relaxed, 1, batch) if relaxed(1) else 0
    if batch == 0:
        return BatchRange(0, 0, clock.hit)
    known = min(problem.workload.batch_size, batch)  # the request's own batch has a plan
    if not exact(known):
        if clock.hit:
            return BatchRange(known, batch, True)
        return BatchRange(_largest(exact, 1, known) if exact(1) else 0, batch)
    # bisection, not a gallop down from the relaxation's edge: near the edge a check that fails costs
    # twice one that succeeds (every order class runs to its limit), and each step a deadline allows narrows
    return BatchRange(_largest(exact, known, batch + 1), batch, clock.hit)
