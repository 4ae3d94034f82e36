"""pqmesh planner: the LLM-PQ cost model, solver, baselines and the PlannerService.

Given a cluster of mixed GPUs, a decoder-only model and an offline workload, the planner chooses the
device order, contiguous layer ranges, a bitwidth per layer and phase-aware micro-batch sizes that
maximize generated tokens per second within a quality bound. Entry points: `planner.search.plan`
(library), `pqmesh plan` (CLI, `planner.commands`) and `pqmesh-planner` (gRPC, `planner.main`).
Importing this package does not import OR-Tools or gRPC.
"""
