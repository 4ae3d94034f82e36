"""Device orders to search: distinct pipelines over individual devices, with symmetry pruning.

Devices of the same kind (same profile and host) are interchangeable, so orders are permutations of
the multiset of kinds. For layer-uniform costs an order matters only through its cost class
(`order_key`): the profiles of its first device (embeddings) and last device (LM head), how many
forward links cross hosts, and whether the decode return link does; identical devices on other
hosts are interchangeable too. When a network link is no faster than an intra-host link, fewer
crossings never hurt, so one order per (first kind, last kind) with the fewest crossings (hosts as
contiguous blocks) covers every class that can win, and `representative_orders` keeps one order
per class among those; `undominated` then drops classes with more crossings and no better return
link than another of the same (first, last) profiles. Per-layer indicators make positions matter,
so `all_orders` enumerates every distinct order.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import structlog

from planner.cluster import Device, Network

log = structlog.get_logger(__name__)
MAX_ORDERS = 5040


def crossings(order: list[Device]) -> int:
    return sum(a.host != b.host for a, b in zip(order, order[1:]))


def order_key(order: list[Device]) -> tuple:
    """What the cost of an order depends on when every layer costs the same: the first and last
    devices' profiles, the forward links crossing hosts, and whether the return link stays on a host."""
    return (order[0].profile, order[-1].profile, crossings(order), order[0].host == order[-1].host)


def all_orders(devices: tuple[Device, ...], limit: int = MAX_ORDERS) -> list[list[Device]]:
    """Distinct orders (multiset permutations of kinds), at most `limit`, in lexicographic order."""
    pools: dict[tuple, list[Device]] = defaultdict(list)
    for d in devices:
        pools[d.kind].append(d)
    kinds = sorted(pools)
    remaining = Counter({k: len(v) for k, v in pools.items()})
    out: list[list[Device]] = []

    def extend(prefix: list[tuple]) -> None:
        if len(out) >= limit:
            return
        if len(prefix) == len(devices):
            used: Counter = Counter()
            order = []
            for kind in prefix:
                order.append(pools[kind][used[kind]])
                used[kind] += 1
            out.append(order)
            return
        for kind in kinds:
            if remaining[kind]:
                remaining[kind] -= 1
                extend(prefix + [kind])
                remaining[kind] += 1

    extend([])
    if len(out) >= limit:
        log.warning("device_orders_truncated", limit=limit, devices=len(devices))
    return out


def _host_block_order(devices: tuple[Device, ...], first: Device, last: Device) -> list[Device]:
    """first, then its host's other devices, other hosts as blocks, last's host's devices, last."""
    rest = [d for d in devices if d is not first and d is not last]
    by_host: dict[str, list[Device]] = defaultdict(list)
    for d in rest:
        by_host[d.host].append(d)
    head = by_host.pop(first.host, [])
    tail = by_host.pop(last.host, []) if last.host != first.host else []
    middle = [d for host in sorted(by_host) for d in by_host[host]]
    if last.host == first.host and middle:
        return [first, *middle, *head, last]  # leave the host once and come back
    return [first, *head, *middle, *tail, last]


def network_never_faster(network: Network) -> bool:
    return (
        network.bandwidth_gbps <= network.intra_host_bandwidth_gbps
        and network.latency_us >= network.intra_host_latency_us
    )


def representative_orders(devices: tuple[Device, ...], network: Network) -> list[list[Device]]:
    """One order per cost-equivalence class (see module docstring)."""
    if len(devices) == 1:
        return [list(devices)]
    if not network_never_faster(network):
        seen: dict[tuple, list[Device]] = {}
        for order in all_orders(devices):
            seen.setdefault(order_key(order), order)
        return list(seen.values())
    firsts: dict[tuple, Device] = {}
    for d in devices:
        firsts.setdefault(d.kind, d)
    seen: dict[tuple, list[Device]] = {}
    for first in firsts.values():
        for last_kind in firsts:
            last = next((d for d in devices if d.kind == last_kind and d is not first), None)
            if last is not None:
                order = _host_block_order(devices, first, last)
                seen.setdefault(order_key(order), order)
    return list(seen.values())


def undominated(orders: list[list[Device]], network: Network) -> list[list[Device]]:
    """Orders whose class no other class of the same (first, last) profiles beats on every link: one
    with no more host crossings and a return link at least as local (layer-uniform costs only, and
    only when the network is never faster than an intra-host link: then link times only grow with
    crossings, and every pipeline formula grows with every link time)."""
    if not network_never_faster(network):
        return orders
    keys = [order_key(o) for o in orders]

    def beaten(k: tuple) -> bool:
        return any(o[:2] == k[:2] and o != k and o[2] <= k[2] and o[3] >= k[3] for o in keys)

    return [o for o, k in zip(orders, keys) if not beaten(k)]
