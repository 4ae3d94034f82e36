"""A device made of CPU cores: parse an affinity list ("0-3,6"), check it, and pin this process to it.

`pqmesh-stage --cpus` and `pqmesh profile --cpus` both call `pin`, so a stage runs under exactly the
pinning its profile was measured under: the process may run only on those cores
(`os.sched_setaffinity`) and torch computes with one intra-op thread per core. Sets that overlap, or
name cores this process may not use, are refused with the cores to change.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

from pqmesh.errors import InvalidArgument

_ITEM = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_cpus(text: str) -> tuple[int, ...]:
    """"0-3,6" -> (0, 1, 2, 3, 6): sorted, each core once. Empty or malformed text is refused."""
    cores: set[int] = set()
    if not text.strip():
        raise InvalidArgument("--cpus is empty; give an affinity list such as 0-3 or 0,2")
    for item in text.split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise InvalidArgument(f"--cpus {text!r}: cannot read {item.strip()!r}; write cores as 0-3,6")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise InvalidArgument(f"--cpus {text!r}: range {first}-{last} runs backwards; write {last}-{first}")
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def format_cpus(cores: Iterable[int]) -> str:
    """(0, 1, 2, 3, 6) -> "0-3,6"."""
    out, ordered = [], sorted(set(cores))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def available_cpus() -> tuple[int, ...]:
    """Cores this process may run on now."""
    return tuple(sorted(os.sched_getaffinity(0)))


def check_available(cores: Iterable[int], available: Iterable[int] | None = None) -> None:
    """Refuses cores this process may not use (absent, offline or outside its own affinity)."""
    have = set(available_cpus() if available is None else available)
    missing = sorted(set(cores) - have)
    if missing:
        raise InvalidArgument(f"--cpus names cores {format_cpus(missing)}, which this process cannot use "
                              f"(available: {format_cpus(have)}); pick cores from that list")


def check_disjoint(sets: Mapping[str, Iterable[int]]) -> None:
    """Refuses two devices sharing a core: each pinned set is one device."""
    owner: dict[int, str] = {}
    for name, cores in sets.items():
        for core in cores:
            if core in owner:
                shared = sorted(set(sets[owner[core]]) & set(cores))
                raise InvalidArgument(f"devices {owner[core]!r} and {name!r} both use cores {format_cpus(shared)}; "
                                      "give every device its own cores (each pinned set is one device)")
            owner[core] = name


def pin(cores: Iterable[int]) -> tuple[int, ...]:
    """Pins this process to ``cores`` and sets torch's intra-op threads to their number; returns them."""
    import torch

    chosen = tuple(sorted(set(cores)))
    check_available(chosen)
    _pin_threads(chosen)
    torch.set_num_threads(len(chosen))
    _pin_threads(chosen)  # threads torch started for it
    return chosen


def _pin_threads(cores: tuple[int, ...]) -> None:
    """sched_setaffinity binds one thread: pin every thread of this process (new ones inherit it)."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
