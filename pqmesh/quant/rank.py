"""Spearman rank correlation, the one measure by which indicators are judged against the damage
they predict (`pqmesh.quant.sensitivity`, bench/quant_quality.py). Torch-free."""

from __future__ import annotations

import math
from typing import Sequence

from pqmesh.errors import InvalidArgument


def ranks(values: Sequence[float]) -> list[float]:
    """0-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho of two equally long sequences (Pearson correlation of their ranks)."""
    if len(a) != len(b) or len(a) < 2:
        raise InvalidArgument(f"Spearman needs two sequences of one length >= 2, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0
