"""Bit packing of integer weight codes, row by row, in bit planes.

A code of ``b`` bits is split into planes of 8, 4, 2 or 1 bits (`pqmesh.types.Bits.planes`): 8 -> (8),
4 -> (4), 2 -> (2), 3 -> (2, 1), 5 -> (4, 1), 6 -> (4, 2), low bits first (at 3 bits the low two in a
2-bit plane and the high bit in a 1-bit plane). A plane of width
``w`` holds ``P = 8 // w`` codes per byte, and a row of ``n`` codes is laid out *strided*: byte ``i``
holds codes ``i, i + n/P, i + 2n/P, ...`` at bit offsets ``0, w, 2w, ...``. Unpacking a plane is then
one broadcast shift-and-mask that writes ``P`` contiguous runs of the row, which is what makes the
dequantize-before-matmul path fast on CPU (see `pqmesh.quant.qlinear`).

Why 3-bit as a 2-bit plane plus a 1-bit plane: it costs exactly 3 bits per weight (``3n/8`` bytes
per row; "10 codes per int32" costs 3.2 bits and leaves 2 bits per word unused), every plane unpacks
with byte-wide shifts (no 24-bit words straddling bytes), and it measured faster on CPU than
"8 codes in 3 bytes" (2.8 ms vs 4.4 ms to dequantize a 1536x512 matrix on one core). Rows are padded
to a multiple of ``8 // narrowest plane`` codes (at most 7 codes of padding per row), so the packed
size is exact and predictable from the shape alone: `row_bytes`.
"""

from __future__ import annotations

import torch

from pqmesh.errors import InvalidArgument
from pqmesh.types import STORED_BITS, Bits


def _planes(bits: int) -> tuple[int, ...]:
    try:
        return Bits.parse(bits).planes
    except InvalidArgument:
        packed = sorted(b.value for b in STORED_BITS if b.quantized)
        raise InvalidArgument(f"cannot pack {bits}-bit codes; packed widths are {packed}") from None


def scratch_width(in_features: int, bits: int) -> int:
    """Bytes per row of `unpack`'s ``scratch`` at ``bits``: one packed row of the second plane (0 for
    one-plane widths), an eighth (1-bit plane) or a quarter (2-bit) of the unpacked codes."""
    planes = _planes(bits)
    return padded_width(in_features, bits) * planes[1] // 8 if len(planes) > 1 else 0


def row_multiple(bits: int) -> int:
    """Codes per row are padded to a multiple of this."""
    return 8 // min(_planes(bits))


def padded_width(in_features: int, bits: int) -> int:
    step = row_multiple(bits)
    return -(-in_features // step) * step


def row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row of ``in_features`` codes (padding included)."""
    return padded_width(in_features, bits) * bits // 8


def _pack_plane(values: torch.Tensor, width: int) -> torch.Tensor:
    if width == 8:
        return values
    per_byte = 8 // width
    rows, n = values.shape
    parts = values.view(rows, per_byte, n // per_byte)
    out = parts[:, 0].clone()
    for j in range(1, per_byte):
        out |= parts[:, j] << (width * j)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[rows, n]`` with values below ``2**bits`` -> uint8 ``[rows, row_bytes(n, bits)]``."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise InvalidArgument(f"codes must be a 2-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    planes = _planes(bits)
    rows, n = codes.shape
    width = padded_width(n, bits)
    if width != n:
        codes = torch.nn.functional.pad(codes, (0, width - n))
    out, shift = [], 0
    for plane in planes:
        out.append(_pack_plane((codes >> shift) & ((1 << plane) - 1), plane))
        shift += plane
    return torch.cat(out, dim=1).contiguous() if len(out) > 1 else out[0].contiguous()


def _unpack_plane(packed: torch.Tensor, width: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the codes of one plane ``[rows, nbytes]`` into ``out`` ``[rows, nbytes * 8 // width]``."""
    if width == 8:
        return out.copy_(packed)
    per_byte = 8 // width
    rows, nbytes = packed.shape
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device).view(1, per_byte, 1)
    torch.bitwise_and(packed.unsqueeze(1) >> shifts, (1 << width) - 1, out=out.view(rows, per_byte, nbytes))
    return out


def unpack(
    packed: torch.Tensor,
    bits: int,
    in_features: int,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `pack`: uint8 ``[rows, padded_width(in_features, bits)]`` (padding included).

    ``out`` (that shape) and ``scratch`` (two-plane widths only: 3, 5, 6; ``[rows, scratch_width]``)
    are optional uint8 buffers, reused if given. The second plane is ORed into ``out`` one position
    of its bytes at a time, so the scratch holds one packed plane's bytes, not a second code buffer.
    """
    planes = _planes(bits)
    rows = packed.shape[0]
    width = padded_width(in_features, bits)
    if packed.shape[1] != row_bytes(in_features, bits):
        raise InvalidArgument(
            f"packed rows hold {packed.shape[1]} bytes; {in_features} codes at {bits} bits "
            f"need {row_bytes(in_features, bits)}"
        )
    if out is None:
        out = torch.empty(rows, width, dtype=torch.uint8, device=packed.device)
    if len(planes) == 1:
        return _unpack_plane(packed, planes[0], out)
    low_bytes = width * planes[0] // 8
    _unpack_plane(packed[:, :low_bytes], planes[0], out)
    high, plane = packed[:, low_bytes:], planes[1]
    if scratch is None:
        scratch = torch.empty_like(high)
    per_byte, mask = 8 // plane, (1 << plane) - 1
    view = out.view(rows, per_byte, high.shape[1])
    for j in range(per_byte):  # out[:, j-th slice] |= ((high >> plane*j) & mask) << planes[0]
        torch.bitwise_right_shift(high, plane * j, out=scratch)
        scratch.bitwise_and_(mask).bitwise_left_shift_(planes[0])
        view[:, j].bitwise_or_(scratch)
    return out
