"""The coordinator: batch jobs in, phase-aware pipelined generation across the stage mesh, durable
results out.

Parts: `plan` (the mesh plan a coordinator runs), `store` (SQLite jobs, prompts and results),
`scheduler` (pure: micro-batches, KV slots, finished sequences), `mesh` (stage bring-up and
release), `engine` (drives the scheduler over one Forward stream), `jobs` (the job API core),
`servicer` (thin gRPC layer), `main` (the `pqmesh-coordinator` process) and `commands`
(`pqmesh submit`, `pqmesh results`, `pqmesh jobs`, `pqmesh cancel`).
"""
