"""The planner's Prometheus metrics (docs/metrics.md): Plan requests by outcome, solve time, and the
number of registered device profiles."""

from __future__ import annotations

from pqmesh.metrics import ProcessMetrics

# a Plan call's solve is bounded by its time limit (at most MAX_TIME_LIMIT_S = 300 s)
SOLVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class PlannerMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.plan_requests = self.counter("pqmesh_planner_plan_requests_total", "Plan calls by outcome",
                                          ("outcome",))
        self.solve_seconds = self.histogram("pqmesh_planner_solve_seconds",
                                            "Search time of a successful Plan call (baselines + solver)",
                                            buckets=SOLVE_BUCKETS)

    def watch(self, registry) -> None:
        self.gauge_of("pqmesh_planner_registered_devices", "Device profiles in the registry",
                      lambda: len(registry.names()))
