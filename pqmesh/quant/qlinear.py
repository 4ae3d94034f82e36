"""Group-wise weight-only quantization of one linear layer, and the module that runs it.

Format (the same on every device): each output row is split along the input dimension into groups
of ``g`` weights; a group keeps an fp16 ``scale`` and an fp16 ``offset`` (its minimum), and every
weight an unsigned code ``q`` in ``0 .. 2**bits - 1``, so ``w ~ q * scale + offset``. Codes are
bit-packed per row by `pqmesh.quant.packing` (exactly ``bits`` bits per weight).

*Asymmetric* (min/max with a float offset) rather than symmetric: at 2 and 3 bits a symmetric grid
wastes one of its 4 or 8 levels and half the range of a skewed group; the float offset costs 2 bytes
per group (0.125 bit per weight at g = 128) and, unlike an integer zero point, represents both ends
of each group exactly. Scale and offset are rounded to fp16 *before* the codes are chosen, so the
codes are optimal for the stored parameters. A group whose range is 0 stores scale 0.

Group size: when ``in_features`` is not a multiple of the requested group size, the linear uses the
largest divisor of ``in_features`` not above it (SmolLM2's 576 inputs at 128 -> 96), so every group is
whole, no padding is stored, and the memory stays predictable from the config (`effective_group_size`).

Execution: `QuantLinear.forward` unpacks and dequantizes its weight into a work buffer shared by all
quantized linears of a stage (`Workspace`), then calls ``F.linear``: one plain GEMM at the model's
dtype after four vectorized passes over the weight. Measured on this repo's 2-core AVX2 CPU against
fp32 ``F.linear`` (bench/quant_kernels.py, docs/BENCHMARKS.md): 1.1-1.3x at 512 tokens and 1.7-2.9x
at 16 tokens. The alternatives: eager optimum-quanto (qint4 1.3-1.9x at 512 tokens, 2.7-13x at 16;
its qbits weights also raise "Cannot set version_counter for inference tensor" under the
``torch.inference_mode`` that `ModelShard` runs in, and its qint8 is per-channel, not group-wise);
torch's ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` (0.9-1.7x at 16 tokens but
2.1-3.1x at 512, bf16 activations only, int8 per-channel only). Only the dequantize path avoids a
2-3x loss in one of the two phases: a whole SmolLM2 layer (attention and KV cache included) costs
1.06-1.21x the fp32 layer in prefill and 1.25-1.74x in decode. The same code runs on CUDA, where
4-bit bf16 linears use torch's fused tinygemm kernel instead when it is available (`pqmesh.quant.cuda`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pqmesh.errors import InvalidArgument
from pqmesh.quant import cuda
from pqmesh.quant.packing import pack, padded_width, row_bytes, scratch_width, unpack
from pqmesh.types import Bits

SCALE_DTYPE = torch.float16
CLIP_STEPS = 16
CLIP_SHRINK = 0.5
_CHUNK_ELEMENTS = 1 << 22


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size a linear with ``in_features`` inputs uses: ``group_size`` if it divides
    ``in_features``, else the largest divisor of ``in_features`` below it (all of it if smaller)."""
    if group_size < 1:
        raise InvalidArgument(f"group size must be a positive number of weights, got {group_size}")
    if in_features <= group_size:
        return in_features
    for size in range(group_size, 0, -1):
        if in_features % size == 0:
            return size
    raise AssertionError("unreachable: 1 divides everything")


