"""Several pipelines for one pool (data-parallel replicas, each its own mesh plan): the planner half
of issue 19 part 2, `pqmesh plan --replicas` and `PlannerService.PlanReplicas`. No coordinator runs
several meshes yet; `bench/planner_clusters.py --large N --replicas` measures them.

A pool with more devices than the model has layers cannot be one pipeline, and a long pipeline
starves when the job has fewer sequences in flight than stages. For a number of replicas R, every
[[device]] group's devices are dealt round-robin to the R replicas (so replicas differ by at most one
device per group and keep their hosts), the job's sequences are split evenly, and each distinct
(replica pool, share of the batch) is planned once with the ordinary planner. The job takes as long
as its slowest replica, so throughput = batch x generation / max over replicas of (prefill +
decode). R is searched over a few candidates from the fewest replicas that fit the layer count
(ceil(devices / layers)), doubling, up to one sequence per replica; the best total throughput wins.
The time limit bounds the whole search: each plan gets the time left over the plans left.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import structlog

from planner.cluster import Cluster, ProfileLookup, Workload
from planner.plans import PlanResult
from planner.request import PlanInputs
from planner.search import plan
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument, PqmeshError

log = structlog.get_logger(__name__)
MAX_CANDIDATES = 4
DEFAULT_REPLICAS_LIMIT_S = 60.0


@dataclass(frozen=True)
class Replica:
    cluster: Cluster
    batch_size: int
    result: PlanResult

    @property
    def job_s(self) -> float:
        return self.result.predicted.prefill_s + self.result.predicted.decode_s


@dataclass(frozen=True)
class ReplicaPlan:
    replicas: tuple[Replica, ...]
    throughput_tokens_per_s: float
    pipeedge_tokens_per_s: float | None  # the same split, each replica running its PipeEdge plan
    optimality_gap: float  # the largest of the replicas' (for this R and split)


@dataclass(frozen=True)
class ReplicaSearch:
    best: ReplicaPlan
    tried: dict  # R -> ReplicaPlan, or the reason it has none
    solve_seconds: float

    def to_proto(self) -> planner_pb2.PlanReplicasResponse:
        best = self.best
        tried = [planner_pb2.ReplicaCount(replicas=r, feasible=isinstance(p, ReplicaPlan),
                                          throughput_tokens_per_s=p.throughput_tokens_per_s
                                          if isinstance(p, ReplicaPlan) else 0.0,
                                          reason="" if isinstance(p, ReplicaPlan) else p)
                 for r, p in self.tried.items()]
        return planner_pb2.PlanReplicasResponse(
            replicas=[planner_pb2.ReplicaPlan(devices=[e.to_proto() for e in r.cluster.entries],
                                              batch_size=r.batch_size, plan=r.result.to_proto())
                      for r in best.replicas],
            throughput_tokens_per_s=best.throughput_tokens_per_s,
            pipeedge_tokens_per_s=best.pipeedge_tokens_per_s or 0.0, optimality_gap=best.optimality_gap,
            tried=tried, solve_seconds=self.solve_seconds)

    def to_report(self) -> dict:
        """The `pqmesh plan --replicas --json` object."""
        best = self.best
        return {"replicas": [{"devices": [{"type": e.device_type, "count": e.count, "name": e.name, "host": e.host}
                                          for e in r.cluster.entries],
                              "batch_size": r.batch_size, "plan": r.result.to_report()} for r in best.replicas],
                "throughput_tokens_per_s": best.throughput_tokens_per_s,
                "pipeedge_tokens_per_s": best.pipeedge_tokens_per_s, "optimality_gap": best.optimality_gap,
                "tried": {str(r): (p.throughput_tokens_per_s if isinstance(p, ReplicaPlan) else p)
                          for r, p in self.tried.items()},
                "solve_seconds": self.solve_seconds}


def split_pool(cluster: Cluster, replicas: int) -> list[Cluster]:
    """Deal every group's devices round-robin to `replicas` pools (the dealing continues from group
    to group, so pool sizes differ by at most one); a pool gets no entry for a group it gets none of."""
    total = sum(e.count for e in cluster.entries)
    if not 1 <= replicas <= total:
        raise InvalidArgument(f"{replicas} replicas for {total} devices; every replica needs a device")
    pools: list[list] = [[] for _ in range(replicas)]
    turn = 0
    for i, entry in enumerate(cluster.entries):
        counts = [0] * replicas
        for _ in range(entry.count):
            counts[turn % replicas] += 1
            turn += 1
        host = entry.host or f"host{i}-{entry.label}"  # as planner.cluster.expand names it
        for pool, n in zip(pools, counts):
            if n:
                pool.append(replace(entry, count=n, host=host))
    return [replace(cluster, entries=tuple(p)) for p in pools]


def batch_shares(batch: int, replicas: int) -> list[int]:
    return [batch // replicas + (1 if r < batch % replicas else 0) for r in range(replicas)]


def candidates(devices: int, layers: int, batch: int) -> list[int]:
    """R from the fewest replicas whose pipelines fit the layer count, doubling, at most one per
    sequence and per device; MAX_CANDIDATES of them."""
    low, high = max(1, math.ceil(devices / layers)), min(devices, batch)
    out, r = [], low
    while r <= high and len(out) < MAX_CANDIDATES:
        out.append(r)
        r *= 2
    return out


def plan_replicas(inputs: PlanInputs, lookup: ProfileLookup | None = None, time_limit: float = DEFAULT_REPLICAS_LIMIT_S,
                  counts: list[int] | None = None) -> ReplicaSearch:
    """The best number of replicas among `counts` (default: `candidates`) and its plans."""
    started, deadline = time.monotonic(), time.monotonic() + time_limit
    devices = sum(e.count for e in inputs.cluster.entries)
    layers = inputs.shape().num_layers
    counts = counts or candidates(devices, layers, inputs.workload.batch_size)
    if not counts:
        raise InvalidArgument(f"no replica count fits {devices} devices, {layers} layers and a batch of "
                              f"{inputs.workload.batch_size}: every replica needs a sequence")
    jobs = []  # distinct (pool, share) per R
    for r in counts:
        pools = split_pool(inputs.cluster, r)
        jobs.append((r, list(zip(pools, batch_shares(inputs.workload.batch_size, r)))))
    distinct = {(p, s) for _, pairs in jobs for p, s in pairs}
    solved: dict = {}
    left = len(distinct)
    tried: dict = {}
    first_error: PqmeshError | None = None
    for r, pairs in jobs:
        try:
            replicas = []
            for pool, share in pairs:
                if (pool, share) not in solved:
                    share_s = max(0.1, (deadline - time.monotonic()) / max(1, left))
                    left -= 1
                    sub = replace(inputs, cluster=pool, workload=replace(inputs.workload, batch_size=share))
                    solved[(pool, share)] = plan(sub.to_problem(lookup), share_s)
                replicas.append(Replica(pool, share, solved[(pool, share)]))
            tried[r] = _combine(inputs.workload, replicas)
        except PqmeshError as err:
            tried[r], first_error = str(err), first_error or err
    plans = [p for p in tried.values() if isinstance(p, ReplicaPlan)]
    if not plans:  # the first failure's kind (e.g. RESOURCE_EXHAUSTED), every count's reason
        raise type(first_error)("no replica count has a plan: "
                                + "; ".join(f"{r} replicas: {why}" for r, why in tried.items()))
    best = max(plans, key=lambda p: p.throughput_tokens_per_s)
    seconds = time.monotonic() - started
    log.info("replicas_planned", devices=devices, tried=sorted(tried), replicas=len(best.replicas),
             throughput=round(best.throughput_tokens_per_s, 2), seconds=round(seconds, 3))
    return ReplicaSearch(best, tried, seconds)


def _combine(workload: Workload, replicas: list[Replica]) -> ReplicaPlan:
    tokens = workload.batch_size * workload.generation_length
    ours = tokens / max(r.job_s for r in replicas)
    pipeedge = [r.result.baselines.get("pipeedge") for r in replicas]
    theirs = None
    if all(b is not None and b.feasible for b in pipeedge):
        theirs = tokens / max(b.predicted.prefill_s + b.predicted.decode_s for b in pipeedge)
    return ReplicaPlan(tuple(replicas), ours, theirs, max(r.result.optimality_gap for r in replicas))
