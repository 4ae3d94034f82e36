"""Workload grids: which (micro-batch, prompt) prefill points and (micro-batch, context) decode points
the profiler times, and held-out points between them for validation.

Defaults are small enough that a CPU profile of SmolLM2-135M at four bitwidths takes a few minutes
on two cores; the CUDA default reaches the batch and lengths an offline job on a GPU uses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pqmesh.errors import InvalidArgument
from pqmesh.types import Phase

GRID_VERSION = 1


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4), sorted and deduplicated; InvalidArgument names the flag."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InvalidArgument(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise InvalidArgument(f"{what} must be comma-separated positive integers, got {text!r}")
    return tuple(values)


@dataclass(frozen=True)
class Grid:
    """Prefill: every prefill batch x prompt length. Decode: every decode batch x context length
    (context = tokens attended by the new token, i.e. cached + 1)."""

    prefill_batches: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    version: int = GRID_VERSION

    def __post_init__(self) -> None:
        if self.version != GRID_VERSION:
            raise InvalidArgument(f"grid version {self.version} is not supported; use {GRID_VERSION}")
        for name in ("prefill_batches", "prompt_lengths", "decode_batches", "contexts"):
            values = getattr(self, name)
            if not values or min(values) < 1 or list(values) != sorted(set(values)):
                raise InvalidArgument(f"grid {name} must be increasing positive integers, got {values}")
        if min(self.contexts) < 2:
            raise InvalidArgument("decode contexts must be >= 2 (at least one cached token plus the new one)")
        if len(self.points(Phase.PREFILL)) < 5 or len(self.points(Phase.DECODE)) < 4:
            raise InvalidArgument("the grid needs at least 5 prefill and 4 decode points to fit the latency model")

    def points(self, phase: Phase) -> list[tuple[int, int]]:
        if phase == Phase.PREFILL:
            return [(b, n) for b in self.prefill_batches for n in self.prompt_lengths]
        return [(b, c) for b in self.decode_batches for c in self.contexts]

    @property
    def max_batch(self) -> int:
        return max(max(self.prefill_batches), max(self.decode_batches))

    @property
    def max_length(self) -> int:
        return max(max(self.prompt_lengths), max(self.contexts))

    def to_json(self) -> dict:
        return {"prefill_batches": list(self.prefill_batches), "prompt_lengths": list(self.prompt_lengths),
                "decode_batches": list(self.decode_batches), "contexts": list(self.contexts), "version": self.version}

    @classmethod
    def from_json(cls, data: dict) -> Grid:
        return cls(tuple(data["prefill_batches"]), tuple(data["prompt_lengths"]), tuple(data["decode_batches"]),
                   tuple(data["contexts"]), int(data.get("version", GRID_VERSION)))


#: Lengths sit just off powers of two on purpose: a generation's decode contexts take every value and
#: prompts any length, so most real shapes are not multiples of 8 or 16, and on CUDA aligned lengths
#: can take faster attention paths (on an H100, SmolLM2 decode at contexts 128..2048 timed ~1.1 ms per
#: layer, at unaligned contexts in the same rounds ~1.7 ms). Held-out points are unaligned too.
PRESETS: dict[str, Grid] = {
    "quick": Grid((1, 2, 4), (7, 15), (1, 2, 4), (7, 23)),
    "cpu": Grid((1, 2, 4, 8), (15, 63, 127, 255), (1, 2, 4, 8, 16), (31, 127, 511)),
    "cuda": Grid((1, 2, 4, 8, 16), (63, 127, 255, 511, 1023), (1, 4, 8, 16, 32, 64), (127, 511, 1023, 2047)),
}


def default_grid(device_type: str) -> Grid:
    return PRESETS["cuda" if device_type == "cuda" else "cpu"]


def _between(values: tuple[int, ...], rng: random.Random) -> int:
    """A log-uniform integer within [min, max] of `values`, preferring one not in `values`."""
    lo, hi = values[0], values[-1]
    if hi - lo + 1 <= len(values):  # every integer in range is a grid value
        return rng.choice(values)
    for _ in range(100):
        value = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if value not in values:
            return value
    return rng.choice(values)


def held_out(grid: Grid, phase: Phase, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` distinct points inside the grid's ranges but not on the grid (batch or length off-grid)."""
    if count < 1:
        raise InvalidArgument(f"held-out point count must be >= 1, got {count}")
    batches, lengths = ((grid.prefill_batches, grid.prompt_lengths) if phase == Phase.PREFILL
                        else (grid.decode_batches, grid.contexts))
    rng = random.Random(f"{seed}-{phase.name}")
    on_grid, chosen = set(grid.points(phase)), []
    for _ in range(count * 50):
        point = (_between(batches, rng), _between(lengths, rng))
        if point not in on_grid and point not in chosen:
            chosen.append(point)
            if len(chosen) == count:
                break
    return chosen
