"""The pre-quantized checkpoint format: what `pqmesh quantize` writes and stages load directly.

A directory that any `CheckpointReader` opens (a sharded safetensors checkpoint), so a stage reads
only the tensors of its own layers:

- ``config.json`` and the tokenizer files, copied from the source checkpoint;
- ``layer-00007.safetensors``: decoder layer 7 under its usual names; a quantized linear
  ``...q_proj`` is stored as ``q_proj.packed`` (uint8 bit planes, `pqmesh.quant.packing`),
  ``q_proj.scale`` and ``q_proj.offset`` (fp16, one per group) and ``q_proj.bias`` if it has one,
  i.e. exactly the buffers of a generic-layout `QuantLinear`; a 16-bit layer keeps its tensors;
- ``other.safetensors``: embeddings, final norm, LM head, as stored in the source;
- ``model.safetensors.index.json``: the weight map, and under ``metadata.pqmesh`` the format
  (``"pqmesh-quantized"``), its ``version``, the per-layer ``bits``, ``group_size``, ``method``
  (``rtn`` or ``gptq``), the calibration it used, and the source ``fingerprint``.

The fingerprint hashes the architecture (model type, layer count, vocabulary, every tensor shape of
a decoder layer) of the config the checkpoint was quantized from; a ``config.json`` that no longer
matches it (copied from another model) is refused on open.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.model.families import family_for
from pqmesh.model.loading import INDEX_FILE, CheckpointReader, fill_module, load_config
from pqmesh.quant import cuda
from pqmesh.quant.layer import linear_children
from pqmesh.quant.qlinear import QuantLinear, Workspace
from pqmesh.types import Bits, parse_bits_list

FORMAT = "pqmesh-quantized"
VERSION = 1
OTHER_FILE = "other.safetensors"


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def fingerprint(config: PretrainedConfig) -> str:
    """sha256 of the architecture: model type, layers, vocabulary, one decoder layer's tensor shapes."""
    family = family_for(config)
    with torch.device("meta"):
        layer = family.build_layer(0)
    shapes = sorted((name, list(t.shape)) for name, t in layer.state_dict().items())
    text = json.dumps([config.model_type, config.num_hidden_layers, config.vocab_size, config.hidden_size, shapes])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """The ``metadata.pqmesh`` record of a quantized checkpoint."""

    bits: tuple[Bits, ...]
    group_size: int
    method: str
    fingerprint: str
    model: str = ""
    calibration: dict = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(parse_bits_list(self.bits)))
        if self.group_size < 1:
            raise InvalidArgument(f"group size must be positive, got {self.group_size}")
        if self.method not in ("rtn", "gptq"):
            raise InvalidArgument(f"quantization method must be rtn or gptq, got {self.method!r}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["bits"] = [b.value for b in self.bits]
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "QuantizedCheckpoint":
        if data.get("format") != FORMAT:
            raise FailedPrecondition(f"{where} is not a pqmesh quantized checkpoint (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise FailedPrecondition(
                f"{where} has quantized-checkpoint format version {data.get('version')!r}; this pqmesh reads "
                f"version {VERSION}: re-run pqmesh quantize with this version"
            )
        keys = ("bits", "group_size", "method", "fingerprint", "model", "calibration", "version")
        return cls(**{k: data[k] for k in keys if k in data})

    def check_plan(self, start: int, bits: Sequence[Bits | int | str], where: str) -> None:
        """Refuses a plan for layers [start, start + len(bits)) that differs from what is stored."""
        asked = parse_bits_list(bits)
        stored = self.bits[start:start + len(asked)]
        if tuple(asked) != stored:
            raise FailedPrecondition(
                f"{where} is quantized to {[b.value for b in stored]} bits for layers [{start}, {start + len(asked)}) "
                f"but the plan asks {[b.value for b in asked]}; plan with the stored bits, or quantize the 16-bit "
                "checkpoint again with pqmesh quantize --bits <the plan>"
            )


def read_quantized(model_dir: str | Path) -> QuantizedCheckpoint | None:
    """The quantization record of ``model_dir``, or None for a plain checkpoint.

    Refuses a record whose fingerprint does not match the directory's config.json."""
    index = Path(model_dir) / INDEX_FILE
    if not index.is_file():
        return None
    record = json.loads(index.read_text()).get("metadata", {}).get("pqmesh")
    if record is None:
        return None
    info = QuantizedCheckpoint.from_json(record, str(model_dir))
    config = load_config(Path(model_dir))
    if len(info.bits) != config.num_hidden_layers:
        raise FailedPrecondition(f"{model_dir} stores bits for {len(info.bits)} layers but its config.json has "
                                 f"{config.num_hidden_layers}; the config belongs to another model")
    if fingerprint(config) != info.fingerprint:
        raise FailedPrecondition(
            f"{model_dir}/config.json describes another model than the one its weights were quantized from "
            f"({info.model or 'unnamed'}); restore that model's config.json or quantize this model again"
        )
    return info


def layer_filler(info: QuantizedCheckpoint, config: PretrainedConfig, workspace: Workspace | None = None):
    """A `ModelShard.load` ``layer_filler`` that reads layer ``i`` of ``config``'s model at its stored bits."""
    shared = workspace if workspace is not None else Workspace()
    layer_prefix = family_for(config).layer_prefix

    def fill(index: int, layer: nn.Module, reader: CheckpointReader, dtype: torch.dtype, device) -> nn.Module:
        prefix = f"{layer_prefix}{index}"
        bits = info.bits[index]
        if not bits.quantized:
            return fill_module(layer, prefix, reader, dtype, device)
        keep = set()
        for slot in linear_children(layer):
            linear = slot.linear
            module = QuantLinear.placeholder(
                linear.in_features, linear.out_features, bits, info.group_size, linear.bias is not None, shared
            )
            setattr(slot.parent, slot.attribute, module)
            keep.update((f"{slot.name}.scale", f"{slot.name}.offset"))
        layer = fill_module(layer, prefix, reader, dtype, device, keep_dtype=frozenset(keep))
        return _fuse_for_device(layer, dtype, shared)

    return fill


def _fuse_for_device(layer: nn.Module, dtype: torch.dtype, workspace: Workspace) -> nn.Module:
    """Moves 4-bit linears to the fused CUDA layout where on-the-fly quantization would use it."""
    for name, module in list(layer.named_modules()):
        if isinstance(module, QuantLinear) and cuda.eligible(
            module.in_features, module.out_features, module.group_size, module.bits.count, module.packed.device, dtype
        ):
            parent_name, _, attribute = name.rpartition(".")
            fused = QuantLinear.from_quantized(module.quantized(), module.bias, dtype, workspace)
            setattr(layer.get_submodule(parent_name), attribute, fused)
    return layer
