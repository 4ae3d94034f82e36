"""A plan request as data (`PlanInputs`): its proto and JSON forms, and the `Problem` it describes."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import json_format

from planner.catalog import builtin_model, model_from_config_json
from planner.cluster import Cluster, ProfileLookup, Workload, expand
from planner.indicator import Indicator, Quality, default_indicator, shipped_indicator
from planner.memory import DEFAULT_DTYPE, element_bytes
from planner.model_shapes import ModelShape
from planner.problem import DEFAULT_COORDINATOR_S, CostConfig, Problem
from planner.search import DEFAULT_TIME_LIMIT_S
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument
from pqmesh.types import ALL_BITS, Bits
from pqmesh.types import allowed_bits as parse_allowed_bits

REQUEST_VERSION = 1


@dataclass(frozen=True)
class PlanInputs:
    """`model` is a built-in model name or the text of a Hugging Face config.json; `dtype` the stages'
    dtype ("float16", "bfloat16" or "float32"; "": the dtype the devices were profiled in, else float16);
    `coordinator_s` the coordinator's turn-around per reply for the whole-mesh prediction."""

    model: str
    cluster: Cluster
    workload: Workload
    quality: Quality = Quality()
    indicator_json: str = ""
    allowed_bits: tuple[Bits, ...] = ALL_BITS
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    version: int = REQUEST_VERSION
    dtype: str = ""
    coordinator_s: float = DEFAULT_COORDINATOR_S

    def __post_init__(self) -> None:
        if self.version != REQUEST_VERSION:
            raise InvalidArgument(f"plan request version {self.version} is not supported; use {REQUEST_VERSION}")
        if not self.model.strip():
            raise InvalidArgument("the plan request names no model; set model_name or model_config_json")
        if not self.time_limit_s > 0:  # NaN fails too
            raise InvalidArgument(f"time limit must be positive seconds, got {self.time_limit_s}")
        object.__setattr__(self, "allowed_bits", parse_allowed_bits(self.allowed_bits))
        if self.dtype:
            element_bytes(self.dtype)  # InvalidArgument names the supported dtypes
        CostConfig(coordinator_s=self.coordinator_s)  # validates it

    @property
    def inline_config(self) -> bool:
        return self.model.lstrip().startswith("{")

    def shape(self) -> ModelShape:
        return model_from_config_json(self.model) if self.inline_config else builtin_model(self.model)

    def to_problem(self, lookup: ProfileLookup | None = None) -> Problem:
        shape = self.shape()
        if self.indicator_json:
            indicator = Indicator.from_json(self.indicator_json)
        else:
            indicator = shipped_indicator(shape) or default_indicator(shape.num_layers)
        indicator.check(shape.num_layers, self.allowed_bits, shape.name)
        devices = expand(self.cluster, lookup)
        return Problem(shape, devices, self.cluster.network, self.workload, indicator,
                       self.quality.resolved(indicator), self.allowed_bits,
                       CostConfig(coordinator_s=self.coordinator_s), self.dtype or profiled_dtype(devices))

    def to_proto(self) -> planner_pb2.PlanRequest:
        msg = planner_pb2.PlanRequest(workload=self.workload.to_proto(), indicator_json=self.indicator_json,
                                      time_limit_seconds=self.time_limit_s, **self.cluster.to_proto_fields())
        msg.dtype = self.dtype
        if self.coordinator_s != DEFAULT_COORDINATOR_S:
            msg.coordinator_turnaround_us = self.coordinator_s * 1e6
        if self.allowed_bits != ALL_BITS:
            msg.allowed_bits.extend(b.to_proto() for b in self.allowed_bits)
        if self.inline_config:
            msg.model_config_json = self.model
        else:
            msg.model_name = self.model
        if self.quality.theta is not None:
            msg.theta = self.quality.theta
        if self.quality.bound is not None:
            msg.quality_bound = self.quality.bound
        return msg

    @classmethod
    def from_proto(cls, msg: planner_pb2.PlanRequest) -> PlanInputs:
        model = msg.model_config_json if msg.WhichOneof("model") == "model_config_json" else msg.model_name
        if not msg.HasField("workload"):
            raise InvalidArgument("the plan request has no workload; set batch_size, prompt_length, generation_length")
        which = msg.WhichOneof("quality")
        quality = (
            Quality(theta=msg.theta) if which == "theta" else Quality(bound=msg.quality_bound) if which else Quality()
        )
        return cls(model, Cluster.from_proto_fields(msg.devices, msg.network if msg.HasField("network") else None),
                   Workload.from_proto(msg.workload), quality, msg.indicator_json,
                   tuple(Bits.from_proto(b) for b in msg.allowed_bits) or ALL_BITS,
                   msg.time_limit_seconds or DEFAULT_TIME_LIMIT_S, dtype=msg.dtype,
                   coordinator_s=(msg.coordinator_turnaround_us * 1e-6 if msg.HasField("coordinator_turnaround_us")
                                  else DEFAULT_COORDINATOR_S))

    def to_json(self) -> str:
        return json_format.MessageToJson(self.to_proto(), preserving_proto_field_name=True, indent=None)

    @classmethod
    def from_json(cls, text: str) -> PlanInputs:
        try:
            return cls.from_proto(json_format.Parse(text, planner_pb2.PlanRequest()))
        except json_format.ParseError as err:
            raise InvalidArgument(f"JSON does not match pqmesh.planner.v1.PlanRequest: {err}") from None


def profiled_dtype(devices) -> str:
    """The dtype the devices' profiles were measured in: float16 when none says; the widest when they differ
    (memory is then never under-counted; a mixed mesh should pass PlanRequest.dtype)."""
    found = {d.profile.dtype for d in devices if d.profile.dtype}
    if not found:
        return DEFAULT_DTYPE
    return max(sorted(found), key=element_bytes)
