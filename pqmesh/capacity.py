"""How much of a device a stage may use: one rule, for the stage's default budget and the planner.

A device of ``total`` bytes keeps a reserve free: 1 GiB on a GPU (the CUDA context and allocator
slack), a fifth of the RAM on a CPU host (the OS, the other processes). A stage started without
`--memory-budget` holds at most ``total - reserve`` (`default_budget`); a profile of that device
written without `--memory-bytes` carries ``memory_bytes = total`` and ``reserve_bytes = reserve``
(`default_reserve`), so the planner plans with the same bytes the stage will accept. A profile made
for an explicit stage budget (`pqmesh profile --memory-bytes BUDGET`) has no reserve: the budget is
already what the stage may hold.
"""

from __future__ import annotations

import os

GIB = 1 << 30
GPU_RESERVE_BYTES = 1 * GIB
CPU_RESERVE_FRACTION = 0.2


def default_reserve(kind: str, total: int) -> int:
    """Bytes of a ``kind`` ("cpu" or "cuda") device of ``total`` bytes that no stage uses."""
    if kind == "cuda":
        return min(GPU_RESERVE_BYTES, total // 2)
    return int(total * CPU_RESERVE_FRACTION)


def default_budget(kind: str, total: int) -> int:
    """What a stage on the device may hold when no budget is given: total minus the reserve."""
    return total - default_reserve(kind, total)


def physical_memory_bytes() -> int:
    """RAM of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
