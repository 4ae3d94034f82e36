"""The coordinator's Prometheus metrics (docs/metrics.md): tokens generated, the scheduler's queues,
jobs by state (read from the job store at scrape time) and Forward stream recoveries."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from coordinator.store import JobState
from pqmesh.metrics import ProcessMetrics


class _JobsByState:
    """A custom collector: one `pqmesh_coordinator_jobs{state}` sample per job state, counted in SQLite."""

    def __init__(self, store) -> None:
        self._store = store

    def collect(self):
        counts = self._store.state_counts()
        family = GaugeMetricFamily("pqmesh_coordinator_jobs", "Jobs in the job store by state", labels=["state"])
        for state in JobState:
            family.add_metric([state.name.lower()], counts.get(state, 0))
        yield family

    def describe(self):
        return []  # collected lazily: nothing is read while the collector is registered


class CoordinatorMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = self.counter(
            "pqmesh_tokens_generated_total",
            "Tokens sampled for jobs (each (sequence, position) once, also across mesh recoveries)",
        )
        self.micro_batches = self.counter("pqmesh_coordinator_micro_batches_total",
                                          "Micro-batches sent into the pipeline", ("phase",))
        self.recoveries = self.counter("pqmesh_coordinator_mesh_recoveries_total",
                                       "Times the Forward stream or a stage failed and the mesh was brought up again")

    def watch(self, scheduler, store) -> None:
        """Gauges read at scrape time from the scheduler's queues and the job store."""
        self.gauge_of("pqmesh_coordinator_waiting_sequences", "Prompts waiting for a KV slot (not yet prefilled)",
                      lambda: len(scheduler.waiting))
        self.gauge_of(
            "pqmesh_coordinator_ready_sequences",
            "Sequences holding a slot, waiting for a decode micro-batch",
            lambda: len(scheduler.ready),
        )
        self.gauge_of("pqmesh_coordinator_in_flight_micro_batches", "Micro-batches in the pipeline now",
                      lambda: len(scheduler.in_flight))
        self.gauge_of("pqmesh_coordinator_in_flight_capacity", "Micro-batches the pipeline may hold at once",
                      lambda: scheduler.max_in_flight)
        self.registry.register(_JobsByState(store))
