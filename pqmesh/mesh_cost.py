"""The cost model's view of one planned mesh, as data a coordinator can carry: per stage a linear
time per micro-batch and phase, the hop after it, and the coordinator's own turn-around.

The planner fills it from device profiles and the network (`planner.mesh_costs`); it travels inside
the plan (`pqmesh.plan.PipelinePlan.cost`: `Plan.cost` in the proto, ``"cost"`` in the plan file);
`pqmesh.mesh_sim.simulate` turns it into a predicted job time for any prompts, which the planner
reports as `Prediction.job_s` and the coordinator as each job's predicted time.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import json_format

from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import InvalidArgument

_FINITE = float("inf")


@dataclass(frozen=True)
class PhaseCost:
    """Seconds of one micro-batch: const + per sequence + per new token + per (new token x key)."""

    const_s: float = 0.0
    per_sequence_s: float = 0.0
    per_token_s: float = 0.0
    per_token_key_s: float = 0.0

    def __post_init__(self) -> None:
        if not all(0 <= v < _FINITE for v in self.__dict__.values()):  # NaN fails too
            raise InvalidArgument(f"phase cost terms must be finite and >= 0, got {self.__dict__}")

    def seconds(self, sequences: int, new_tokens: int, keys: int) -> float:
        """``sequences`` rows of ``new_tokens`` each (padded), attending over ``keys`` positions."""
        tokens = sequences * new_tokens
        return self.const_s + self.per_sequence_s * sequences + self.per_token_s * tokens + \
            self.per_token_key_s * tokens * keys

    def plus(self, other: PhaseCost) -> PhaseCost:
        return PhaseCost(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


@dataclass(frozen=True)
class StageCost:
    prefill: PhaseCost
    decode: PhaseCost
    hop_latency_s: float = 0.0  # the hop after this stage (the last stage's: token ids to the coordinator)
    hop_bytes_per_s: float = float("inf")

    def __post_init__(self) -> None:
        if not (0 <= self.hop_latency_s < _FINITE and self.hop_bytes_per_s > 0):
            raise InvalidArgument("a stage's hop needs a finite latency >= 0 and a positive bandwidth")

    def hop_seconds(self, nbytes: int) -> float:
        return self.hop_latency_s + nbytes / self.hop_bytes_per_s


@dataclass(frozen=True)
class MeshCost:
    stages: tuple[StageCost, ...]
    hidden_bytes_per_token: int
    coordinator_s: float = 0.0
    send_latency_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise InvalidArgument("a mesh cost needs one entry per stage")
        if self.hidden_bytes_per_token < 0 or not (0 <= self.coordinator_s < _FINITE and
                                                  0 <= self.send_latency_s < _FINITE):
            raise InvalidArgument("mesh cost: hidden bytes, coordinator and send times must be >= 0")

    def to_proto(self) -> planner_pb2.MeshCost:
        return planner_pb2.MeshCost(
            stages=[planner_pb2.StageCost(prefill=planner_pb2.PhaseCost(**s.prefill.__dict__),
                                          decode=planner_pb2.PhaseCost(**s.decode.__dict__),
                                          hop_latency_s=s.hop_latency_s,
                                          hop_bytes_per_s=min(s.hop_bytes_per_s, 1e30)) for s in self.stages],
            hidden_bytes_per_token=self.hidden_bytes_per_token, coordinator_s=self.coordinator_s,
            send_latency_s=self.send_latency_s)

    @classmethod
    def from_proto(cls, msg: planner_pb2.MeshCost) -> MeshCost:
        def phase(p: planner_pb2.PhaseCost) -> PhaseCost:
            return PhaseCost(p.const_s, p.per_sequence_s, p.per_token_s, p.per_token_key_s)

        return cls(tuple(StageCost(phase(s.prefill), phase(s.decode), s.hop_latency_s, s.hop_bytes_per_s or 1e30)
                         for s in msg.stages), msg.hidden_bytes_per_token, msg.coordinator_s, msg.send_latency_s)

    def to_json_obj(self) -> dict:
        return json_format.MessageToDict(self.to_proto(), preserving_proto_field_name=True)

    @classmethod
    def from_json_obj(cls, obj: dict) -> MeshCost:
        try:
            return cls.from_proto(json_format.ParseDict(obj, planner_pb2.MeshCost()))
        except json_format.ParseError as err:
            raise InvalidArgument(f'the plan\'s "cost" does not match pqmesh.planner.v1.MeshCost: {err}') from None
