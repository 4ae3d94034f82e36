"""Length histograms: how many sequences of a job have each prompt (or generation) length.

`LengthHistogram` is what the planner plans for instead of one number (`planner.cluster.Workload`),
what `pqmesh plan --prompt-lengths 128:900,2048:100` parses, what a coordinator builds from a stored
job's requests, and what the job-time replay (`pqmesh.mesh_sim`) draws its sequences from: `sample`
returns lengths in the histogram's proportions (largest remainder), in an order mixed with a fixed
seed, so a replay of n sequences is repeatable and sees long and short prompts interleaved as a real
job does, not sorted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument

MAX_BINS = 4096  # distinct lengths; a histogram of a real job is much smaller after binning
SAMPLE_SEED = 20261202
GENERATION_SEED = SAMPLE_SEED + 1  # generation lengths are drawn in another order than prompt lengths


@dataclass(frozen=True)
class LengthHistogram:
    bins: tuple[tuple[int, int], ...]  # (length, count), lengths ascending and distinct, counts >= 1

    def __post_init__(self) -> None:
        if not self.bins:
            raise InvalidArgument("a length histogram needs at least one length with a count")
        if len(self.bins) > MAX_BINS:
            raise InvalidArgument(f"a length histogram has {len(self.bins)} distinct lengths; bin them to at "
                                  f"most {MAX_BINS} (e.g. round lengths up to a multiple of 16)")
        lengths = [length for length, _ in self.bins]
        if lengths != sorted(set(lengths)):
            raise InvalidArgument("length histogram bins must have distinct lengths in ascending order")
        for length, count in self.bins:
            if length < 1 or count < 1:
                raise InvalidArgument(f"length histogram bin {length}:{count}: lengths and counts must be >= 1")

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]]) -> LengthHistogram:
        """From (length, count) pairs in any order; repeated lengths add up, zero counts drop out."""
        total: Counter[int] = Counter()
        for length, count in pairs:
            if length < 1 or count < 0:
                raise InvalidArgument(f"length histogram bin {length}:{count}: lengths must be >= 1, counts >= 0")
            total[int(length)] += int(count)
        return cls(tuple(sorted((length, count) for length, count in total.items() if count)))

    @classmethod
    def from_lengths(cls, lengths: Iterable[int]) -> LengthHistogram:
        return cls.of((length, 1) for length in lengths)

    @classmethod
    def parse(cls, text: str, what: str = "lengths") -> LengthHistogram:
        """``LENGTH:COUNT,LENGTH:COUNT,...`` (a bare LENGTH counts 1), e.g. ``128:900,2048:100``."""
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            length, _, count = item.partition(":")
            try:
                pairs.append((int(length), int(count) if count else 1))
            except ValueError:
                raise InvalidArgument(f"{what} {text!r}: {item!r} is not LENGTH:COUNT with whole numbers, "
                                      f"e.g. 128:900,2048:100") from None
        if not pairs:
            raise InvalidArgument(f"{what} {text!r} holds no LENGTH:COUNT pair, e.g. 128:900,2048:100")
        return cls.of(pairs)

    def __str__(self) -> str:
        return ",".join(f"{length}:{count}" for length, count in self.bins)

    @property
    def total(self) -> int:
        return sum(count for _, count in self.bins)

    @property
    def longest(self) -> int:
        return self.bins[-1][0]

    @property
    def mean(self) -> float:
        return sum(length * count for length, count in self.bins) / self.total

    def quantile(self, q: float) -> int:
        """The smallest length with at least a fraction ``q`` of the sequences at or below it."""
        if not 0 < q <= 1:
            raise InvalidArgument(f"a length quantile must be within (0, 1], got {q}")
        need, seen = q * self.total, 0
        for length, count in self.bins:
            seen += count
            if seen >= need - 1e-9:
                return length
        return self.longest

    def sample(self, n: int, seed: int = SAMPLE_SEED) -> list[int]:
        """``n`` lengths in the histogram's proportions (largest remainder), in a repeatable mixed order."""
        if n < 1:
            raise InvalidArgument(f"sample at least one length, got {n}")
        shares = [count * n / self.total for _, count in self.bins]
        taken = [math.floor(s) for s in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: (taken[i] - shares[i], i))
        for i in by_remainder[: n - sum(taken)]:
            taken[i] += 1
        out = [length for (length, _), k in zip(self.bins, taken) for _ in range(k)]
        random.Random(seed).shuffle(out)
        return out

    def to_proto(self) -> list[planner_pb2.LengthCount]:
        return [planner_pb2.LengthCount(length=length, count=count) for length, count in self.bins]

    @classmethod
    def from_proto(cls, bins) -> LengthHistogram | None:
        """A histogram from repeated ``LengthCount`` (None when there are none)."""
        return cls.of((b.length, b.count) for b in bins) if len(bins) else None


def draw(histogram: LengthHistogram | None, fixed: int, n: int, seed: int = SAMPLE_SEED) -> list[int]:
    """``n`` lengths: drawn from ``histogram`` (`LengthHistogram.sample`), or ``fixed`` each without one."""
    return histogram.sample(n, seed) if histogram is not None else [fixed] * n


def job_lengths(workload: planner_pb2.Workload) -> tuple[list[int], list[int]]:
    """(prompt lengths, max_new_tokens) of the sequences a proto ``Workload`` stands for, one each:
    drawn from its histograms or its single lengths, as `planner.cluster.Workload` draws them; at least one."""
    prompts = LengthHistogram.from_proto(workload.prompt_lengths)
    generations = LengthHistogram.from_proto(workload.generation_lengths)
    n = max(1, workload.batch_size or (prompts.total if prompts else 1))
    return (draw(prompts, max(1, workload.prompt_length), n),
            draw(generations, max(1, workload.generation_length), n, GENERATION_SEED))
