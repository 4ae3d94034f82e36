"""Mesh bring-up and slot release: the coordinator's unary calls to its stage servers.

`Mesh.bring_up` waits for every stage to answer, loads each shard in pipeline order with its role,
bits and next hop (or, when a stage already holds this exact plan, only frees its KV slots; a stage
that holds the same shard under another plan id or next hop keeps it and says so, logged as
``stage_kept``), then
checks with GetInfo that every stage reports this plan end to end. Any refusal names the stage,
its address and layers, and the stage's own reason. A stage that is down or does not answer in time
(UNAVAILABLE, DEADLINE_EXCEEDED, or still busy with a lost stream's work) raises `StageUnavailable`,
which the engine retries; any other refusal is final. `Mesh.health` is the engine's health probe.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Sequence

import grpc
import structlog

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.errors import FailedPrecondition, Unavailable
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.security import Credentials
from pqmesh.stage_client import ForwardStream, StageClient
from pqmesh.types import Role

log = structlog.get_logger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class StageUnavailable(Unavailable):
    """A stage is down, hung or not done with earlier work: worth retrying. ``stage`` names it."""

    def __init__(self, stage: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.index = index  # the stage's position in the plan, when one stage is to blame


@dataclass(frozen=True)
class MeshSpec:
    """What the stages are asked to hold: the plan, the checkpoint and the KV capacity."""

    plan: PipelinePlan
    model_id: str
    max_sequences: int
    max_tokens: int
    dtype: str = ""
    group_size: int = 0

    @property
    def plan_id(self) -> str:
        """Content hash: the same plan, model, capacity and addresses always get the same id."""
        text = json.dumps([self.plan.to_json(), self.model_id, self.max_sequences, self.max_tokens, self.dtype,
                           self.group_size])
        return "mesh-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def role(self, stage: StagePlan) -> int:
        return Role.of(stage.start, stage.end, self.plan.num_layers).to_proto()

    def load_request(self, index: int) -> stage_pb2.LoadShardRequest:
        stages = self.plan.stages
        stage = stages[index]
        return stage_pb2.LoadShardRequest(
            plan_id=self.plan_id,
            model_id=self.model_id,
            layers=tensor_pb2.LayerRange(start=stage.start, end=stage.end),
            bits=list(stage.bits),
            role=self.role(stage),
            max_sequences=self.max_sequences,
            max_tokens_per_sequence=self.max_tokens,
            prefill_micro_batch=self.plan.prefill_micro_batch,
            decode_micro_batch=self.plan.decode_micro_batch,
            next_hop=stages[index + 1].address if index + 1 < len(stages) else "",
            dtype=self.dtype,
            group_size=self.group_size,
        )


class Mesh:
    """Clients of every stage in pipeline order; the first one takes the Forward stream."""

    def __init__(self, spec: MeshSpec, credentials: Credentials | None = None) -> None:
        spec.plan.require_addresses()
        self.spec = spec
        self.plan_id = spec.plan_id
        self.credentials = credentials
        self.clients = [StageClient(s.address, credentials) for s in spec.plan.stages]

    def _name(self, index: int) -> str:
        stage = self.spec.plan.stages[index]
        return f"stage {index} ({stage.address}, layers [{stage.start}, {stage.end}))"

    # -- bring-up -----------------------------------------------------------------------------------
    def bring_up(self, connect_timeout: float = 30.0, load_timeout: float | None = None) -> None:
        started = time.perf_counter()
        infos = [self._wait_for(i, connect_timeout) for i in range(len(self.clients))]
        loading = {}  # stages load their shards at the same time; refusals are reported in pipeline order
        for index, (client, info) in enumerate(zip(self.clients, infos)):
            if info.plan_id == self.plan_id and info.kv_slots_total == self.spec.max_sequences:
                self._call(index, "Release", lambda: client.release(self.plan_id, range(self.spec.max_sequences)))
                log.info("stage_reused", stage=index, address=client.address, plan_id=self.plan_id)
                continue
            loading[index] = client.stub.LoadShard.future(self.spec.load_request(index), timeout=load_timeout)
        kept = []
        for index, call in loading.items():
            reply = self._call(index, "LoadShard", call.result)
            if reply.kept:
                kept.append(index)
            log.info("stage_kept" if reply.kept else "stage_loaded", stage=index, address=self.clients[index].address,
                     plan_id=self.plan_id, total_bytes=reply.total_bytes, seconds=round(reply.load_seconds, 3))
        for index, client in enumerate(self.clients):
            self._verify(index, self._settled_info(index))
        log.info("mesh_ready", plan_id=self.plan_id, stages=len(self.clients), loaded=sorted(set(loading) - set(kept)),
                 kept=kept, seconds=round(time.perf_counter() - started, 3))

    def _wait_for(self, index: int, timeout: float) -> stage_pb2.GetInfoResponse:
        """GetInfo, retried every 0.2 s for ``timeout`` seconds while the stage is unreachable (0: one try)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.clients[index].stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5.0)
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE:
                    raise self._refused(index, "GetInfo", err) from None
                if time.monotonic() > deadline:
                    within = f" within {timeout:.0f} s" if timeout > 0 else ""
                    raise StageUnavailable(self._name(index), f"{self._name(index)} did not answer{within} "
                                           f"({err.code().name}: {err.details()}); start it, or fix its address in "
                                           "the plan or --stage", index) from None
                time.sleep(0.2)

    def _call(self, index: int, what: str, call):
        try:
            return call()
        except grpc.RpcError as err:
            raise self._refused(index, what, err) from None

    def _refused(self, index: int, what: str, err: grpc.RpcError) -> Exception:
        message = f"{self._name(index)} refused {what}: {err.code().name}: {err.details()}"
        if err.code() in _RETRYABLE:
            return StageUnavailable(self._name(index), message, index)
        return FailedPrecondition(message)

    def _settled_info(self, index: int, tries: int = 10, pause: float = 0.2) -> stage_pb2.GetInfoResponse:
        """GetInfo once no KV slot is in use. After a broken Forward stream, micro-batches already queued on
        a stage may still run and fill slots after our Release: release again until the stage is quiet."""
        client = self.clients[index]
        for _ in range(tries):
            info = self._call(index, "GetInfo", client.info)
            if info.plan_id != self.plan_id or info.kv_slots_used == 0:
                return info
            time.sleep(pause)
            self._call(index, "Release", lambda: client.release(self.plan_id, range(self.spec.max_sequences)))
        return info

    def _verify(self, index: int, info: stage_pb2.GetInfoResponse) -> None:
        stage = self.spec.plan.stages[index]
        expected = (self.plan_id, self.spec.model_id, stage.start, stage.end, self.spec.role(stage),
                    self.spec.max_sequences, 0)
        got = (info.plan_id, info.model_id, info.layers.start, info.layers.end, info.role, info.kv_slots_total,
               info.kv_slots_used)
        if (
            got[:-1] == expected[:-1] and info.kv_slots_used
        ):  # still running micro-batches of a lost stream: try again later
            raise StageUnavailable(self._name(index), f"{self._name(index)} still holds {info.kv_slots_used} KV slots "
                                   "after release (micro-batches of a lost stream still running)")
        if got != expected:
            raise FailedPrecondition(
                f"{self._name(index)} reports (plan, model, start, end, role, slots, used) = {got} "
                f"after loading, expected {expected}; another coordinator may share this stage"
            )

    # -- running ------------------------------------------------------------------------------------
    def forward(self) -> ForwardStream:
        return self.clients[0].forward()

    def health(self, index: int, timeout: float = 5.0) -> str | None:
        """None when stage ``index`` answers its health check as SERVING, else the reason, naming the stage."""
        problem = self.clients[index].health(timeout)
        return None if problem is None else f"{self._name(index)}: {problem}"

    def release(self, slots: Sequence[int], timeout: float = 30.0) -> None:
        """Frees KV slots on every stage at once; returns when all stages have freed them."""
        if not slots:
            return
        request = stage_pb2.ReleaseRequest(plan_id=self.plan_id, slots=list(slots))
        calls = [client.stub.Release.future(request, timeout=timeout) for client in self.clients]
        for index, call in enumerate(calls):
            self._call(index, "Release", call.result)

    def close(self) -> None:
        for client in self.clients:
            client.close()
