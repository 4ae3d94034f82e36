"""Device profiler: time decoder layers of a model's shape on this device, fit the planner's latency
model per (bits, phase), measure the stage-to-stage link, and write a `DeviceProfile` JSON.

Modules: `grid` (workload points), `target` (model and device being profiled), `timing` (the timed
shard), `fit` (non-negative least squares), `cache` (versioned result files), `run` (one profile end
to end), `validate` (held-out error), `link` (gRPC link latency and bandwidth), `commands` (CLI).
"""
