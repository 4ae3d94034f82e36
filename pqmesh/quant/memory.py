"""Bytes a decoder layer holds at a given bitwidth: predicted from the config, measured on a module.

`predict_layer_bytes` builds the family's decoder layer on the meta device (no memory, no checkpoint)
to learn the exact shape of every linear and every other tensor, then counts what `QuantLinear`
stores for each linear: packed codes (rows padded as `pqmesh.quant.packing.row_bytes` says), fp16
scale and offset per group (`effective_group_size`), and the bias in the model dtype; norms and any
other tensors stay in the model dtype. `measure_layer_bytes` counts the distinct storage a loaded
layer really holds (the same rule as `ModelShard.weight_bytes`). The two agree exactly; the
dequantization work buffer is per stage, not per layer (`workspace_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from pqmesh.errors import InvalidArgument
from pqmesh.model.families import family_for
from pqmesh.model.loading import storage_bytes
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, linear_children
from pqmesh.quant.packing import padded_width, row_bytes
from pqmesh.quant.qlinear import SCALE_DTYPE, effective_group_size
from pqmesh.types import Bits


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int
    in_features: int
    bias: bool


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer of a config is made of."""

    linears: tuple[LinearShape, ...]
    other_floats: int  # elements of floating tensors outside the linears (norms), in the model dtype
    other_bytes: int  # bytes of non-floating tensors outside the linears (kept in their own dtype)

    @property
    def linear_params(self) -> int:
        return sum(s.out_features * s.in_features for s in self.linears)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise InvalidArgument(f"unknown dtype {dtype!r}; use e.g. float16, bfloat16 or float32")
    return found


def layer_shape(config: PretrainedConfig) -> LayerShape:
    """Shapes of one decoder layer of ``config`` (built on the meta device; all layers are alike)."""
    with torch.device("meta"):
        layer = family_for(config).build_layer(0)
    linears, linear_ids = [], set()
    for slot in linear_children(layer):
        linear = slot.linear
        linear_ids.update(id(t) for t in linear.parameters())
        linears.append(LinearShape(slot.name, linear.out_features, linear.in_features, linear.bias is not None))
    floats = other = 0
    for tensor in [*layer.parameters(), *layer.buffers()]:
        if id(tensor) in linear_ids:
            continue
        if tensor.is_floating_point():
            floats += tensor.numel()
        else:
            other += tensor.numel() * tensor.element_size()
    return LayerShape(tuple(linears), floats, other)


def linear_bytes(shape: LinearShape, bits: Bits | int | str, group_size: int, dtype: torch.dtype | str) -> int:
    bits, dtype = Bits.parse(bits), _dtype(dtype)
    element = torch.empty((), dtype=dtype).element_size()
    bias = shape.out_features * element if shape.bias else 0
    if not bits.quantized:
        return shape.out_features * shape.in_features * element + bias
    groups = shape.in_features // effective_group_size(shape.in_features, group_size)
    scale_element = torch.empty((), dtype=SCALE_DTYPE).element_size()
    packed = shape.out_features * row_bytes(shape.in_features, bits.count)
    return packed + 2 * shape.out_features * groups * scale_element + bias


def predict_layer_bytes(
    config: PretrainedConfig,
    bits: Bits | int | str,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: torch.dtype | str = torch.float16,
    shape: LayerShape | None = None,
) -> int:
    """Bytes one decoder layer of ``config`` holds at ``bits`` with the model in ``dtype``.

    Pass ``shape`` (from `layer_shape`) to skip rebuilding the layer when asking many times.
    """
    shape = shape or layer_shape(config)
    element = torch.empty((), dtype=_dtype(dtype)).element_size()
    linears = sum(linear_bytes(s, bits, group_size, dtype) for s in shape.linears)
    return linears + shape.other_floats * element + shape.other_bytes


def measure_layer_bytes(layer: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage ``layer`` holds."""
    return storage_bytes(layer)

def workspace_bytes(
    config: PretrainedConfig, dtype: torch.dtype | str = torch.float16, bits: Bits | int | str = 4
) -> int:
    """Bytes of the per-stage dequantization `Workspace` for ``config`` at ``bits`` (0 at 16): its
    buffers grow to the largest linear's weight in ``dtype`` and, below 8 bits, its unpacked codes
    (the two-plane widths 3, 5 and 6 unpack their second plane through the weight buffer's bytes:
    `pqmesh.quant.qlinear`). Counted once per stage, not per layer."""
    bits = Bits.parse(bits)
    if not bits.quantized:
        return 0
    element = torch.empty((), dtype=_dtype(dtype)).element_size()
    linears = layer_shape(config).linears
    weight = max(s.out_features * s.in_features for s in linears) * element
    if bits.count == 8:
        return weight
    return weight + max(s.out_features * padded_width(s.in_features, bits.count) for s in linears)
