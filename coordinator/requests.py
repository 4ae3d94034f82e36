"""One request of a batch job, as the coordinator reads it from a `Prompt`: what to feed (text, token ids
or chat messages), the client's custom_id and the per-request generation parameters.

Parameters are honoured or refused, never ignored: a value out of range or a parameter the mesh cannot
honour raises `RequestError`, which becomes that request's error result (the rest of the job runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pqmesh.api.coordinator.v1 import coordinator_pb2

MAX_STOP_STRINGS = 4  # as the OpenAI API
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


class RequestError(Exception):
    """A request that cannot run: ``code`` is short and stable, the message says what to change."""

    def __init__(self, code: str, message: str, custom_id: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


def _invalid(message: str) -> RequestError:
    return RequestError("invalid_request", message)


@dataclass(frozen=True)
class RequestParams:
    """Per-request generation parameters; None takes the job's setting."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _invalid(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise _invalid(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise _invalid(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise _invalid(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise _invalid(f"seed must be within [0, 2**63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise _invalid(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(self.stop)!r}")

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.RequestParams) -> "RequestParams":
        def get(name):
            return getattr(msg, name) if msg.HasField(name) else None

        return cls(get("max_tokens"), get("temperature"), get("top_p"), get("top_k"), get("seed"), tuple(msg.stop))


@dataclass(frozen=True)
class Request:
    """Exactly one of ``text``, ``token_ids`` and ``messages`` is set."""

    custom_id: str = ""
    endpoint: str = ""  # CHAT or COMPLETIONS for OpenAI Batch lines
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    params: RequestParams = RequestParams()
    model: str = ""
    stop_on_eos: bool | None = None  # None: the job's setting
