"""Memory model: bytes a pipeline stage needs on its device.

A stage needs: its decoder layers' weights at their bitwidths (`layer_weight_bytes`), the KV cache
of every sequence of the job for each of its layers (all sequences pass through every stage, and
the cache is allocated for prompt + generation tokens up front), the largest temporary activation of
either phase for its micro-batch size, the embeddings (first stage) or final norm + LM head (last
stage) at 16 bits, and a fixed framework reserve (CUDA context, allocator slack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.bits import Bits
from planner.cluster import Workload
from planner.model_shapes import ModelShape

GIB = 1 << 30
DTYPE_BYTES = 2  # activations, KV cache, embeddings, norms and biases are 16-bit
GROUP_SIZE = 128
DEFAULT_RESERVE_BYTES = 1 * GIB


def linear_weight_bytes(in_features: int, out_features: int, bits: Bits, group_size: int = GROUP_SIZE) -> int:
    """Bytes of one linear weight matrix at `bits`, weight-only group-wise quantization.

    16 bits: 2 bytes per weight. Below 16: the packed weights (in x out x bits / 8 bytes) plus, for
    each group of `group_size` consecutive input weights of an output row, one 16-bit scale and one
    16-bit zero point (4 bytes per group).
    """
    params = in_features * out_features
    if bits == Bits.B16:
        return params * DTYPE_BYTES
    groups = math.ceil(in_features / group_size) * out_features
    return math.ceil(params * int(bits) / 8) + groups * 2 * DTYPE_BYTES


def layer_weight_bytes(shape: ModelShape, bits: Bits, group_size: int = GROUP_SIZE) -> int:
    """One decoder layer: its quantized linear matrices plus its 16-bit norms and biases."""
    linear = sum(linear_weight_bytes(i, o, bits, group_size) for i, o in shape.linear_shapes())
    return linear + shape.layer_fp16_params() * DTYPE_BYTES


def kv_cache_bytes_per_layer(shape: ModelShape, sequences: int, tokens: int) -> int:
    """K and V of `sequences` x `tokens` positions for one layer: 2 x seq x tokens x kv_dim x 2 bytes."""
    return 2 * sequences * tokens * shape.kv_dim * DTYPE_BYTES


def temp_activation_bytes(shape: ModelShape, micro_batch: int, new_tokens: int, context: int) -> int:
    """Largest transient of one layer's forward for one micro-batch.

    The layer input and output hidden states, its widest intermediate (fused QKV or the MLP's up
    projection(s)), and the attention score matrix (heads x new tokens x context, eager attention).
    """
    tokens = micro_batch * new_tokens
    widest = max(shape.q_dim + 2 * shape.kv_dim, shape.intermediate_size * (2 if shape.gated_mlp else 1))
    hidden = tokens * (2 * shape.hidden_size + widest)
    scores = tokens * shape.num_heads * context
    return (hidden + scores) * DTYPE_BYTES


def logits_bytes(shape: ModelShape, micro_batch: int) -> int:
    """fp32 logits of the last position of each sequence in a micro-batch (last stage)."""
    return micro_batch * shape.vocab_size * 4


def embedding_bytes(shape: ModelShape) -> int:
    return shape.embedding_params() * DTYPE_BYTES


def head_bytes(shape: ModelShape, single_stage: bool = False) -> int:
    """Final norm, projection and LM head; a tied head shares the embedding when on the same stage."""
    params = shape.head_params()
    if single_stage and shape.tied_embeddings:
        params -= shape.vocab_size * shape.token_dim
    return params * DTYPE_BYTES


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one stage, by part; `total` is what must fit the device."""

    weights: int
    kv_cache: int
    activations: int
    embeddings_and_head: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.embeddings_and_head + self.reserve


def stage_memory(shape: ModelShape, workload: Workload, bits: list[Bits], first: bool, last: bool,
                 prefill_micro_batch: int, decode_micro_batch: int, reserve: int = DEFAULT_RESERVE_BYTES) -> StageMemory:
    """Memory of a stage holding `len(bits)` decoder layers at those bitwidths."""
    weights = sum(layer_weight_bytes(shape, b) for b in bits)
    kv = len(bits) * kv_cache_bytes_per_layer(shape, workload.batch_size, workload.max_context)
    prefill = temp_activation_bytes(shape, prefill_micro_batch, workload.prompt_length, workload.prompt_length)
    decode = temp_activation_bytes(shape, decode_micro_batch, 1, workload.max_context)
    if last:
        prefill += logits_bytes(shape, prefill_micro_batch)
        decode += logits_bytes(shape, decode_micro_batch)
    fixed = (embedding_bytes(shape) if first else 0) + (head_bytes(shape, single_stage=first) if last else 0)
    return StageMemory(weights, kv, max(prefill, decode), fixed, reserve)