@dataclass(frozen=True)
class QuantizedWeight:
    """Unpacked result of `quantize_weight`: codes [N, K] uint8, scale and offset [N, K // group]."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int
    bits: Bits

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.codes.shape
        groups = self.codes.view(rows, cols // self.group_size, self.group_size).float()
        weight = groups * self.scale.float().unsqueeze(-1) + self.offset.float().unsqueeze(-1)
        return weight.view(rows, cols).to(dtype)


def clipped_range(w: torch.Tensor, levels: int, steps: int, shrink: float,
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim of ``w``), the [low, high] range among ``steps`` ranges shrunk about the
    group's centre from min/max down to ``shrink`` of it that gives the least squared error, each
    weight's error scaled by ``importance`` (broadcast over ``w``; GPTQ passes ``diag(H)``) if given."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    if steps <= 1:
        return low, high
    centre, half = (low + high) / 2, (high - low) / 2
    best_err = best_low = best_high = None
    for factor in torch.linspace(1.0, shrink, steps).tolist():
        lo, hi = centre - half * factor, centre + half * factor
        step = (hi - lo) / levels
        safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(-1)
        codes = ((w - lo.unsqueeze(-1)) / safe).round_().clamp_(0, levels)
        err = codes.mul_(step.unsqueeze(-1)).add_(lo.unsqueeze(-1)).sub_(w).square_()
        err = (err if importance is None else err.mul_(importance)).sum(dim=-1)
        if best_err is None:
            best_err, best_low, best_high = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_low, best_high = torch.where(better, lo, best_low), torch.where(better, hi, best_high)
    return best_low, best_high


def quantize_weight(
    weight: torch.Tensor, bits: Bits | int | str, group_size: int = 128, clip_steps: int | None = None
) -> QuantizedWeight:
    """Asymmetric group-wise quantization of a ``[out, in]`` weight (see module docstring).

    Below 8 bits each group's range is searched (``clip_steps`` candidates, default 16, shrinking
    min/max about the centre to half) for the least squared error: at 3 bits this cuts the weight
    error of SmolLM2's linears from 0.22 to 0.19 of their norm, at 2 bits from 0.53 to 0.36.
    """
    bits = Bits.parse(bits)
    if not bits.quantized:
        raise InvalidArgument("16-bit weights are kept as they are; quantize to 8, 4, 3 or 2 bits")
    if weight.dim() != 2:
        raise InvalidArgument(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    group = effective_group_size(cols, group_size)
    steps = clip_steps if clip_steps is not None else (1 if bits.count >= 8 else CLIP_STEPS)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(rows, cols // group, dtype=SCALE_DTYPE, device=weight.device)
    offset = torch.empty_like(scale)
    chunk = max(1, _CHUNK_ELEMENTS // cols)  # bounds the search's temporaries on big matrices
    for first in range(0, rows, chunk):
        part = slice(first, min(rows, first + chunk))
        w = weight[part].detach().float().view(-1, cols // group, group)
        low, high = clipped_range(w, bits.levels, steps, CLIP_SHRINK)
        scale[part] = ((high - low) / bits.levels).to(SCALE_DTYPE)
        offset[part] = low.to(SCALE_DTYPE)
        step = scale[part].float().unsqueeze(-1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        q = ((w - offset[part].float().unsqueeze(-1)) / step).round_().clamp_(0, bits.levels)
        codes[part] = q.to(torch.uint8).view(-1, cols)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise InvalidArgument("weights exceed the fp16 range of quantization scales; keep this layer at 16 bits")
    return QuantizedWeight(codes, scale, offset, group, bits)


class Workspace:
    """Scratch buffers shared by the quantized linears of one stage: the dequantized weight of the
    linear running now, and its unpacked codes. Sized to the largest linear, reused by all of them.

    One forward at a time per workspace (a lock serializes callers); on CUDA, one stream.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self.lock = threading.Lock()

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # usable both inside and outside inference mode
                buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def __deepcopy__(self, memo) -> "Workspace":  # scratch is not state: a copy starts empty
        return Workspace()


