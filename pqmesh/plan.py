"""A pipeline plan: stages in order (device, layer range, bits per layer, address) and the prefill and
decode micro-batch sizes. The planner answers with one; the coordinator runs one.

One frozen, validated type with one conversion each way per form: `to_proto` / `from_proto`
(`pqmesh.planner.v1.Plan`, what the planner's gRPC answer holds) and `to_json` / `from_json` (the plan
file: what `pqmesh plan --json` prints under ``"plan"`` and what `pqmesh-coordinator --plan` reads;
the reader also takes the planner's whole answer). Stage addresses are the coordinator's addition:
they come from an ``"address"`` per stage or from ``--stage`` flags (`with_addresses`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument
from pqmesh.mesh_cost import MeshCost
from pqmesh.types import Bits

PLAN_VERSION = 1
_WIDTHS = sorted(b.value for b in Bits)


def _address_ok(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: layers [start, end) at ``bits`` (one entry per layer) on ``device``."""

    device: str
    start: int
    end: int
    bits: tuple[Bits, ...]
    address: str = ""

    def __post_init__(self) -> None:
        name = self.device or self.address or f"[{self.start}, {self.end})"
        if not 0 <= self.start < self.end:
            raise InvalidArgument(f"stage {name}: layer range [{self.start}, {self.end}) is empty or negative")
        if len(self.bits) != self.end - self.start:
            raise InvalidArgument(
                f"stage {name}: {len(self.bits)} bitwidths for {self.end - self.start} layers; give one per layer"
            )
        bad = sorted({int(b) for b in self.bits if int(b) not in _WIDTHS})
        if bad:
            raise InvalidArgument(f"stage {name}: bitwidths {bad} are not supported; use {_WIDTHS}")
        object.__setattr__(self, "bits", tuple(Bits.parse(int(b)) for b in self.bits))
        if self.address and not _address_ok(self.address):
            raise InvalidArgument(f"stage {name}: address {self.address!r} must be HOST:PORT")

    def to_proto(self) -> planner_pb2.Stage:
        return planner_pb2.Stage(device=self.device, layers=tensor_pb2.LayerRange(start=self.start, end=self.end),
                                 bits=[b.to_proto() for b in self.bits])

    @classmethod
    def from_proto(cls, msg: planner_pb2.Stage) -> StagePlan:
        return cls(msg.device, msg.layers.start, msg.layers.end, tuple(Bits.from_proto(b) for b in msg.bits))

    def to_json_obj(self) -> dict:
        out = {"device": self.device, "layers": [self.start, self.end], "bits": [int(b) for b in self.bits]}
        if not self.device:
            del out["device"]
        if self.address:
            out["address"] = self.address
        return out

    @classmethod
    def from_json_obj(cls, obj: dict) -> StagePlan:
        try:
            start, end = obj["layers"]
            return cls(str(obj.get("device", "")), int(start), int(end), tuple(int(b) for b in obj["bits"]),
                       str(obj.get("address", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(
                f'a plan stage needs "layers": [start, end] and "bits": [...]; got {obj!r} ({err})'
            ) from None


@dataclass(frozen=True)
class PipelinePlan:
    """Contiguous stages covering layers [0, num_layers), and the phase-aware micro-batch sizes.

    ``plan_id`` defaults to a hash of the content (devices, layers, bits, micro-batches; not addresses).
    ``cost`` (optional) is the planner's cost model of this mesh (`pqmesh.mesh_cost`), with which the
    coordinator predicts every job's time; it is not part of the content id.
    """

    stages: tuple[StagePlan, ...]
    prefill_micro_batch: int
    decode_micro_batch: int
    plan_id: str = ""
    version: int = PLAN_VERSION
    cost: MeshCost | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.cost is not None and len(self.cost.stages) != len(self.stages):
            raise InvalidArgument(f"the plan's cost describes {len(self.cost.stages)} stages but the plan has "
                                  f"{len(self.stages)}; take both from the same planner answer")
        if self.version != PLAN_VERSION:
            raise InvalidArgument(f"plan version {self.version} is not supported; this build reads {PLAN_VERSION}")
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
        if not self.plan_id:
            object.__setattr__(self, "plan_id", self._content_id())

    def _content_id(self) -> str:
        content = [(s.device, s.start, s.end, [int(b) for b in s.bits]) for s in self.stages]
        text = json.dumps([content, self.prefill_micro_batch, self.decode_micro_batch])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- facts ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    @property
    def bits_per_layer(self) -> tuple[Bits, ...]:
        return tuple(b for s in self.stages for b in s.bits)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(s.address for s in self.stages)

    def check_layers(self, total: int) -> None:
        """The stages must cover exactly the model's ``total`` decoder layers."""
        if self.num_layers != total:
            raise InvalidArgument(f"the plan covers layers [0, {self.num_layers}) but the model has {total} layers; "
                                  "plan for this model")

    def with_addresses(self, addresses: Sequence[str]) -> PipelinePlan:
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

    # -- forms ------------------------------------------------------------------------------------
    def to_proto(self) -> planner_pb2.Plan:
        msg = planner_pb2.Plan(plan_id=self.plan_id, stages=[s.to_proto() for s in self.stages],
                               version=self.version, prefill_micro_batch=self.prefill_micro_batch,
                               decode_micro_batch=self.decode_micro_batch)
        if self.cost is not None:
            msg.cost.CopyFrom(self.cost.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: planner_pb2.Plan) -> PipelinePlan:
        return cls(tuple(StagePlan.from_proto(s) for s in msg.stages), msg.prefill_micro_batch,
                   msg.decode_micro_batch, msg.plan_id, msg.version,
                   MeshCost.from_proto(msg.cost) if msg.HasField("cost") else None)

    def to_json_obj(self) -> dict:
        out = {"version": self.version, "plan_id": self.plan_id, "stages": [s.to_json_obj() for s in self.stages],
               "prefill_micro_batch": self.prefill_micro_batch, "decode_micro_batch": self.decode_micro_batch}
        if self.cost is not None:
            out["cost"] = self.cost.to_json_obj()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_json_obj())

    @classmethod
    def from_json(cls, text: str, replica: int | None = None) -> PipelinePlan:
        """From a plan file, or the planner's whole answer (the plan under ``"plan"``), or with ``replica``
        one pipeline of a ``pqmesh plan --replicas --json`` answer (``"replicas"[replica]["plan"]``)."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"the plan is not valid JSON: {err}") from None
        obj = _replica(obj, replica)
        while isinstance(obj, dict) and "stages" not in obj and isinstance(obj.get("plan"), dict):
            obj = obj["plan"]  # the planner's answer, or a replica holding one
        if not isinstance(obj, dict) or not isinstance(obj.get("stages"), list):
            raise InvalidArgument("a plan is a JSON object with \"stages\", \"prefill_micro_batch\" and "
                                  "\"decode_micro_batch\" (or the planner's answer holding it under \"plan\")")
        stages = tuple(StagePlan.from_json_obj(s) for s in obj["stages"])
        try:
            cost = MeshCost.from_json_obj(obj["cost"]) if isinstance(obj.get("cost"), dict) else None
            return cls(stages, int(obj["prefill_micro_batch"]), int(obj["decode_micro_batch"]),
                       str(obj.get("plan_id", "")), int(obj.get("version", PLAN_VERSION)), cost)
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(
                f'the plan needs integer "prefill_micro_batch" and "decode_micro_batch" ({err})'
            ) from None

    @classmethod
    def from_file(cls, path: Path, replica: int | None = None) -> PipelinePlan:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise InvalidArgument(f"cannot read the plan file {path}: {err.strerror}") from None
        return cls.from_json(text, replica)


def _replica(obj, replica: int | None):
    """``obj`` itself, or with a several-pipelines answer (``"replicas"``) the one ``replica`` names."""
    replicas = obj.get("replicas") if isinstance(obj, dict) else None
    if not isinstance(replicas, list):
        if replica is not None:
            raise InvalidArgument(f"--replica {replica} names one pipeline of a `pqmesh plan --replicas --json` "
                                  "answer, but this plan file holds one plan; leave --replica out")
        return obj
    if replica is None or not 0 <= replica < len(replicas) or not isinstance(replicas[replica], dict):
        raise InvalidArgument(f"the plan file holds {len(replicas)} pipelines (a `pqmesh plan --replicas` answer): "
                              f"pick this coordinator's with --replica 0..{len(replicas) - 1}")
    return replicas[replica]


def even_plan(num_layers: int, addresses: Sequence[str], prefill_micro_batch: int, decode_micro_batch: int,
              bits: int = 16) -> PipelinePlan:
    """Layers split evenly over the stages at one bitwidth (tests, benchmarks, bring-up without a planner)."""
    count = len(addresses)
    if not 1 <= count <= num_layers:
        raise InvalidArgument(f"{count} stages for {num_layers} layers; use 1..{num_layers} stages")
    cuts = [round(i * num_layers / count) for i in range(count + 1)]
    stages = tuple(StagePlan("", a, b, (bits,) * (b - a), address)
                   for a, b, address in zip(cuts, cuts[1:], addresses))
    return PipelinePlan(stages, prefill_micro_batch, decode_micro_batch)
