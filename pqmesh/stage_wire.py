"""The stage wire format: how one micro-batch is framed on a `Forward` stream.

A micro-batch is a `MicroBatchHeader` message (plan, id, phase, slots, lengths, sampling, and the
number of tensor chunks that follow) and then its tensor in `TensorChunk` messages (`pqmesh.codec`).
Prefill token ids are right-aligned in a [batch, width] tensor (`left_pad`), decode ids are [batch, 1].
Both ends use these functions: the coordinator and a forwarding stage frame, the stage reads.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from pqmesh import codec
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.errors import InvalidArgument


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """[B, T] int64 ids with each prompt right-aligned, and the prompt lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidArgument("every prompt needs at least one token")
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    return ids, lengths


def micro_batch_header(
    plan_id: str,
    micro_batch_id: int,
    phase: int,
    slots: Sequence[int],
    lengths: Sequence[int],
    sampling: Iterable[tensor_pb2.SamplingParams] = (),
    release_slots: Iterable[int] = (),
) -> stage_pb2.MicroBatchHeader:
    """The header of one micro-batch (``chunk_count`` is set when it is framed). ``release_slots``: KV
    slots every stage frees before running it (finished sequences), in stream order."""
    return stage_pb2.MicroBatchHeader(
        plan_id=plan_id, micro_batch_id=micro_batch_id, phase=int(phase), slots=list(slots), lengths=list(lengths),
        sampling=list(sampling), release_slots=list(release_slots),
    )


def micro_batch_requests(
    header: stage_pb2.MicroBatchHeader, tensor: torch.Tensor, name: str = "input_ids"
) -> Iterator[stage_pb2.ForwardRequest]:
    """The messages of one micro-batch: its header, then its tensor in chunks."""
    chunks = list(codec.chunk(tensor, name, codec.DEFAULT_CHUNK_BYTES))
    header.chunk_count = len(chunks)
    yield stage_pb2.ForwardRequest(header=header)
    for piece in chunks:
        yield stage_pb2.ForwardRequest(chunk=piece)


def read_frames(
    requests: Iterable[stage_pb2.ForwardRequest],
) -> Iterator[tuple[stage_pb2.MicroBatchHeader, list[tensor_pb2.TensorChunk]]]:
    """(header, chunks) of each micro-batch on a request stream; malformed framing -> InvalidArgument."""
    requests = iter(requests)
    for request in requests:
        if request.WhichOneof("item") != "header":
            raise InvalidArgument("a micro-batch must start with a header message, got a tensor chunk")
        header = request.header
        if header.phase not in (tensor_pb2.PHASE_PREFILL, tensor_pb2.PHASE_DECODE):
            raise InvalidArgument(f"micro-batch {header.micro_batch_id}: phase must be PREFILL or DECODE")
        pieces = []
        for _ in range(header.chunk_count):
            piece = next(requests, None)
            if piece is None or piece.WhichOneof("item") != "chunk":
                raise InvalidArgument(
                    f"micro-batch {header.micro_batch_id} announced {header.chunk_count} chunks "
                    "but the stream broke off"
                )
            pieces.append(piece.chunk)
        yield header, pieces
