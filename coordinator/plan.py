"""The plan a coordinator runs: stages in pipeline order (layer range, bits per layer, address) and the
prefill and decode micro-batch sizes, as a frozen, validated dataclass with a JSON round trip.

Reads the planner's answer (`pqmesh plan --json`: ``{"plan": {...}, "predicted": ...}``) or just its
``"plan"`` object. Stage addresses come from an ``"address"`` key per stage or from ``--stage`` flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.errors import InvalidArgument

PLAN_VERSION = 1
VALID_BITS = tuple(sorted(v.number for v in tensor_pb2.Bits.DESCRIPTOR.values if v.number))


def _address_ok(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: layers [start, end) at ``bits`` (one entry per layer) on ``address``."""

    start: int
    end: int
    bits: tuple[int, ...]
    address: str = ""
    device: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        name = self.device or self.address or f"[{self.start}, {self.end})"
        if not 0 <= self.start < self.end:
            raise InvalidArgument(f"stage {name}: layer range [{self.start}, {self.end}) is empty or negative")
        if len(self.bits) != self.end - self.start:
            raise InvalidArgument(
                f"stage {name}: {len(self.bits)} bitwidths for {self.end - self.start} layers; give one per layer"
            )
        bad = sorted({b for b in self.bits if b not in VALID_BITS})
        if bad:
            raise InvalidArgument(f"stage {name}: bitwidths {bad} are not supported; use {list(VALID_BITS)}")
        if self.address and not _address_ok(self.address):
            raise InvalidArgument(f"stage {name}: address {self.address!r} must be HOST:PORT")

    def to_json_obj(self) -> dict:
        out = {"layers": [self.start, self.end], "bits": list(self.bits)}
        if self.device:
            out["device"] = self.device
        if self.address:
            out["address"] = self.address
        return out

    @classmethod
    def from_json_obj(cls, obj: dict) -> "StageSpec":
        try:
            start, end = obj["layers"]
            return cls(
                int(start), int(end), tuple(obj["bits"]), str(obj.get("address", "")), str(obj.get("device", ""))
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(
                f'a plan stage needs "layers": [start, end] and "bits": [...]; got {obj!r} ({err})'
            ) from None


@dataclass(frozen=True)
class MeshPlan:
    """Contiguous stages covering layers [0, num_layers), and the phase-aware micro-batch sizes."""

    stages: tuple[StageSpec, ...]
    prefill_micro_batch: int
    decode_micro_batch: int
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.version != PLAN_VERSION:
            raise InvalidArgument(
                f"plan version {self.version} is not supported; this coordinator reads version {PLAN_VERSION}"
            )
        if not self.stages:
            raise InvalidArgument("a plan needs at least one stage")
        if self.stages[0].start != 0:
            raise InvalidArgument(f"the first stage must start at layer 0, not {self.stages[0].start}")
        for i, (before, after) in enumerate(zip(self.stages, self.stages[1:])):
            if after.start != before.end:
                raise InvalidArgument(
                    f"stages {i} and {i + 1} are not contiguous: [{before.start}, {before.end}) then "
                    f"[{after.start}, {after.end}); each stage must start where the previous one ends"
                )
        if self.prefill_micro_batch < 1 or self.decode_micro_batch < 1:
            raise InvalidArgument("prefill_micro_batch and decode_micro_batch must be >= 1")

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(s.address for s in self.stages)

    def check_layers(self, total: int) -> None:
        """The stages must cover exactly the model's ``total`` decoder layers."""
        if self.num_layers != total:
            raise InvalidArgument(f"the plan covers layers [0, {self.num_layers}) but the model has {total} layers; "
                                  "plan for this model")

    def with_addresses(self, addresses: Sequence[str]) -> "MeshPlan":
        """The same plan with stage addresses given in pipeline order (``--stage`` flags)."""
        if len(addresses) != len(self.stages):
            raise InvalidArgument(f"{len(addresses)} stage addresses for a plan of {len(self.stages)} stages; "
                                  "pass one --stage HOST:PORT per stage, in pipeline order")
        return replace(self, stages=tuple(replace(s, address=a) for s, a in zip(self.stages, addresses)))

    def require_addresses(self) -> None:
        missing = [i for i, s in enumerate(self.stages) if not s.address]
        if missing:
            raise InvalidArgument(f"stages {missing} have no address; add \"address\" to each stage in the plan file "
                                  "or pass --stage HOST:PORT once per stage")

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "stages": [s.to_json_obj() for s in self.stages],
                           "prefill_micro_batch": self.prefill_micro_batch,
                           "decode_micro_batch": self.decode_micro_batch})

    @classmethod
    def from_json(cls, text: str) -> "MeshPlan":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"the plan is not valid JSON: {err}") from None
        if isinstance(obj, dict) and isinstance(obj.get("plan"), dict):
            obj = obj["plan"]  # the planner's whole answer
        if not isinstance(obj, dict) or not isinstance(obj.get("stages"), list):
            raise InvalidArgument("a plan is a JSON object with \"stages\", \"prefill_micro_batch\" and "
                                  "\"decode_micro_batch\" (or the planner's answer holding it under \"plan\")")
        try:
            return cls(tuple(StageSpec.from_json_obj(s) for s in obj["stages"]), int(obj["prefill_micro_batch"]),
                       int(obj["decode_micro_batch"]), int(obj.get("version", PLAN_VERSION)))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(
                f'the plan needs integer "prefill_micro_batch" and "decode_micro_batch" ({err})'
            ) from None

    @classmethod
    def from_file(cls, path: Path) -> "MeshPlan":
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as err:
            raise InvalidArgument(f"cannot read the plan file {path}: {err.strerror}") from None


def even_plan(num_layers: int, addresses: Sequence[str], prefill_micro_batch: int, decode_micro_batch: int,
              bits: int = 16) -> MeshPlan:
    """Layers split evenly over the stages at one bitwidth (tests, benchmarks, bring-up without a planner)."""
    count = len(addresses)
    if not 1 <= count <= num_layers:
        raise InvalidArgument(f"{count} stages for {num_layers} layers; use 1..{num_layers} stages")
    cuts = [round(i * num_layers / count) for i in range(count + 1)]
    stages = tuple(StageSpec(a, b, (bits,) * (b - a), address) for a, b, address in zip(cuts, cuts[1:], addresses))
    return MeshPlan(stages, prefill_micro_batch, decode_micro_batch)
