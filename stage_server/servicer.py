"""The StageService servicer: decode the request, call the runtime, encode the reply."""

from __future__ import annotations

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.errors import InvalidArgument
from pqmesh.grpc_server import rpc_errors
from pqmesh.security import Credentials
from pqmesh.types import Role
from stage_server.metrics import StageMetrics
from stage_server.runtime import ShardSpec, StageRuntime
from stage_server.streaming import Session, Worker, abort_with


def shard_spec(request: stage_pb2.LoadShardRequest) -> ShardSpec:
    if not request.plan_id:
        raise InvalidArgument("plan_id is required")
    return ShardSpec(
        plan_id=request.plan_id, model_id=request.model_id, start=request.layers.start, end=request.layers.end,
        bits=tuple(request.bits), role=Role.from_proto(request.role), max_sequences=request.max_sequences,
        max_tokens=request.max_tokens_per_sequence, next_hop=request.next_hop, dtype=request.dtype,
        group_size=request.group_size or 128,
    )


class StageServicer(stage_pb2_grpc.StageServiceServicer):
    def __init__(self, runtime: StageRuntime, queue_depth: int = 8, credentials: Credentials | None = None,
                 metrics: StageMetrics | None = None, worker_thread: bool = True) -> None:
        self.runtime = runtime
        self.worker = Worker(runtime, queue_depth, metrics, start=worker_thread)
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(runtime, self.worker)
        self.credentials = credentials  # this stage's identity (and token) towards the next stage

    @rpc_errors
    def LoadShard(self, request, context):
        spec = shard_spec(request)
        result = self.worker.call(lambda: self.runtime.load(spec))
        return stage_pb2.LoadShardResponse(
            plan_id=request.plan_id, weight_bytes=result.weight_bytes, kv_cache_bytes=result.kv_cache_bytes,
            total_bytes=result.total_bytes, load_seconds=result.load_seconds, kept=result.kept,
        )

    def Forward(self, request_iterator, context):
        session = Session(self.runtime, self.worker, self.credentials)
        context.add_callback(session.closed)  # a cancelled or broken stream: its queued micro-batches never run
        try:
            yield from session.run(request_iterator)
        except Exception as err:  # noqa: BLE001 - every failure ends this stream with a status
            abort_with(context, err)

    @rpc_errors
    def Release(self, request, context):
        plan_id, slots = request.plan_id, list(request.slots)
        return stage_pb2.ReleaseResponse(released=self.worker.call(lambda: self.runtime.release(plan_id, slots)))

    @rpc_errors
    def GetInfo(self, request, context):
        info = self.runtime.info()
        reply = stage_pb2.GetInfoResponse(
            device=info["device"], memory_budget_bytes=info["memory_budget_bytes"],
            memory_used_bytes=info["memory_used_bytes"], micro_batches_done=info["micro_batches_done"],
            tokens_done=info["tokens_done"], micro_batches_dropped=info["micro_batches_dropped"],
            slots_released_in_band=info["slots_released_in_band"], slots_released_by_rpc=info["slots_released_by_rpc"],
        )
        if "plan_id" in info:
            reply.plan_id, reply.model_id = info["plan_id"], info["model_id"]
            reply.layers.CopyFrom(tensor_pb2.LayerRange(start=info["start"], end=info["end"]))
            reply.role = info["role"].to_proto()
            reply.kv_slots_total, reply.kv_slots_used = info["kv_slots_total"], info["kv_slots_used"]
        return reply
