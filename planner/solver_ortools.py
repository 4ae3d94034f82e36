"""CP-SAT model of the LLM-PQ assignment for one device order and one pair of micro-batch sizes,
and its LP relaxation (GLOP) as a cheap lower bound. The only OR-Tools import.

Everything arrives as integers in `OrderInput` (times in 1e-7 s, bytes, scaled indicators), built by
`planner.tables` for every micro-batch candidate; a model is stated for one prefill candidate and
one decode candidate (the search enumerates the pairs, best LP bound first) and the answer is read
back as plain data.

Decisions: n[i][b] = layers at bitwidth b on stage i (each stage >= 1 layer, all layers placed).
With per-layer indicators (`unit_sizes` set), boolean x[u][i][b] places each unit (a group of
consecutive layers) on a stage at a bitwidth, with stage indices non-decreasing by at most one per
unit (contiguous, no stage empty), and n[i][b] = sum of unit sizes. The relaxation used to bound
per-layer problems (`free_quality`) gives each layer l a bitwidth y[l][b] matching only the totals
sum_i n[i][b], not a stage.

Identical devices: middle stages with the same profile are interchangeable in the count model
(`stage_class`); CP-SAT gets symmetry-breaking rows (their layer counts non-increasing). The LP
bound may be stated on one row per class (`multiplicity`): averaging any solution over a class
keeps it feasible at the same objective, so the grouped LP has the same optimum as the full one,
with a handful of rows instead of one per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

TIME_SCALE = 1e7  # integer time units per second
_STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible",
           cp_model.MODEL_INVALID: "invalid", cp_model.UNKNOWN: "unknown"}


@dataclass(frozen=True)
class OrderInput:
    num_layers: int
    stages: int
    layer_bytes: tuple[int, ...]                      # [b]
    prefill_counts: tuple[int, ...]                   # [k] micro-batches per candidate
    prefill_budget: tuple[tuple[int, ...], ...]       # [i][k]
    prefill_layer: tuple                              # [i][b][k]
    prefill_fixed: tuple                              # [i][k]
    prefill_links: tuple                              # [k][link]
    decode_counts: tuple[int, ...]
    decode_budget: tuple[tuple[int, ...], ...]        # [i][k]
    decode_layer: tuple                               # [i][b][k][q]
    decode_fixed: tuple                               # [i][k][q]
    decode_links: tuple                               # [k][link]
    segment_rounds: tuple[int, ...]                   # [q]
    workspace: tuple[int, ...] = ()                   # [b] stage workspace when it holds a layer at b
    quality_per_bits: tuple[int, ...] = ()            # [b], count model
    theta_per_bits: tuple[int, ...] = ()              # [b], count model
    unit_sizes: tuple[int, ...] = ()                  # per-layer model when set
    unit_quality: tuple = ()                          # [u][b]
    unit_theta: tuple = ()                            # [u][b]
    quality_bound: int | None = None
    free_quality: tuple = ()                          # [l][b], relaxation: layers not tied to stages
    free_theta: tuple = ()                            # [l][b]
    multiplicity: tuple[int, ...] = ()                # [i] stages each row stands for (grouped LP); () = 1 each
    stage_class: tuple[int, ...] = ()                 # [i] interchangeable stages share a class (symmetry breaking)


@dataclass(frozen=True)
class Hint:
    counts: tuple[tuple[int, ...], ...]  # [i][b]
    units: tuple[tuple[int, int], ...] = ()  # [u] -> (stage, b)


@dataclass(frozen=True)
class OrderSolution:
    status: str
    counts: tuple[tuple[int, ...], ...] = ()
    units: tuple[tuple[int, int], ...] = ()
    objective: int = 0
    bound: int = 0

    @property
    def found(self) -> bool:
        return self.status in ("optimal", "feasible")


class _Builder:
    """States the model once, as rows of (variable index -> coefficient), on CP-SAT (integers) or on
    GLOP (the LP relaxation, in MiB / 1e-3 s / 1e-6 indicator units for numerical comfort)."""

    def __init__(self, data: OrderInput, kp: int, kd: int, lp: bool) -> None:
        self.d, self.kp, self.kd, self.lp = data, kp, kd, lp
        self.mem_unit, self.time_unit, self.q_unit = (2.0 ** -20, 1e-4, 1e-6) if lp else (1, 1, 1)
        self.m = pywraplp.Solver.CreateSolver("GLOP") if lp else cp_model.CpModel()
        self.vars: list = []
        self.nb, L = len(data.layer_bytes), data.num_layers
        self.mult = data.multiplicity or (1,) * data.stages
        self.n = [[self.var(0, L, f"n{i}_{b}") for b in range(self.nb)] for i in range(data.stages)]
        for row in self.n:
            self.row({v: 1 for v in row}, 1, L)
        self.row({v: m for row, m in zip(self.n, self.mult) for v in row}, L, L)
        self.x = None
        self.stage_cap = self._stage_cap()

    # -- backend ---------------------------------------------------------------------------------
    def var(self, lo: float, hi: float, name: str) -> int:
        self.vars.append(self.m.NumVar(lo, hi, name) if self.lp else self.m.new_int_var(int(lo), int(hi), name))
        return len(self.vars) - 1

    def row(self, terms: dict, lo: float, hi: float) -> None:
        """lo <= sum(coef * var) <= hi."""
        if self.lp:
            ct = self.m.Constraint(lo, hi)
            for v, c in terms.items():
                ct.SetCoefficient(self.vars[v], c)
        else:
            expr = cp_model.LinearExpr.weighted_sum([self.vars[v] for v in terms], list(terms.values()))
            self.m.add_linear_constraint(expr, int(math.ceil(lo)) if lo > -math.inf else cp_model.INT_MIN,
                                         int(math.floor(hi)) if hi < math.inf else cp_model.INT_MAX)

    def _stage_cap(self) -> int:
        """An upper bound on any stage or link time (keeps CP-SAT's domains finite and int64-safe)."""
        d, L = self.d, self.d.num_layers
        pre = max(
            L * max(d.prefill_layer[i][b][self.kp] for b in range(self.nb)) + d.prefill_fixed[i][self.kp]
            for i in range(d.stages)
        )
        dec = max(L * max(max(d.decode_layer[i][b][self.kd], default=0) for b in range(self.nb))
                  + max(d.decode_fixed[i][self.kd], default=0) for i in range(d.stages))  # no rounds: gen length 1
        links = max(d.prefill_links[self.kp] + d.decode_links[self.kd], default=0)
        return max(pre, dec, links) + 1

    # -- model -----------------------------------------------------------------------------------
    def _stage(self, i: int, table: list, fixed: int) -> tuple[dict, float]:
        u = self.time_unit
        return {self.n[i][b]: table[b] * u for b in range(self.nb)}, fixed * u

    def memory(self) -> None:
        """Per stage: its layers' bytes plus its workspace (the largest of its widths') fit the budget.
        A width whose workspace exceeds the smallest allowed one's gets a 0/1 "used here" variable."""
        d, u, L = self.d, self.mem_unit, self.d.num_layers
        ws = d.workspace or (0,) * self.nb
        floor = min(ws)  # every stage holds a layer, so it pays at least this
        wider = [b for b in range(self.nb) if ws[b] > floor]
        for i in range(d.stages):
            budget = min(d.prefill_budget[i][self.kp], d.decode_budget[i][self.kd])
            terms = {self.n[i][b]: d.layer_bytes[b] * u for b in range(self.nb)}
            if wider:
                w = self.var(floor * u, max(ws) * u, f"w{i}")
                for b in wider:
                    used = self.var(0, 1, f"y{i}_{b}")
                    self.row({self.n[i][b]: 1, used: -L}, -math.inf, 0)
                    self.row({w: 1, used: -ws[b] * u}, 0, math.inf)
                terms[w] = 1
            self.row(terms, -math.inf, (budget - (0 if wider else floor)) * u)

    def _sum(self, stages: list[tuple[dict, float]]) -> tuple[dict, float]:
        """The summed stage times (each row counted as often as the stages it stands for)."""
        terms = _add(*[{v: c * m for v, c in t.items()} for (t, _), m in zip(stages, self.mult)])
        return terms, sum(f * m for (_, f), m in zip(stages, self.mult))

    def _max_over(self, stages: list[tuple[dict, float]], floor: float, cap: float, name: str) -> int:
        """A variable >= every stage time (and >= floor), and stages x it >= their sum."""
        peak = self.var(floor, cap, name)
        for terms, fixed in stages:
            self.row({**{v: -c for v, c in terms.items()}, peak: 1}, fixed, math.inf)
        total, fixed_total = self._sum(stages)
        self.row({**{v: -c for v, c in total.items()}, peak: sum(self.mult)}, fixed_total, math.inf)
        return peak

    def symmetry(self) -> None:
        """Interchangeable stages (same class) hold non-increasing numbers of layers: every solution
        has a permutation that does, so no optimum is lost. (A full lexicographic order on the count
        vectors needs huge coefficients, which slowed CP-SAT's proofs down by 100x.)"""
        for a, b in _class_pairs(self.d.stage_class):
            self.row({**{v: 1 for v in self.n[a]}, **{v: -1 for v in self.n[b]}}, 0, math.inf)

    def prefill(self) -> tuple[dict, float]:
        d, k, u = self.d, self.kp, self.time_unit
        stages = [
            self._stage(i, [d.prefill_layer[i][b][k] for b in range(self.nb)], d.prefill_fixed[i][k])
            for i in range(d.stages)
        ]
        links = [x * u for x in d.prefill_links[k]]
        peak = self._max_over(stages, max(links, default=0), self.stage_cap * u, "mp")
        total, fixed_total = self._sum(stages)
        return _add(total, {peak: d.prefill_counts[k] - 1}), fixed_total + sum(links)

    def decode(self) -> tuple[dict, float]:
        d, k, u = self.d, self.kd, self.time_unit
        links, objective = [x * u for x in d.decode_links[k]], {}
        cap = self.stage_cap * u
        for q, rounds in enumerate(d.segment_rounds):
            stages = [
                self._stage(i, [d.decode_layer[i][b][k][q] for b in range(self.nb)], d.decode_fixed[i][k][q])
                for i in range(d.stages)
            ]
            peak = self._max_over(stages, max(links, default=0), cap, f"md{q}")
            cycle = self.var(0, (max(d.decode_counts[k], sum(self.mult)) + len(links)) * cap, f"c{q}")
            self.row({cycle: 1, peak: -d.decode_counts[k]}, 0, math.inf)
            total, fixed_total = self._sum(stages)
            self.row({cycle: 1, **{v: -c for v, c in total.items()}}, fixed_total + sum(links), math.inf)
            objective[cycle] = rounds
        return objective, 0.0

    def units(self) -> None:
        """Per-layer model: x[u][i][b], contiguity, and n as sums of unit sizes."""
        d, nb, S = self.d, self.nb, self.d.stages
        self.x = [
            [[self.var(0, 1, f"x{u}_{i}_{b}") for b in range(nb)] for i in range(S)] for u in range(len(d.unit_sizes))
        ]
        index = [{v: i for i, row in enumerate(xu) for v in row} for xu in self.x]
        for xu in self.x:
            self.row({v: 1 for row in xu for v in row}, 1, 1)
        self.row(index[0], 0, 0)
        self.row(index[-1], S - 1, S - 1)
        for a, b in zip(index, index[1:]):
            self.row(_add(b, {v: -c for v, c in a.items()}), 0, 1)
        for i in range(S):
            for b in range(nb):
                self.row({self.n[i][b]: 1, **{self.x[u][i][b]: -d.unit_sizes[u] for u in range(len(self.x))}}, 0, 0)

    def quality_terms(self) -> tuple[dict, dict]:
        """(summed indicator, summed theta cost) as terms."""
        d, nb, S = self.d, self.nb, self.d.stages
        if self.x is not None:
            cells = [(self.x[u][i][b], u, b) for u in range(len(self.x)) for i in range(S) for b in range(nb)]
            return ({v: d.unit_quality[u][b] * self.q_unit for v, u, b in cells} if d.unit_quality else {},
                    {v: d.unit_theta[u][b] * self.time_unit for v, u, b in cells} if d.unit_theta else {})
        if d.free_quality or d.free_theta:
            return self._free_layers()
        m = self.mult
        return (
            _add(*[{self.n[i][b]: d.quality_per_bits[b] * m[i] * self.q_unit for b in range(nb)} for i in range(S)])
            if d.quality_per_bits
            else {},
            _add(*[{self.n[i][b]: d.theta_per_bits[b] * m[i] * self.time_unit for b in range(nb)} for i in range(S)])
            if d.theta_per_bits
            else {},
        )

    def _free_layers(self) -> tuple[dict, dict]:
        """Relaxation: y[li][b] gives layer li bits b anywhere, matching only the bitwidth totals."""
        d, nb = self.d, self.nb
        rows = d.free_quality or d.free_theta
        y = [[self.var(0, 1, f"y{li}_{b}") for b in range(nb)] for li in range(len(rows))]
        for row in y:
            self.row({v: 1 for v in row}, 1, 1)
        for b in range(nb):
            totals = {self.n[i][b]: -self.mult[i] for i in range(d.stages)}
            self.row({**{y[li][b]: 1 for li in range(len(y))}, **totals}, 0, 0)
        cells = [(y[li][b], li, b) for li in range(len(y)) for b in range(nb)]
        return ({v: d.free_quality[li][b] * self.q_unit for v, li, b in cells} if d.free_quality else {},
                {v: d.free_theta[li][b] * self.time_unit for v, li, b in cells} if d.free_theta else {})

    def objective(self, minimize_quality: bool) -> tuple[dict, float]:
        if self.d.unit_sizes:
            self.units()
        self.memory()
        self.symmetry()
        quality, theta = self.quality_terms()
        if minimize_quality:
            return quality, 0.0
        if self.d.quality_bound is not None:
            self.row(quality, -math.inf, self.d.quality_bound * self.q_unit)
        (pre, pre_const), (dec, _) = self.prefill(), self.decode()
        return _add(pre, dec, theta), pre_const

    def hint(self, hint: Hint) -> None:
        counts = list(hint.counts)
        if self.d.stage_class:  # the hint's rows in the order the symmetry constraints want
            members: dict[int, list[int]] = {}
            for i, c in enumerate(self.d.stage_class):
                members.setdefault(c, []).append(i)
            for group in members.values():
                for i, row in zip(group, sorted((counts[i] for i in group), key=sum, reverse=True)):
                    counts[i] = row
        for i, row in enumerate(counts):
            for b, value in enumerate(row):
                self.m.add_hint(self.vars[self.n[i][b]], value)
        if self.x is not None and hint.units:
            for u, (stage, bits) in enumerate(hint.units):
                for i in range(self.d.stages):
                    for b in range(self.nb):
                        self.m.add_hint(self.vars[self.x[u][i][b]], i == stage and b == bits)


def _class_pairs(classes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive members (a, b), a < b, of every class with more than one stage."""
    last: dict[int, int] = {}
    pairs = []
    for i, c in enumerate(classes):
        if c in last:
            pairs.append((last[c], i))
        last[c] = i
    return pairs


def _add(*terms: dict) -> dict:
    out: dict = {}
    for t in terms:
        for v, c in t.items():
            out[v] = out.get(v, 0) + c
    return out


def lower_bound(data: OrderInput, kp: int, kd: int) -> float | None:
    """Optimum of the LP relaxation in table units (a lower bound on the objective); None when the
    relaxation is infeasible (then so is the integer model)."""
    b = _Builder(data, kp, kd, lp=True)
    terms, const = b.objective(minimize_quality=False)
    objective = b.m.Objective()
    for v, c in terms.items():
        objective.SetCoefficient(b.vars[v], c)
    objective.SetOffset(const)
    objective.SetMinimization()
    status = b.m.Solve()
    if status == pywraplp.Solver.OPTIMAL:
        return objective.Value() / b.time_unit * (1 - 1e-7)  # LP tolerances: stay below the optimum
    if status == pywraplp.Solver.INFEASIBLE:
        return None
    return 0.0  # no proof either way: the trivial bound


def quality_lower_bound(data: OrderInput, kp: int, kd: int) -> float | None:
    """The LP relaxation's smallest summed indicator (scaled units) of a plan that fits memory; None
    when even the relaxation does not fit (then no plan does)."""
    b = _Builder(data, kp, kd, lp=True)
    terms, _ = b.objective(minimize_quality=True)
    objective = b.m.Objective()
    for v, c in terms.items():
        objective.SetCoefficient(b.vars[v], c)
    objective.SetMinimization()
    status = b.m.Solve()
    if status == pywraplp.Solver.OPTIMAL:
        return objective.Value() / b.q_unit * (1 - 1e-7)
    if status == pywraplp.Solver.INFEASIBLE:
        return None
    return 0.0  # no proof either way: the trivial bound


def solve_order(data: OrderInput, kp: int, kd: int, time_limit: float, cutoff: int | None = None,
                hint: Hint | None = None, minimize_quality: bool = False, workers: int = 1) -> OrderSolution:
    """CP-SAT for one order and micro-batch pair (`kp`, `kd` index the candidates). `cutoff`: only
    solutions with objective < cutoff matter ("infeasible" then means none is better).
    `minimize_quality`: ignore time, minimize the summed indicator within memory."""
    b = _Builder(data, kp, kd, lp=False)
    terms, const = b.objective(minimize_quality)
    const = int(round(const))
    if cutoff is not None:
        b.row(terms, -math.inf, cutoff - 1 - const)
    b.m.minimize(cp_model.LinearExpr.weighted_sum([b.vars[v] for v in terms], list(terms.values())) + const)
    if hint is not None:
        b.hint(hint)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = workers
    status = _STATUS.get(solver.solve(b.m), "unknown")
    if status not in ("optimal", "feasible"):
        return OrderSolution(status)
    counts = tuple(tuple(solver.value(b.vars[v]) for v in row) for row in b.n)
    units = ()
    if b.x is not None:
        units = tuple(
            next((i, bb) for i, row in enumerate(xu) for bb, v in enumerate(row) if solver.boolean_value(b.vars[v]))
            for xu in b.x
        )
    return OrderSolution(
        status, counts, units, int(round(solver.objective_value)), int(round(solver.best_objective_bound))
    )
