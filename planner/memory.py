"""Memory model: bytes a pipeline stage needs on its device.

A stage needs: its decoder layers' weights at their bitwidths (`layer_weight_bytes`), the KV cache
of every sequence of the job for each of its layers (all sequences pass through every stage, and
the cache is allocated for prompt + generation tokens up front), the largest temporary activation of
either phase for its micro-batch size, the dequantization workspace of its quantized layers, the
embeddings (first stage) or final norm + LM head (last stage) unquantized, and a framework reserve
(CUDA context, allocator slack; per device, `DeviceProfile.reserve_bytes`).

Everything unquantized (16-bit layers, norms, biases, embeddings, KV cache, activations) takes
`element` bytes per value: the stage dtype's size (`element_bytes`: 2 for float16/bfloat16, 4 for
float32, which CPU stages run). Quantized layers store packed codes plus one fp16 scale and one fp16
offset per group, whatever the dtype. The byte counts mirror `pqmesh.quant.memory` (packed rows
padded as `pqmesh.quant.packing.row_bytes`, groups as `pqmesh.quant.qlinear.effective_group_size`)
and `stage_server.runtime.StageRuntime.predict_bytes`, without importing torch; tests check they
agree.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from planner.cluster import Workload
from planner.model_shapes import ModelShape
from pqmesh.types import DEFAULT_DTYPE, DEFAULT_GROUP_SIZE, DTYPE_BYTES, Bits, parse_dtype

GIB = 1 << 30
DEFAULT_ELEMENT_BYTES = 2  # default element size: float16 activations, KV cache, embeddings, norms and biases
SCALE_BYTES = 2  # quantized layers keep fp16 scales and offsets (pqmesh.quant.qlinear.SCALE_DTYPE)
DEFAULT_RESERVE_BYTES = 1 * GIB  # for a device whose profile sets no reserve_bytes


def element_bytes(dtype: str) -> int:
    """Bytes per unquantized value for a stage dtype name; "" means float16."""
    return DTYPE_BYTES[parse_dtype(dtype or DEFAULT_DTYPE, hint=" (float32 for stages on a CPU)")]


def effective_group_size(in_features: int, group_size: int) -> int:
    """`group_size` if it divides `in_features`, else its largest divisor below `group_size`."""
    if in_features <= group_size:
        return in_features
    return next(g for g in range(group_size, 0, -1) if in_features % g == 0)


def padded_width(in_features: int, bits: Bits) -> int:
    """Codes per packed row: `in_features` rounded up to the bit planes' row multiple."""
    step = 8 // min(Bits(bits).planes)  # pqmesh.quant.packing.row_multiple
    return -(-in_features // step) * step


def linear_weight_bytes(in_features: int, out_features: int, bits: Bits, group_size: int = DEFAULT_GROUP_SIZE,
                        element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """Bytes of one linear weight matrix at `bits`, weight-only group-wise quantization.

    16 bits: `element` bytes per weight. Below 16: each output row's packed codes (padded to the bit
    planes' row multiple) plus, per group of input weights, one fp16 scale and one fp16 offset.
    """
    if bits == Bits.B16:
        return in_features * out_features * element
    groups = in_features // effective_group_size(in_features, group_size)
    packed = padded_width(in_features, bits) * int(bits) // 8
    return out_features * (packed + 2 * groups * SCALE_BYTES)


@functools.lru_cache(maxsize=4096)
def layer_weight_bytes(
    shape: ModelShape, bits: Bits, group_size: int = DEFAULT_GROUP_SIZE, element: int = DEFAULT_ELEMENT_BYTES
) -> int:
    """One decoder layer: its (quantized) linear matrices plus its unquantized norms and biases."""
    linear = sum(linear_weight_bytes(i, o, bits, group_size, element) for i, o in shape.linear_shapes())
    return linear + shape.layer_fp16_params() * element


@functools.lru_cache(maxsize=4096)
def workspace_bytes(shape: ModelShape, bits: Bits, element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """The stage's shared dequantization buffer for layers at `bits` (0 at 16), as
    `pqmesh.quant.memory.workspace_bytes`: the largest linear's weight in the stage dtype plus, below
    8 bits, its unpacked codes (the two-plane widths unpack their second plane through the weight's
    own bytes, so 3, 5 and 6 bits need nothing more). Counted once per stage."""
    if bits == Bits.B16:
        return 0
    weight = max(i * o for i, o in shape.linear_shapes()) * element
    if bits == Bits.B8:
        return weight
    return weight + max(o * padded_width(i, bits) for i, o in shape.linear_shapes())


def stage_workspace_bytes(shape: ModelShape, bits, element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """Workspace of a stage whose layers use `bits` (any iterable): the largest of theirs."""
    return max((workspace_bytes(shape, b, element) for b in set(bits)), default=0)


def kv_cache_bytes_per_layer(
    shape: ModelShape, sequences: int, tokens: int, element: int = DEFAULT_ELEMENT_BYTES
) -> int:
    """K and V of `sequences` x `tokens` positions for one layer: 2 x seq x tokens x kv_dim x element."""
    return 2 * sequences * tokens * shape.kv_dim * element


def temp_activation_bytes(shape: ModelShape, micro_batch: int, new_tokens: int, context: int,
                          element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """Largest transient of one layer's forward for one micro-batch.

    The layer input and output hidden states, its widest intermediate (fused QKV or the MLP's up
    projection(s)), and the attention score matrix (heads x new tokens x context, eager attention).
    """
    tokens = micro_batch * new_tokens
    widest = max(shape.q_dim + 2 * shape.kv_dim, shape.intermediate_size * (2 if shape.gated_mlp else 1))
    hidden = tokens * (2 * shape.hidden_size + widest)
    scores = tokens * shape.num_heads * context
    return (hidden + scores) * element


def logits_bytes(shape: ModelShape, micro_batch: int) -> int:
    """fp32 logits of the last position of each sequence in a micro-batch (last stage)."""
    return micro_batch * shape.vocab_size * 4


def embedding_bytes(shape: ModelShape, element: int = DEFAULT_ELEMENT_BYTES) -> int:
    return shape.embedding_params() * element


def head_bytes(shape: ModelShape, single_stage: bool = False, element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """Final norm, projection and LM head; a tied head shares the embedding when on the same stage."""
    params = shape.head_params()
    if single_stage and shape.tied_embeddings:
        params -= shape.vocab_size * shape.token_dim
    return params * element


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one stage, by part; `total` is what must fit the device."""

    weights: int
    kv_cache: int
    activations: int
    embeddings_and_head: int
    reserve: int
    workspace: int = 0  # dequantization buffer shared by the stage's quantized layers

    @property
    def total(self) -> int:
        return (
            self.weights + self.kv_cache + self.activations + self.embeddings_and_head + self.reserve + self.workspace
        )


def stage_memory(shape: ModelShape, workload: Workload, bits: list[Bits], first: bool, last: bool,
                 prefill_micro_batch: int, decode_micro_batch: int, reserve: int = DEFAULT_RESERVE_BYTES,
                 element: int = DEFAULT_ELEMENT_BYTES) -> StageMemory:
    """Memory of a stage holding `len(bits)` decoder layers at those bitwidths, unquantized values
    taking `element` bytes."""
    weights = sum(n * layer_weight_bytes(shape, b, element=element) for b, n in Counter(bits).items())
    kv = len(bits) * kv_cache_bytes_per_layer(shape, workload.batch_size, workload.max_context, element)
    longest = workload.max_prompt_length  # buffers for the longest prompt of the job
    prefill = temp_activation_bytes(shape, prefill_micro_batch, longest, longest, element)
    decode = temp_activation_bytes(shape, decode_micro_batch, 1, workload.max_context, element)
    if last:
        prefill += logits_bytes(shape, prefill_micro_batch)
        decode += logits_bytes(shape, decode_micro_batch)
    fixed = (embedding_bytes(shape, element) if first else 0) + (head_bytes(shape, first, element) if last else 0)
    return StageMemory(weights, kv, max(prefill, decode), fixed, reserve, stage_workspace_bytes(shape, bits, element))
