"""The stage's bridge to `pqmesh.quant`: how to load the planned bits (quantize on the fly, or read a
pre-quantized checkpoint as stored) and the bytes it will take.

Predictions come from the config alone (16-bit modules counted on the meta device, quantized layers
from `predict_layer_bytes`; the shared dequantization workspace separately), so LoadShard can refuse a
shard that does not fit before allocating anything.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pqmesh.errors import FailedPrecondition
from pqmesh.model import ModelShard
from pqmesh.quant.checkpoint import layer_filler, read_quantized
from pqmesh.quant.layer import plan_hook
from pqmesh.quant.memory import layer_shape, predict_layer_bytes, workspace_bytes
from pqmesh.types import Bits, parse_bits_list


def layer_hook(start: int, bits: Sequence[int], group_size: int):
    """None when every layer stays 16-bit, else a hook quantizing layer ``start + i`` to ``bits[i]``."""
    plan = parse_bits_list(bits)
    if all(not b.quantized for b in plan):
        return None
    return plan_hook(plan, start, start + len(plan), group_size)


def shard_loading(directory, config, start: int, bits: Sequence[int], group_size: int) -> dict:
    """``ModelShard.load`` keywords for this shard: a pre-quantized checkpoint (`pqmesh quantize`) is
    read as stored, after checking it holds the planned bits and group size; a plain one is quantized
    on the fly by the layer hook."""
    stored = read_quantized(directory)
    if stored is None:
        return {"layer_hook": layer_hook(start, bits, group_size)}
    stored.check_plan(start, bits, str(directory))
    if any(Bits(b).quantized for b in bits) and stored.group_size != group_size:
        raise FailedPrecondition(
            f"{directory} is quantized with groups of {stored.group_size} but the plan asks {group_size}; "
            f"plan with group size {stored.group_size} or quantize again with --group-size {group_size}"
        )
    return {"layer_filler": layer_filler(stored, config)}


def predict_shard_weight_bytes(
    config, start: int, end: int, bits: Sequence[int], group_size: int, dtype: torch.dtype
) -> int:
    plan = parse_bits_list(bits)
    total = ModelShard.predict_weight_bytes(config, start, end, dtype)
    quantized = [b for b in plan if b.quantized]
    if not quantized:
        return total
    shape = layer_shape(config)
    full = predict_layer_bytes(config, Bits.parse(16), group_size, dtype, shape)
    return total + sum(predict_layer_bytes(config, b, group_size, dtype, shape) - full for b in quantized)


def predict_workspace_bytes(config, bits: Sequence[int], dtype: torch.dtype) -> int:
    """The shared dequantization buffer of a stage with quantized layers (allocated at first use)."""
    quantized = {b for b in parse_bits_list(bits) if b.quantized}
    return max((workspace_bytes(config, dtype, b) for b in quantized), default=0)
