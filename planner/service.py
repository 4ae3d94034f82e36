"""PlannerService: a thin gRPC servicer over the registry and the planner library (Plan, WhatIf, PlanReplicas)."""

from __future__ import annotations

import structlog

from planner.devices import DeviceProfile
from planner.metrics import PlannerMetrics
from planner.registry import ProfileRegistry
from planner.replicas import DEFAULT_REPLICAS_LIMIT_S, plan_replicas
from planner.request import PlanInputs
from planner.search import plan
from planner.whatif import DEFAULT_FRONTIER_POINTS, DEFAULT_WHAT_IF_LIMIT_S, what_if
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.grpc_server import rpc_errors

log = structlog.get_logger(__name__)
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
MAX_TIME_LIMIT_S = 300.0


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, registry: ProfileRegistry, metrics: PlannerMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or PlannerMetrics()
        self.metrics.watch(registry)

    @rpc_errors
    def RegisterDevice(self, request, context):
        if not request.HasField("profile"):
            raise InvalidArgument("RegisterDevice needs a profile")
        profile = DeviceProfile.from_proto(request.profile)
        replaced = self.registry.put(profile)
        return planner_pb2.RegisterDeviceResponse(profile=profile.to_proto(), replaced=replaced)

    @rpc_errors
    def ListDevices(self, request, context):
        return planner_pb2.ListDevicesResponse(devices=[p.to_proto() for p in self.registry.list()])

    @rpc_errors
    def GetDevice(self, request, context):
        found = self.registry.get(request.name)
        if found is None:
            raise NotFound(f"no device profile named {request.name!r}; registered: {self.registry.names()} "
                           "(built-in GPU types need no registration)")
        return found.to_proto()

    @rpc_errors
    def Plan(self, request, context):
        outcome = "error"  # any PqmeshError or crash; its status is in pqmesh_rpc_errors_total
        try:
            inputs = PlanInputs.from_proto(request)
            if inputs.time_limit_s > MAX_TIME_LIMIT_S:
                raise InvalidArgument(
                    f"time_limit_seconds {inputs.time_limit_s} exceeds {MAX_TIME_LIMIT_S}; ask for less"
                )
            result = plan(inputs.to_problem(self.registry.get), inputs.time_limit_s)
            outcome = "ok"
        finally:
            self.metrics.plan_requests.labels(outcome=outcome).inc()
        self.metrics.solve_seconds.observe(result.solve_seconds)
        log.info("plan_served", plan_id=result.plan.plan_id, solve_seconds=round(result.solve_seconds, 3))
        return result.to_proto()

    @rpc_errors
    def WhatIf(self, request, context):
        inputs, limit = _base_and_limit(request, "WhatIf", "(cluster, model, workload) to ask about",
                                        DEFAULT_WHAT_IF_LIMIT_S)
        result = what_if(inputs, self.registry.get, limit, request.frontier_points or DEFAULT_FRONTIER_POINTS,
                         tuple(request.extra_device_types))
        log.info("what_if_served", plan_id=result.base.plan.plan_id, solve_seconds=round(result.solve_seconds, 3),
                 cut_short=result.cut_short)
        return result.to_proto()

    @rpc_errors
    def PlanReplicas(self, request, context):
        inputs, limit = _base_and_limit(request, "PlanReplicas", "(pool, model, workload) to split",
                                        DEFAULT_REPLICAS_LIMIT_S)
        if any(r < 1 for r in request.replica_counts):
            raise InvalidArgument(f"replica_counts {list(request.replica_counts)} must all be at least 1")
        found = plan_replicas(inputs, self.registry.get, limit, list(request.replica_counts) or None)
        log.info("replicas_served", replicas=len(found.best.replicas), solve_seconds=round(found.solve_seconds, 3))
        return found.to_proto()


def _base_and_limit(request, method: str, what: str, default_limit: float) -> tuple[PlanInputs, float]:
    """The `base` PlanRequest and the time limit of a request that asks about a base plan."""
    if not request.HasField("base"):
        raise InvalidArgument(f"{method} needs `base`: the PlanRequest {what}")
    inputs = PlanInputs.from_proto(request.base)
    limit = request.time_limit_seconds or default_limit
    if not 0 < limit <= MAX_TIME_LIMIT_S:
        raise InvalidArgument(f"time_limit_seconds {limit} must be within (0, {MAX_TIME_LIMIT_S}]; ask for less")
    return inputs, limit
