"""Latency model: one decoder layer, the LM head, one link, and the pipeline formulas.

Per layer and micro-batch a device either has a fitted `LatencyModel` for (bits, phase) on this
model, or uses its roofline: max(flops / achieved compute x dequant factor, bytes / achieved
bandwidth) + a fixed overhead. Prefill moves b x s tokens through the layer (compute-bound); decode
moves b tokens and reads the whole quantized weight and the K/V of every cached position
(memory-bound: weight bytes scale with the bits). Unquantized values (16-bit weights, KV, hidden
states, the head) move `element` bytes each: the stage dtype's size (2, or 4 for float32 stages).

Pipeline (resources = stages and the links between them; a link is its own resource because a stage
hands the activation to a sender and starts the next micro-batch, so compute and transfer overlap:
the steady state is limited by the larger of the two, max, while one micro-batch's trip through the
pipeline pays both, sum):

- prefill with m micro-batches (a flow shop of identical jobs, exact):
  sum(r) + (m - 1) * max(r)
- decode: m micro-batches circulate, each new token needs the previous one back at stage 0, so one
  round (every sequence +1 token) takes max(m * max(r), sum(r)) with r including the return link:
  full pipeline when m >= stages, bubbles otherwise; exact for 1 stage (m * t). Rounds are summed over
  the generated tokens with the context growing; `decode_segments` splits them into a few segments
  evaluated at their mean context (exact while times are affine in context within a segment).
"""

from __future__ import annotations

from planner.devices import DeviceProfile
from planner.memory import DEFAULT_ELEMENT_BYTES, kv_cache_bytes_per_layer, layer_weight_bytes
from planner.model_shapes import ModelShape
from pqmesh.types import Bits, Phase

TOKEN_ID_BYTES = 4
DEFAULT_DECODE_SEGMENTS = 4


def layer_flops(shape: ModelShape, tokens: int, context: int) -> float:
    """Linear layers (2 x params per token) plus attention QK^T and AV over `context` keys."""
    return 2.0 * shape.linear_params() * tokens + 4.0 * tokens * context * shape.q_dim


def layer_seconds(profile: DeviceProfile, shape: ModelShape, bits: Bits, phase: Phase,
                  micro_batch: int, prompt_length: int, context: int, element: int = DEFAULT_ELEMENT_BYTES) -> float:
    """One decoder layer, one micro-batch. Prefill: `context` is ignored (= prompt length)."""
    new_tokens = prompt_length if phase == Phase.PREFILL else 1
    context = prompt_length if phase == Phase.PREFILL else context
    tokens = micro_batch * new_tokens
    fitted = profile.fitted(shape, bits, phase)
    if fitted is not None:
        return fitted.seconds(micro_batch, tokens, context)
    kv_tokens = tokens if phase == Phase.PREFILL else micro_batch * context  # written vs read
    moved = (layer_weight_bytes(shape, bits, element=element) + kv_cache_bytes_per_layer(shape, 1, kv_tokens, element)
             + 2 * tokens * shape.hidden_size * element)
    return profile.roofline.seconds(layer_flops(shape, tokens, context), moved, quantized=bits != Bits.B16)


def head_seconds(
    profile: DeviceProfile, shape: ModelShape, micro_batch: int, element: int = DEFAULT_ELEMENT_BYTES
) -> float:
    """Final norm + LM head on the last position of each sequence (both phases), always roofline."""
    flops = 2.0 * micro_batch * shape.vocab_size * shape.token_dim
    moved = shape.head_params() * element + micro_batch * shape.vocab_size * 4
    return profile.roofline.seconds(flops, moved, quantized=False)


def activation_bytes(shape: ModelShape, micro_batch: int, new_tokens: int, element: int = DEFAULT_ELEMENT_BYTES) -> int:
    """Hidden states one stage sends the next for a micro-batch (in the stage dtype)."""
    return micro_batch * new_tokens * shape.hidden_size * element


def return_bytes(micro_batch: int) -> int:
    """Sampled token ids the last stage sends back to stage 0 (decode)."""
    return micro_batch * TOKEN_ID_BYTES


def prefill_seconds(resources: list[float], micro_batches: int) -> float:
    """sum + (m - 1) x max over stage and link times of one micro-batch."""
    return sum(resources) + (micro_batches - 1) * max(resources)


def decode_round_seconds(resources: list[float], micro_batches: int) -> float:
    """One token for every sequence: max(m x max, sum) over stage, link and return-link times."""
    return max(micro_batches * max(resources), sum(resources))


def decode_segments(
    prompt_length: int, generation_length: int, segments: int = DEFAULT_DECODE_SEGMENTS
) -> list[tuple[int, float]]:
    """(rounds, mean context) for the decode rounds s = 1 .. gen-1 (context prompt + s).

    The first generated token comes out of prefill, so a job has gen - 1 decode rounds. Rounds are
    split into at most `segments` contiguous groups of near-equal size.
    """
    rounds = generation_length - 1
    if rounds <= 0:
        return []
    count = min(segments, rounds)
    bounds = [round(i * rounds / count) for i in range(count + 1)]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        # steps lo+1 .. hi, contexts prompt+lo+1 .. prompt+hi
        out.append((hi - lo, prompt_length + (lo + 1 + hi) / 2))
    return out