class QuantLinear(nn.Module):
    """A linear layer holding packed ``bits``-bit codes, fp16 group scales and offsets, and its bias.

    ``layout`` is "planes" (the generic format above, every device) or "tinygemm" (4-bit on a recent
    CUDA GPU with a bf16 model: `pqmesh.quant.cuda`; ``scale`` then holds the kernel's bf16
    scale-and-zero pairs and ``offset`` is None, in the same number of bytes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: Bits,
        group_size: int,
        packed: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        bias: torch.Tensor | None,
        workspace: Workspace | None = None,
        layout: str = "planes",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.layout = bits, group_size, layout
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", bias)
        self.workspace = workspace or Workspace()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: Bits | int | str, group_size: int = 128, workspace: Workspace | None = None
    ) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` (`quantize_weight`)."""
        q = quantize_weight(linear.weight, Bits.parse(bits), group_size)
        return cls.from_quantized(q, linear.bias, linear.weight.dtype, workspace)

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, workspace: Workspace | None = None
    ) -> "QuantLinear":
        """The module for an already quantized weight (round-to-nearest or calibrated: one format);
        ``dtype`` is the model's, which decides whether the fused CUDA layout applies."""
        rows, cols = q.codes.shape
        bias = None if bias is None else bias.detach().clone()
        if cuda.eligible(cols, rows, q.group_size, q.bits.count, q.codes.device, dtype):
            fused = cuda.prepare(q.codes, q.scale, q.offset, q.group_size, q.dequantize())
            if fused is not None:
                return cls(cols, rows, q.bits, q.group_size, fused[0], fused[1], None, bias, workspace, "tinygemm")
        packed = pack(q.codes, q.bits.count)
        return cls(cols, rows, q.bits, q.group_size, packed, q.scale, q.offset, bias, workspace)

    @classmethod
    def placeholder(
        cls, in_features: int, out_features: int, bits: Bits, group_size: int, bias: bool,
        workspace: Workspace | None = None,
    ) -> "QuantLinear":
        """A generic-layout linear with meta buffers of the exact stored shapes, to be filled from a
        quantized checkpoint (``load_state_dict(..., assign=True)``)."""
        group = effective_group_size(in_features, group_size)
        meta = torch.device("meta")
        packed = torch.empty(out_features, row_bytes(in_features, bits.count), dtype=torch.uint8, device=meta)
        scale = torch.empty(out_features, in_features // group, dtype=SCALE_DTYPE, device=meta)
        offset = torch.empty_like(scale)
        bias_tensor = torch.empty(out_features, device=meta) if bias else None
        return cls(in_features, out_features, bits, group, packed, scale, offset, bias_tensor, workspace)

    def quantized(self) -> QuantizedWeight:
        """The unpacked codes, scale and offset (generic layout only)."""
        if self.layout != "planes":
            raise InvalidArgument(f"codes are only readable from the generic layout, not {self.layout!r}")
        bits = self.bits.count
        codes = self.packed if bits == 8 else unpack(self.packed, bits, self.in_features)[:, : self.in_features]
        return QuantizedWeight(codes.contiguous(), self.scale, self.offset, self.group_size, self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh ``[out, in]`` weight tensor (default dtype: the bias's, else float32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        if self.layout == "tinygemm":
            return cuda.unpack_weight(
                self.packed, self.scale, self.group_size, self.in_features, self.out_features, dtype
            )
        return self._dequantize_into(Workspace(), dtype, self.packed.device).clone()

    def _dequantize_into(self, workspace: Workspace, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        rows, cols, bits = self.out_features, self.in_features, self.bits.count
        weight = workspace.get("weight", rows * cols, dtype, device).view(rows, cols)
        if bits == 8:
            codes = self.packed
        else:
            width = padded_width(cols, bits)
            out = workspace.get("codes", rows * width, torch.uint8, device).view(rows, width)
            spare = scratch_width(cols, bits)  # the weight buffer is free until the codes are complete
            scratch = weight.view(-1).view(torch.uint8)[: rows * spare].view(rows, spare) if spare else None
            codes = unpack(self.packed, bits, cols, out=out, scratch=scratch)
            codes = codes[:, :cols] if width != cols else codes
        weight.copy_(codes)
        groups = weight.view(rows, cols // self.group_size, self.group_size)
        groups.mul_(self.scale.to(dtype).unsqueeze(-1)).add_(self.offset.to(dtype).unsqueeze(-1))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.layout == "tinygemm":
            y = cuda.matmul(x, self.packed, self.scale, self.group_size, self.out_features)
            return y if bias is None else y + bias
        with self.workspace.lock:
            weight = self._dequantize_into(self.workspace, x.dtype, x.device)
            return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits.count}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, layout={self.layout}"
        )
