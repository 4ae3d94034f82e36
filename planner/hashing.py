"""Hashes of frozen dataclasses computed once per object: profiles and shapes key the planner's
cost caches on every call, and hashing their nested fields each time dominated large plans.

Assign both in the class body (`__hash__ = cached_hash`), so `@dataclass` keeps them. The cached
value is dropped when pickling: string hashes differ between processes."""

from __future__ import annotations

import dataclasses


def cached_hash(self) -> int:
    found = self.__dict__.get("_cached_hash")
    if found is None:
        found = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare))
        object.__setattr__(self, "_cached_hash", found)
    return found


def state_without_hash(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_cached_hash"}
