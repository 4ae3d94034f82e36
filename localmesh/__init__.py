"""The one-machine demo: real planner, stage and coordinator processes on loopback.

Only plain values live here, so that `pqmesh --help` does not import gRPC or torch.
"""

#: Memory budgets (MiB) of the demo's three stages: together they hold the model at mixed precision,
#: but not at 16 bits (float32 on a CPU).
DEFAULT_BUDGETS_MB = (260, 180, 160)
