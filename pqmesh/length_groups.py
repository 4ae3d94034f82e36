"""Which waiting prompts share a prefill micro-batch: the oldest one and those nearest its length.

A prefill micro-batch is left-padded to its longest row, so a FIFO group of mixed lengths (a real
job's prompts: tens to thousands of tokens) spends compute and activation memory on padding. Among
the first ``window`` waiting prompts, `prefill_group` picks the ``size`` that waste the fewest
padded tokens, always with the oldest: a prompt at queue position p is prefilled within p + 1 prefill
micro-batches, so nothing starves. ``window == size`` is plain FIFO order.

Pure logic shared by `coordinator.scheduler.Scheduler` (what runs) and `pqmesh.mesh_sim` (what the
cost model replays), so the prediction follows the schedule.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_WINDOW = 8  # candidates per place in the micro-batch: the first 8 x size waiting prompts


def prefill_group(lengths: Sequence[int], size: int) -> list[int]:
    """Positions, ascending, into ``lengths`` (contexts of the first waiting prompts, oldest first) of
    the ``size`` prompts to prefill together: position 0 and the ``size - 1`` others that make the
    fewest padded tokens (``size * longest - sum``); ties go to the shorter group, then the older.

    For a given longest row the best others are the longest ones not above it, a run of the others
    sorted by length, so trying every run of ``size - 1`` finds the optimum in O(n log n)."""
    if size >= len(lengths):
        return list(range(len(lengths)))
    if size < 1:
        return []
    head, k = lengths[0], size - 1
    others = sorted(range(1, len(lengths)), key=lambda i: (lengths[i], i))
    prefix, ages = [0], [0]  # running sums of lengths and of queue positions
    for i in others:
        prefix.append(prefix[-1] + lengths[i])
        ages.append(ages[-1] + i)
    best, best_key = 0, None
    for start in range(len(others) - k + 1):
        longest = max(head, lengths[others[start + k - 1]]) if k else head
        run = prefix[start + k] - prefix[start]
        key = (size * longest - head - run, longest, ages[start + k] - ages[start])
        if best_key is None or key < best_key:
            best, best_key = start, key
    return [0, *sorted(others[best:best + k])]


def take_prefill_group(waiting: deque[T], size: int, window: int, length: Callable[[T], int]) -> list[T]:
    """Removes from ``waiting`` (oldest first) and returns, in queue order, the ``size`` entries to
    prefill together, chosen by `prefill_group` among the first ``window`` x ``size``."""
    candidates = [waiting[i] for i in range(min(len(waiting), size * window))]
    picked = prefill_group([length(c) for c in candidates], size)
    for i in reversed(picked):
        del waiting[i]
    return [candidates[i] for i in picked]


def padded_tokens(groups: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(real, padded) prompt tokens over prefill groups given as their rows' lengths."""
    real = sum(sum(g) for g in groups)
    return real, sum(len(g) * max(g) for g in groups if g)
