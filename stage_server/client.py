"""Client side of a stage: LoadShard/Release/GetInfo calls and a Forward stream to send micro-batches
into the first stage and read token ids back. The coordinator and tests drive the mesh with it.
"""

from __future__ import annotations

import queue
from typing import Iterator, Sequence

import torch

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.grpc_server import channel
from stage_server.streaming import micro_batch_requests

_CLOSE = object()


class ForwardStream:
    """One persistent Forward stream: `send` micro-batches, iterate `responses` in completion order."""

    def __init__(self, stub: stage_pb2_grpc.StageServiceStub) -> None:
        self._outgoing: queue.Queue = queue.Queue()
        self.responses: Iterator[stage_pb2.ForwardResponse] = stub.Forward(iter(self._outgoing.get, _CLOSE))

    def send(
        self,
        plan_id: str,
        micro_batch_id: int,
        phase: int,
        slots: Sequence[int],
        lengths: Sequence[int],
        tensor: torch.Tensor,
        sampling: Sequence[tensor_pb2.SamplingParams] = (),
    ) -> None:
        header = stage_pb2.MicroBatchHeader(
            plan_id=plan_id, micro_batch_id=micro_batch_id, phase=phase, slots=list(slots),
            lengths=list(lengths), sampling=list(sampling),
        )
        for message in micro_batch_requests(header, tensor, "input_ids"):
            self._outgoing.put(message)

    def close(self) -> None:
        self._outgoing.put(_CLOSE)


class StageClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = channel(address)
        self.stub = stage_pb2_grpc.StageServiceStub(self.channel)

    def load_shard(
        self, request: stage_pb2.LoadShardRequest, timeout: float | None = None
    ) -> stage_pb2.LoadShardResponse:
        return self.stub.LoadShard(request, timeout=timeout)

    def release(self, plan_id: str, slots: Sequence[int]) -> int:
        return self.stub.Release(stage_pb2.ReleaseRequest(plan_id=plan_id, slots=list(slots))).released

    def info(self) -> stage_pb2.GetInfoResponse:
        return self.stub.GetInfo(stage_pb2.GetInfoRequest())

    def forward(self) -> ForwardStream:
        return ForwardStream(self.stub)

    def close(self) -> None:
        self.channel.close()
