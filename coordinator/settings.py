"""A job's generation settings: the defaults of every prompt of the job (per-request parameters win)."""

from __future__ import annotations

from dataclasses import dataclass

from pqmesh.errors import InvalidArgument


@dataclass(frozen=True)
class GenerationSettings:
    """Applied to every prompt of a job; prompt i samples with a seed derived from (seed, i)."""

    max_new_tokens: int
    stop_on_eos: bool = True
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument("params.max_new_tokens must be at least 1")
        if not self.temperature >= 0:
            raise InvalidArgument(f"params.sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgument(f"params.sampling.top_p must be within [0, 1], got {self.top_p}")
        if self.top_k < 0 or self.seed < 0:
            raise InvalidArgument("params.sampling.top_k and seed must be >= 0")

    @classmethod
    def from_stored(cls, params: dict) -> "GenerationSettings":
        """From a job's stored params (which may carry other keys, e.g. ``requests``)."""
        return cls(params["max_new_tokens"], params["stop_on_eos"], params["temperature"], params["top_k"],
                   params["top_p"], params["seed"])
