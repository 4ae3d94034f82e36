"""The fused CUDA path for 4-bit linears: torch's tinygemm kernel (``torch._weight_int4pack_mm``).

Used only where it exists and applies: a CUDA device of compute capability 8.0 or newer, a bfloat16
model, 4 bits, ``in_features`` a multiple of 32 * 2 (the kernel's K tile), ``out_features`` a
multiple of 8, and a group size of 32, 64, 128 or 256. It stores the same information in the same
bytes as the generic layout (4 bits per weight; one bf16 scale and one bf16 zero per group, where
the generic layout keeps an fp16 scale and offset), so `pqmesh.quant.memory` predicts both alike.

This path cannot run on the CPU-only machines the tests use, so it is guarded: `prepare` packs the
weight, runs the kernel once on a random input and compares it with the generic dequantized weight;
any exception or a relative error above 2% logs a warning and the linear keeps the generic layout.
"""

from __future__ import annotations

import structlog
import torch

log = structlog.get_logger(__name__)

INNER_K_TILES = 2
_GROUPS = (32, 64, 128, 256)


def eligible(
    in_features: int, out_features: int, group_size: int, bits: int, device: torch.device, dtype: torch.dtype
) -> bool:
    if device.type != "cuda" or bits != 4 or dtype != torch.bfloat16 or not hasattr(torch, "_weight_int4pack_mm"):
        return False
    if group_size not in _GROUPS or in_features % (INNER_K_TILES * 16) or out_features % 8:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def _pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic codes / fp16 scale, offset -> tinygemm's packed int32 weight and [groups, N, 2] bf16
    scale-and-zero, where it computes ``(q - 8) * scale + zero``, i.e. zero = offset + 8 * scale."""
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    packed = torch._convert_weight_to_int4pack(pairs, INNER_K_TILES)
    zero = offset.float() + 8 * scale.float()
    scale_zero = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scale_zero


def matmul(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch._weight_int4pack_mm(flat, packed, group_size, scale_zero)
    return out.view(*x.shape[:-1], out_features).to(x.dtype)


def prepare(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, reference: torch.Tensor):
    """(packed, scale_zero) when the kernel reproduces ``reference`` (the dequantized weight), else None."""
    try:
        packed, scale_zero = _pack(codes, scale, offset)
        probe = torch.randn(8, codes.shape[1], device=codes.device, dtype=torch.bfloat16)
        got = matmul(probe, packed, scale_zero, group_size, codes.shape[0]).float()
        want = probe.float() @ reference.float().T
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    except Exception as exc:  # noqa: BLE001 - any kernel failure means: use the generic layout
        log.warning("tinygemm_unavailable", error=str(exc))
        return None
    if err > 0.02:
        log.warning("tinygemm_mismatch", relative_error=err)
        return None
    return packed, scale_zero


def unpack_weight(
    packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int, out_features: int, dtype
) -> torch.Tensor:
    """The dequantized ``[out, in]`` weight, read back through the kernel with an identity input."""
    eye = torch.eye(in_features, device=packed.device, dtype=torch.bfloat16)
    return matmul(eye, packed, scale_zero, group_size, out_features).T.contiguous().to(dtype)
