"""Round trips and error cases of the tensor codec (pqmesh.codec)."""

from __future__ import annotations

import pytest
import torch

from pqmesh import codec
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.errors import InvalidArgument

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic tensor with varied values (negatives, fractions) for the dtype."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_round_trip_every_dtype(dtype, shape):
    t = sample(dtype, shape)
    msg = codec.encode(t)
    assert msg.dtype == codec.dtype_name(dtype)
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    assert_identical(codec.decode(msg), t)


def test_bfloat16_keeps_exact_bits():
    t = torch.tensor([1.0, -0.0, float("inf"), 3.140625, 1e-38], dtype=torch.bfloat16)
    out = codec.decode(codec.encode(t))
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_float_special_values():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.float32)
    out = codec.decode(codec.encode(t))
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_empty_tensors(shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    msg = codec.encode(t)
    assert msg.data == b""
    assert_identical(codec.decode(msg), t)


def test_scalar():
    t = torch.tensor(42, dtype=torch.int64)
    msg = codec.encode(t)
    assert list(msg.shape) == []
    out = codec.decode(msg)
    assert out.shape == torch.Size([])
    assert_identical(out, t)


def test_non_contiguous_inputs():
    base = sample(torch.float32, (6, 8))
    transposed = base.t()
    stepped = base[::2, 1::3]
    for t in (transposed, stepped, sample(torch.bfloat16, (4, 6)).t()[1:]):
        assert not t.is_contiguous()
        assert_identical(codec.decode(codec.encode(t)), t)


def test_view_of_larger_storage_sends_only_its_bytes():
    base = torch.arange(100, dtype=torch.int32)
    t = base[10:20]
    assert t.is_contiguous()
    msg = codec.encode(t)
    assert len(msg.data) == 10 * 4
    assert_identical(codec.decode(msg), t)


def test_requires_grad_is_detached():
    t = torch.randn(3, 4, requires_grad=True)
    out = codec.decode(codec.encode(t))
    assert not out.requires_grad
    assert torch.equal(out, t.detach())


def test_decoded_tensor_is_writable_and_independent():
    msg = codec.encode(torch.zeros(4))
    out = codec.decode(msg)
    out += 1
    assert torch.equal(codec.decode(msg), torch.zeros(4))


def test_decode_to_device():
    out = codec.decode(codec.encode(torch.ones(2, 2)), device="cpu")
    assert out.device.type == "cpu"


# --- chunking -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_bytes",
    [1, 7, 64, 96, 100, 4096, codec.DEFAULT_CHUNK_BYTES],
    ids=lambda n: f"max{n}",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_chunked_round_trip(dtype, max_bytes):
    t = sample(dtype, (4, 6))  # 96, 48, 192 or 24 bytes
    total = t.numel() * t.element_size()
    chunks = list(codec.chunk(t, "hidden", max_bytes))
    assert len(chunks) == max(1, -(-total // max_bytes))
    assert all(len(c.data) <= max_bytes for c in chunks)
    assert [c.offset for c in chunks] == [i * max_bytes for i in range(len(chunks))]
    assert {c.total_bytes for c in chunks} == {total}
    assert {c.name for c in chunks} == {"hidden"}
    assert_identical(codec.join(chunks), t)


def test_chunk_size_dividing_and_not_dividing():
    t = sample(torch.float32, (1000,))  # 4000 bytes
    dividing = list(codec.chunk(t, "x", 1000))
    assert [len(c.data) for c in dividing] == [1000] * 4
    ragged = list(codec.chunk(t, "x", 1024))
    assert [len(c.data) for c in ragged] == [1024, 1024, 1024, 928]
    assert_identical(codec.join(dividing), t)
    assert_identical(codec.join(ragged), t)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=str)
def test_empty_tensor_is_one_chunk(shape):
    t = torch.empty(shape, dtype=torch.float16)
    chunks = list(codec.chunk(t, "empty", 16))
    assert len(chunks) == 1
    assert chunks[0].data == b"" and chunks[0].total_bytes == 0
    assert_identical(codec.join(chunks), t)


def test_chunked_non_contiguous_and_scalar():
    t = sample(torch.bfloat16, (8, 10)).t()[::3]
    assert_identical(codec.join(codec.chunk(t, "t", 10)), t)
    s = torch.tensor(2.5, dtype=torch.float64)
    assert_identical(codec.join(codec.chunk(s, "s", 3)), s)


def test_join_accepts_a_generator_and_device():
    t = sample(torch.int32, (5, 5))
    out = codec.join((c for c in codec.chunk(t, "g", 16)), device="cpu")
    assert_identical(out, t)


def test_chunks_fit_under_the_message_limit():
    assert codec.DEFAULT_CHUNK_BYTES <= codec.MAX_CHUNK_BYTES < codec.MAX_MESSAGE_BYTES
    t = torch.zeros(3, 1000, dtype=torch.int64)
    for c in codec.chunk(t, "big-name" * 10, codec.MAX_CHUNK_BYTES):
        assert c.ByteSize() < codec.MAX_MESSAGE_BYTES


# --- errors ---------------------------------------------------------------------------------


def test_codec_error_is_value_error_and_invalid_argument():
    assert issubclass(codec.CodecError, ValueError)
    assert issubclass(codec.CodecError, InvalidArgument)


def test_unknown_dtype_name():
    msg = tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8)
    with pytest.raises(codec.CodecError, match="complex64") as err:
        codec.decode(msg)
    for name in codec.SUPPORTED_DTYPES:
        assert name in str(err.value)


def test_torch_prefixed_dtype_name_is_rejected():
    with pytest.raises(codec.CodecError, match="torch.float32"):
        codec.decode(tensor_pb2.Tensor(dtype="torch.float32", shape=[1], data=b"\0" * 4))


def test_unsupported_tensor_dtype_on_encode():
    with pytest.raises(codec.CodecError, match="complex64"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(codec.CodecError, match="complex64"):
        list(codec.chunk(torch.zeros(2, dtype=torch.complex64), "c"))


@pytest.mark.parametrize("size", [0, 11, 13, 24])
def test_data_length_mismatch(size):
    msg = tensor_pb2.Tensor(dtype="float32", shape=[3], data=b"\0" * size)
    with pytest.raises(codec.CodecError, match="need 12"):
        codec.decode(msg)


def test_data_for_empty_shape_must_be_empty():
    with pytest.raises(codec.CodecError):
        codec.decode(tensor_pb2.Tensor(dtype="int8", shape=[2, 0], data=b"\0"))


def test_negative_dimension():
    with pytest.raises(codec.CodecError, match="negative"):
        codec.decode(tensor_pb2.Tensor(dtype="int8", shape=[-1, -2], data=b"\0\0"))


@pytest.mark.parametrize("max_bytes", [0, -1, codec.MAX_CHUNK_BYTES + 1])
def test_chunk_size_out_of_range(max_bytes):
    with pytest.raises(codec.CodecError, match="max_bytes"):
        list(codec.chunk(torch.zeros(4), "x", max_bytes))


def _chunks(n_bytes_each: int = 8) -> list[tensor_pb2.TensorChunk]:
    return list(codec.chunk(torch.arange(8, dtype=torch.int32), "x", n_bytes_each))  # 4 chunks


def test_join_no_chunks():
    with pytest.raises(codec.CodecError, match="no chunks"):
        codec.join([])


def test_join_missing_chunk():
    chunks = _chunks()
    with pytest.raises(codec.CodecError, match="expected offset 8, got 16"):
        codec.join([chunks[0], chunks[2], chunks[3]])


def test_join_out_of_order():
    chunks = _chunks()
    with pytest.raises(codec.CodecError, match="offset"):
        codec.join([chunks[1], chunks[0], chunks[2], chunks[3]])


def test_join_repeated_chunk():
    chunks = _chunks()
    with pytest.raises(codec.CodecError, match="expected offset 16, got 8"):
        codec.join([chunks[0], chunks[1], chunks[1], chunks[2], chunks[3]])


def test_join_truncated_stream():
    with pytest.raises(codec.CodecError, match="got 24 of 32 bytes"):
        codec.join(_chunks()[:3])


def test_join_overlong_last_chunk():
    chunks = _chunks()
    chunks[3].data = chunks[3].data + b"\0"
    with pytest.raises(codec.CodecError, match="run past total_bytes 32"):
        codec.join(chunks)


def test_join_empty_middle_chunk():
    chunks = _chunks()
    empty = tensor_pb2.TensorChunk()
    empty.CopyFrom(chunks[1])
    empty.data = b""
    with pytest.raises(codec.CodecError, match="empty chunk"):
        codec.join([chunks[0], empty, *chunks[1:]])


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "y"), ("dtype", "float32"), ("total_bytes", 64)],
)
def test_join_inconsistent_metadata(field, value):
    chunks = _chunks()
    setattr(chunks[2], field, value)
    with pytest.raises(codec.CodecError, match=f"{field} changed"):
        codec.join(chunks)


def test_join_inconsistent_shape():
    chunks = _chunks()
    del chunks[1].shape[:]
    chunks[1].shape.extend([2, 4])
    with pytest.raises(codec.CodecError, match="shape changed"):
        codec.join(chunks)


def test_join_total_bytes_disagrees_with_shape():
    chunks = _chunks(32)
    chunks[0].total_bytes = 16
    with pytest.raises(codec.CodecError, match="total_bytes is 16"):
        codec.join(chunks)


def test_join_unknown_dtype():
    chunks = _chunks()
    for c in chunks:
        c.dtype = "float8"
    with pytest.raises(codec.CodecError, match="float8"):
        codec.join(chunks)
