"""The client of one stage server: unary calls (LoadShard, Release, GetInfo, health) and the
`Forward` stream into it. The coordinator, the profiler's link probe, benches and tests all use it.
"""

from __future__ import annotations

import queue
from typing import Iterable, Iterator, Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.security import Credentials
from pqmesh.stage_wire import micro_batch_header, micro_batch_requests

RPC_TIMEOUT_S = 30.0  # GetInfo and Release: a stage that takes longer counts as unreachable
_CLOSE = object()


class ForwardStream:
    """One persistent Forward stream: `send` micro-batches, iterate `responses` (one ForwardResponse per
    micro-batch, in the order sent)."""

    def __init__(self, stub: stage_pb2_grpc.StageServiceStub) -> None:
        self._outgoing: queue.Queue = queue.Queue()
        self.responses: Iterator[stage_pb2.ForwardResponse] = stub.Forward(iter(self._outgoing.get, _CLOSE))

    def send(self, header: stage_pb2.MicroBatchHeader, tensor: torch.Tensor, name: str = "input_ids") -> None:
        for message in micro_batch_requests(header, tensor, name):
            self._outgoing.put(message)

    def send_batch(
        self,
        plan_id: str,
        micro_batch_id: int,
        phase: int,
        slots: Sequence[int],
        lengths: Sequence[int],
        tensor: torch.Tensor,
        sampling: Iterable[tensor_pb2.SamplingParams] = (),
    ) -> None:
        """`send` with the header built from its fields (`pqmesh.stage_wire.micro_batch_header`)."""
        self.send(micro_batch_header(plan_id, micro_batch_id, phase, slots, lengths, sampling), tensor)

    def close(self) -> None:
        """Half-closes the stream: the stage finishes what it has and ends its responses."""
        self._outgoing.put(_CLOSE)

    def cancel(self) -> None:
        self.responses.cancel()


class StageClient:
    """Unary calls to one stage over its own channel, and Forward streams into it."""

    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        self.address = address
        self.channel = channel(address, credentials)
        self.stub = stage_pb2_grpc.StageServiceStub(self.channel)

    def load_shard(
        self, request: stage_pb2.LoadShardRequest, timeout: float | None = None
    ) -> stage_pb2.LoadShardResponse:
        return self.stub.LoadShard(request, timeout=timeout)

    def release(self, plan_id: str, slots: Sequence[int], timeout: float = RPC_TIMEOUT_S) -> int:
        request = stage_pb2.ReleaseRequest(plan_id=plan_id, slots=list(slots))
        return self.stub.Release(request, timeout=timeout).released

    def info(self, timeout: float = RPC_TIMEOUT_S) -> stage_pb2.GetInfoResponse:
        return self.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout)

    def health(self, timeout: float) -> str | None:
        """None when the stage's health service says SERVING, else why not."""
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    def forward(self) -> ForwardStream:
        return ForwardStream(self.stub)

    def close(self) -> None:
        self.channel.close()
