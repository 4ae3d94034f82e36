"""Tensors on the wire: (dtype name, shape, raw bytes), whole or in chunks.

A tensor is sent as the bytes of a ``uint8`` view of a contiguous CPU copy, so every dtype
(bfloat16 included) round-trips bit for bit and nothing is ever pickled. Bytes are in the host's
native order, which is little-endian on every platform we run on.

Activations larger than a gRPC message are streamed as ``TensorChunk`` messages of at most
``max_bytes`` data each; both ends set their message-size limit to ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.errors import InvalidArgument

# Data bytes per TensorChunk by default.
DEFAULT_CHUNK_BYTES = 1 << 20
# gRPC max send/receive message size, set explicitly on every channel and server.
MAX_MESSAGE_BYTES = 8 << 20
# Largest chunk we allow: half the message limit leaves ample room for the metadata.
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES // 2

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPES)


class CodecError(InvalidArgument, ValueError):
    """A tensor or tensor message that cannot be encoded or decoded."""


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype, e.g. ``torch.bfloat16 -> "bfloat16"``."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(
            f"cannot encode dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """Torch dtype for a wire name, e.g. ``"bfloat16" -> torch.bfloat16``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise CodecError(
            f"unknown tensor dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from None


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    """Size in bytes of a tensor with this dtype and shape; rejects negative dimensions."""
    if any(dim < 0 for dim in shape):
        raise CodecError(f"tensor shape {tuple(shape)} has a negative dimension")
    return math.prod(shape) * dtype.itemsize


def _to_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a contiguous CPU copy of ``t``."""
    dtype_name(t.dtype)  # reject unsupported dtypes before copying anything
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _from_bytes(
    name: str, shape: list[int], data: bytes | bytearray, device: torch.device | str | None
) -> torch.Tensor:
    """Rebuild a tensor from its wire parts, checking the byte count against the shape."""
    dtype = torch_dtype(name)
    shape = list(shape)
    expected = _nbytes(dtype, shape)
    if len(data) != expected:
        raise CodecError(
            f"tensor data is {len(data)} bytes but dtype {name} and shape {tuple(shape)} "
            f"need {expected}"
        )
    if expected == 0:
        out = torch.empty(shape, dtype=dtype)
    else:
        # bytearray gives torch a writable buffer that the new tensor keeps alive.
        buf = data if isinstance(data, bytearray) else bytearray(data)
        out = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
    return out if device is None else out.to(device)


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a tensor of a supported dtype as a ``Tensor`` message (copies to CPU)."""
    return tensor_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=_to_bytes(t))


def decode(msg: tensor_pb2.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode a ``Tensor`` message; the result is a fresh tensor on ``device`` (default CPU)."""
    return _from_bytes(msg.dtype, list(msg.shape), msg.data, device)


def chunk(
    t: torch.Tensor, name: str, max_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tensor_pb2.TensorChunk]:
    """Split a tensor into ``TensorChunk`` messages carrying at most ``max_bytes`` data each.

    Always yields at least one chunk, so an empty tensor still arrives with its shape.
    """
    if not 0 < max_bytes <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk max_bytes must be in 1..{MAX_CHUNK_BYTES}, got {max_bytes}")
    dtype = dtype_name(t.dtype)
    shape = list(t.shape)
    data = _to_bytes(t)
    total = len(data)
    view = memoryview(data)
    offset = 0
    while True:
        piece = view[offset : offset + max_bytes]
        yield tensor_pb2.TensorChunk(
            name=name,
            dtype=dtype,
            shape=shape,
            offset=offset,
            total_bytes=total,
            data=bytes(piece),
        )
        offset += len(piece)
        if offset >= total:
            return


def join(
    chunks: Iterable[tensor_pb2.TensorChunk], device: torch.device | str | None = None
) -> torch.Tensor:
    """Reassemble the tensor sent by ``chunk``.

    The chunks must share name, dtype, shape and total size, arrive in order, and tile the
    tensor's bytes exactly; anything else raises ``CodecError``.
    """
    first: tensor_pb2.TensorChunk | None = None
    buf = bytearray()
    position = 0
    for piece in chunks:
        if first is None:
            first = piece
            expected = _nbytes(torch_dtype(piece.dtype), list(piece.shape))
            if piece.total_bytes != expected:
                raise CodecError(
                    f"chunk {piece.name!r}: total_bytes is {piece.total_bytes} but dtype "
                    f"{piece.dtype} and shape {tuple(piece.shape)} need {expected}"
                )
        else:
            _check_same_tensor(first, piece)
        if piece.offset != position:
            raise CodecError(
                f"chunk {piece.name!r}: expected offset {position}, got {piece.offset} "
                "(chunks missing, repeated or out of order)"
            )
        size = len(piece.data)
        if size == 0 and first.total_bytes > 0:
            raise CodecError(f"chunk {piece.name!r}: empty chunk at offset {position}")
        if position + size > first.total_bytes:
            raise CodecError(
                f"chunk {piece.name!r}: bytes {position}..{position + size} run past "
                f"total_bytes {first.total_bytes}"
            )
        buf += piece.data  # grows with the bytes that really arrive: a false total_bytes allocates nothing
        position += size
    if first is None:
        raise CodecError("no chunks to join")
    if position != first.total_bytes:
        raise CodecError(
            f"chunk {first.name!r}: got {position} of {first.total_bytes} bytes "
            "(stream ended early)"
        )
    return _from_bytes(first.dtype, list(first.shape), buf, device)


def _check_same_tensor(first: tensor_pb2.TensorChunk, piece: tensor_pb2.TensorChunk) -> None:
    """Every chunk of a tensor must repeat the first chunk's metadata."""
    for field in ("name", "dtype", "total_bytes"):
        if getattr(piece, field) != getattr(first, field):
            raise CodecError(
                f"chunk {first.name!r} at offset {piece.offset}: {field} changed from "
                f"{getattr(first, field)!r} to {getattr(piece, field)!r}"
            )
    if list(piece.shape) != list(first.shape):
        raise CodecError(
            f"chunk {first.name!r} at offset {piece.offset}: shape changed from "
            f"{tuple(first.shape)} to {tuple(piece.shape)}"
        )
