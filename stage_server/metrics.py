"""A stage process's Prometheus metrics (docs/metrics.md): micro-batch compute and queue-wait
histograms by phase, tokens processed, the compute queue's depth and the KV-slot occupancy."""

from __future__ import annotations

from pqmesh.metrics import ProcessMetrics


class StageMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.compute_seconds = self.histogram(
            "pqmesh_stage_compute_seconds", "Compute time of one micro-batch on this stage", ("phase",))
        self.queue_wait_seconds = self.histogram(
            "pqmesh_stage_queue_wait_seconds", "Time a micro-batch waited between arrival and compute", ("phase",))
        self.tokens = self.counter(
            "pqmesh_stage_tokens_processed_total", "Token positions run through this stage's layers", ("phase",))
        self.sampled = self.counter(
            "pqmesh_stage_tokens_sampled_total", "Token ids sampled (last stage only)")

    def watch(self, runtime, worker) -> None:
        """Gauges read at scrape time from the runtime and the compute worker (lock-free reads)."""
        self.gauge_of("pqmesh_stage_queue_depth", "Micro-batches waiting for this stage's compute thread",
                      worker.queue_depth)
        self.gauge_of("pqmesh_stage_queue_capacity", "Micro-batches the compute queue holds before backpressure",
                      lambda: worker.capacity)
        self.gauge_of("pqmesh_stage_kv_slots_used", "KV-cache slots holding a sequence",
                      lambda: runtime.kv_slots()[0])
        self.gauge_of("pqmesh_stage_kv_slots_capacity", "KV-cache slots of the loaded shard (0: none loaded)",
                      lambda: runtime.kv_slots()[1])
        self.gauge_of("pqmesh_stage_memory_budget_bytes", "Bytes this stage may hold (weights + KV cache)",
                      lambda: runtime.memory_budget)

    def micro_batch(self, phase: str, tokens: int, sampled: int, compute_ns: int, queue_ns: int) -> None:
        """Records one computed micro-batch."""
        self.compute_seconds.labels(phase=phase).observe(compute_ns / 1e9)
        self.queue_wait_seconds.labels(phase=phase).observe(queue_ns / 1e9)
        self.tokens.labels(phase=phase).inc(tokens)
        if sampled:
            self.sampled.inc(sampled)
