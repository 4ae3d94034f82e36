"""Token selection on the last stage: greedy, or temperature / top-k / top-p sampling.

Each sequence draws from its own generator seeded by (seed, position), so a sampled run is
reproducible whatever micro-batches the sequence travelled in and whatever the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pqmesh.errors import InvalidArgument

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the seed space
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 or 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise InvalidArgument(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgument(f"top_p must be within [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_proto(cls, msg) -> "Sampling":
        return cls(float(msg.temperature), int(msg.top_k), float(msg.top_p), int(msg.seed))


def sample(logits: torch.Tensor, params: Sequence[Sampling], positions: Sequence[int]) -> list[int]:
    """One token per row of float logits [B, V]; ``positions`` is where each token will sit."""
    if logits.shape[0] != len(params) or len(params) != len(positions):
        raise InvalidArgument(
            f"{logits.shape[0]} rows of logits, {len(params)} sampling settings, {len(positions)} positions"
        )
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, (p, position) in enumerate(zip(params, positions)):
        out.append(greedy[row] if p.greedy else _draw(logits[row].float().cpu(), p, position))
    return out


def _draw(logits: torch.Tensor, p: Sampling, position: int) -> int:
    scores = logits / p.temperature
    if p.top_k and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < p.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    generator = torch.Generator().manual_seed(((p.seed * _MIX) ^ position) & _MASK)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
