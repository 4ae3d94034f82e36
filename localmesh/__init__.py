"""The one-machine demo: real planner, stage and coordinator processes on loopback.

Only plain values live here, so that `pqmesh --help` does not import gRPC or torch.
"""

#: Memory budgets (MiB) of the demo's two stages, one per core: the 64-prompt job does not fit at 16 bits
#: (float32 on a CPU) and the second stage holds few layers even at 8, so PipeEdge's one bitwidth
#: costs it the balance; mixed bitwidths keep fp32 layers where they fit.
DEFAULT_BUDGETS_MB = (450, 200)
