"""Quantize a whole decoder layer, and build the `ModelShard.load` hook that does it per plan.

`quantize_layer` swaps every ``nn.Linear`` inside a decoder layer (attention and MLP) for a
`QuantLinear`; norms stay as they are, and embeddings and the LM head are never passed to it. Used as
``ModelShard.load(..., layer_hook=plan_hook(bits, start, end))``, each layer is quantized right after
its tensors are read, so a stage never holds more than one 16-bit layer beyond its quantized ones.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import structlog
from torch import nn

from pqmesh.errors import InvalidArgument
from pqmesh.quant.qlinear import QuantLinear, Workspace
from pqmesh.types import DEFAULT_GROUP_SIZE, Bits, parse_bits_list

log = structlog.get_logger(__name__)

LayerHook = Callable[[int, nn.Module], nn.Module]


class LinearSlot(NamedTuple):
    name: str  # dotted path within the layer, e.g. "self_attn.q_proj"
    parent: nn.Module
    attribute: str
    linear: nn.Linear


def linear_children(layer: nn.Module) -> list[LinearSlot]:
    """Every plain ``nn.Linear`` inside ``layer``, in ``named_modules`` order."""
    found = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and name:
            parent_name, _, attribute = name.rpartition(".")
            found.append(LinearSlot(name, layer.get_submodule(parent_name), attribute, module))
    return found


def quantize_layer(
    layer: nn.Module,
    bits: Bits | int | str,
    group_size: int = DEFAULT_GROUP_SIZE,
    workspace: Workspace | None = None,
) -> nn.Module:
    """Replaces the linears of ``layer`` in place by ``bits``-bit `QuantLinear`s; returns ``layer``.

    16 bits returns the layer untouched. Pass one ``workspace`` for all layers of a stage so they
    share a single dequantization buffer.
    """
    bits = Bits.parse(bits)
    if not bits.quantized:
        return layer
    workspace = workspace if workspace is not None else Workspace()
    for slot in linear_children(layer):
        setattr(slot.parent, slot.attribute, QuantLinear.from_linear(slot.linear, bits, group_size, workspace))
    return layer


def plan_hook(
    bits: Sequence[Bits | int | str],
    start: int,
    end: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    workspace: Workspace | None = None,
) -> LayerHook:
    """A ``layer_hook`` for layers [start, end): ``bits`` has one entry per layer of that range."""
    plan = parse_bits_list(bits)
    if end - start != len(plan):
        raise InvalidArgument(
            f"bits plan has {len(plan)} entries for layers [{start}, {end}); give exactly {end - start}, one per layer"
        )
    shared = workspace if workspace is not None else Workspace()

    def hook(index: int, layer: nn.Module) -> nn.Module:
        if not start <= index < end:
            raise InvalidArgument(f"layer {index} is outside the planned range [{start}, {end})")
        chosen = plan[index - start]
        log.debug("quantize_layer", layer=index, bits=chosen.count, group_size=group_size)
        return quantize_layer(layer, chosen, group_size, shared)

    return hook


def uniform_hook(
    bits: Bits | int | str, group_size: int = DEFAULT_GROUP_SIZE, workspace: Workspace | None = None
) -> LayerHook:
    """A ``layer_hook`` quantizing every layer it sees to the same width."""
    chosen = Bits.parse(bits)
    shared = workspace if workspace is not None else Workspace()
    return lambda index, layer: quantize_layer(layer, chosen, group_size, shared)
