"""Plans and predictions as frozen, validated data with proto and JSON forms.

The plan itself is `pqmesh.plan.PipelinePlan` (the coordinator runs the same type); `Prediction` is
what the cost model expects of it; `PlanResult` is the whole answer of the planner, including the
baselines.
`PlanResult.to_report()` is the JSON object printed by `pqmesh plan --json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import json_format

from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument
from pqmesh.plan import PLAN_VERSION, PipelinePlan

BASELINE_NAMES = ("pipeedge", "uniform_int8", "uniform_int4", "adabits")


def _to_json(msg) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=None)


def _parse(text: str, msg):
    try:
        return json_format.Parse(text, msg)
    except json_format.ParseError as err:
        raise InvalidArgument(f"JSON does not match {msg.DESCRIPTOR.full_name}: {err}") from None


@dataclass(frozen=True)
class Prediction:
    throughput_tokens_per_s: float
    prefill_s: float
    decode_s: float
    memory_bytes: tuple[int, ...]
    quality: float = 0.0
    job_s: float = 0.0  # the whole mesh, replayed micro-batch by micro-batch (planner.mesh_costs); 0: not done

    def to_proto(self) -> planner_pb2.Prediction:
        return planner_pb2.Prediction(throughput_tokens_per_s=self.throughput_tokens_per_s, prefill_s=self.prefill_s,
                                      decode_s=self.decode_s, memory_bytes=self.memory_bytes, quality=self.quality,
                                      job_s=self.job_s)

    @classmethod
    def from_proto(cls, msg: planner_pb2.Prediction) -> Prediction:
        return cls(msg.throughput_tokens_per_s, msg.prefill_s, msg.decode_s, tuple(msg.memory_bytes), msg.quality,
                   msg.job_s)

    def to_report(self) -> dict:
        return {"throughput_tokens_per_s": self.throughput_tokens_per_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "memory_bytes": list(self.memory_bytes), "quality": self.quality,
                "job_s": self.job_s}


@dataclass(frozen=True)
class Baseline:
    feasible: bool
    predicted: Prediction | None = None
    plan: PipelinePlan | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.feasible != (self.predicted is not None):
            raise InvalidArgument("a baseline has a prediction exactly when it is feasible")

    def to_proto(self) -> planner_pb2.Baseline:
        msg = planner_pb2.Baseline(feasible=self.feasible, reason=self.reason)
        if self.predicted is not None:
            msg.predicted.CopyFrom(self.predicted.to_proto())
        if self.plan is not None:
            msg.plan.CopyFrom(self.plan.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: planner_pb2.Baseline) -> Baseline:
        return cls(msg.feasible, Prediction.from_proto(msg.predicted) if msg.HasField("predicted") else None,
                   PipelinePlan.from_proto(msg.plan) if msg.HasField("plan") else None, msg.reason)

    def to_report(self) -> dict:
        out = {"feasible": self.feasible,
               "throughput_tokens_per_s": self.predicted.throughput_tokens_per_s if self.predicted else 0.0}
        if self.predicted:
            out |= {k: v for k, v in self.predicted.to_report().items() if k != "throughput_tokens_per_s"}
        if self.plan:
            out["plan"] = self.plan.to_json_obj()
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class PlanResult:
    plan: PipelinePlan
    predicted: Prediction
    baselines: dict = field(default_factory=dict)
    solve_seconds: float = 0.0
    optimality_gap: float = 0.0
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise InvalidArgument(f"plan result version {self.version} is not supported")
        if len(self.predicted.memory_bytes) != len(self.plan.stages):
            raise InvalidArgument("predicted memory must have one entry per stage")

    def to_proto(self) -> planner_pb2.PlanResponse:
        return planner_pb2.PlanResponse(
            plan=self.plan.to_proto(), predicted=self.predicted.to_proto(), solve_seconds=self.solve_seconds,
            optimality_gap=self.optimality_gap, baselines={k: v.to_proto() for k, v in self.baselines.items()})

    @classmethod
    def from_proto(cls, msg: planner_pb2.PlanResponse) -> PlanResult:
        return cls(PipelinePlan.from_proto(msg.plan), Prediction.from_proto(msg.predicted),
                   {k: Baseline.from_proto(v) for k, v in sorted(msg.baselines.items())},
                   msg.solve_seconds, msg.optimality_gap)

    def to_json(self) -> str:
        return _to_json(self.to_proto())

    @classmethod
    def from_json(cls, text: str) -> PlanResult:
        return cls.from_proto(_parse(text, planner_pb2.PlanResponse()))

    def to_report(self) -> dict:
        """The `pqmesh plan --json` object."""
        return {"plan": self.plan.to_json_obj(), "predicted": self.predicted.to_report(),
                "baselines": {k: self.baselines[k].to_report() for k in sorted(self.baselines)},
                "solve_seconds": self.solve_seconds, "optimality_gap": self.optimality_gap}
