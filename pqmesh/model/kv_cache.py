"""Static KV cache addressed by slot, and the attention step that reads and writes it.

The cache is allocated once for (layers, slots, kv heads, max tokens, head dim). A *slot* holds one
sequence; its tokens sit densely at positions 0..length-1 whatever padding the micro-batch that
prefilled it had, so decode micro-batches can mix slots prefilled in different micro-batches.

`AttentionStep` is built once per forward call (prefill or decode) and shared by every layer of the
shard: it knows the token positions, which cache cells to write and the attention mask. Family
adapters call `attend` with their projected q/k/v and get the attention output back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from pqmesh.errors import FailedPrecondition, InvalidArgument, OutOfRange


class StaticKVCache:
    """Keys and values for ``num_layers`` layers and ``num_slots`` sequences of ``max_len`` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots

    @staticmethod
    def bytes_needed(
        num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_slots * kv_heads * max_len * head_dim * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def slots_used(self) -> int:
        return sum(1 for n in self.lengths if n)

    def check_slots(self, slots: Sequence[int]) -> None:
        if not slots:
            raise InvalidArgument("a micro-batch needs at least one slot")
        if len(set(slots)) != len(slots):
            raise InvalidArgument(f"slots repeat within one micro-batch: {list(slots)}")
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise InvalidArgument(
                f"slots {bad} are outside this shard's KV cache of {self.num_slots} slots (0..{self.num_slots - 1})"
            )

    def release(self, slots: Sequence[int]) -> int:
        """Frees slots; returns how many held a sequence. Contents are overwritten by the next prefill."""
        self.check_slots(slots)
        held = sum(1 for s in slots if self.lengths[s])
        for s in slots:
            self.lengths[s] = 0
        return held


@dataclass
class AttentionStep:
    """Everything a layer needs to attend for one micro-batch in one phase."""

    cache: StaticKVCache
    prefill: bool
    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long: position of each query token within its sequence
    key_positions: torch.Tensor  # [B, S] long: position of each key attended to
    key_valid: torch.Tensor  # [B, S] bool: key holds a real token of the sequence
    mask: torch.Tensor  # [B, 1, T, S] bool: query may attend to key
    write_batch: torch.Tensor  # [N] rows of the micro-batch whose k/v are stored
    write_time: torch.Tensor  # [N] their time index within the micro-batch
    write_pos: torch.Tensor  # [N] their position in the slot
    new_lengths: list[int]
    _additive: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_prefill(
        cls, cache: StaticKVCache, slots: Sequence[int], lengths: Sequence[int], width: int, device
    ) -> "AttentionStep":
        """Left-padded prompts: row b holds ``lengths[b]`` real tokens at the right end of ``width``."""
        cache.check_slots(slots)
        if len(lengths) != len(slots):
            raise InvalidArgument(f"{len(slots)} slots but {len(lengths)} prompt lengths")
        for s, n in zip(slots, lengths):
            if not 1 <= n <= width:
                raise InvalidArgument(f"prompt length {n} for slot {s} must be within 1..{width} (the padded width)")
            if n > cache.max_len:
                raise OutOfRange(f"prompt of {n} tokens for slot {s} exceeds the KV capacity of {cache.max_len} tokens")
            if cache.lengths[s]:
                raise FailedPrecondition(
                    f"slot {s} still holds a sequence of {cache.lengths[s]} tokens; release it first"
                )
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=device)
        pad = width - torch.tensor(list(lengths), dtype=torch.long, device=device)  # [B]
        t = torch.arange(width, device=device)
        real = t[None, :] >= pad[:, None]  # [B, T]
        positions = (t[None, :] - pad[:, None]).clamp(min=0)
        causal = t[None, :, None] >= t[None, None, :]  # [1, T, S]
        diagonal = torch.eye(width, dtype=torch.bool, device=device)[None]
        mask = (causal & real[:, None, :]) | diagonal  # padded queries see themselves, never NaN
        write_batch, write_time = real.nonzero(as_tuple=True)
        return cls(
            cache=cache,
            prefill=True,
            slots=slot_t,
            positions=positions,
            key_positions=positions,
            key_valid=real,
            mask=mask[:, None],
            write_batch=write_batch,
            write_time=write_time,
            write_pos=positions[write_batch, write_time],
            new_lengths=list(lengths),
        )

    @classmethod
    def for_decode(cls, cache: StaticKVCache, slots: Sequence[int], device) -> "AttentionStep":
        """One new token per slot, appended after the slot's current length."""
        cache.check_slots(slots)
        current = [cache.lengths[s] for s in slots]
        for s, n in zip(slots, current):
            if n == 0:
                raise FailedPrecondition(f"slot {s} holds no sequence; prefill it before decoding")
            if n >= cache.max_len:
                raise OutOfRange(f"slot {s} is full: {n} tokens, KV capacity {cache.max_len} tokens per sequence")
        batch = len(slots)
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=device)
        pos = torch.tensor(current, dtype=torch.long, device=device)
        span = max(current) + 1
        keys = torch.arange(span, device=device)
        key_valid = keys[None, :] <= pos[:, None]  # [B, S]
        return cls(
            cache=cache,
            prefill=False,
            slots=slot_t,
            positions=pos[:, None],
            key_positions=keys[None, :].expand(batch, span),
            key_valid=key_valid,
            mask=key_valid[:, None, None, :],
            write_batch=torch.arange(batch, device=device),
            write_time=torch.zeros(batch, dtype=torch.long, device=device),
            write_pos=pos,
            new_lengths=[n + 1 for n in current],
        )

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The boolean mask as 0 / -inf in ``dtype``, built once per step and shared by all layers."""
        cached = self._additive.get(dtype)
        if cached is None:
            cached = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            cached.masked_fill_(~self.mask, float("-inf"))
            self._additive[dtype] = cached
        return cached

    def window_mask(self, window: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask of sliding-window attention: as `additive_mask`, and a query at position
        ``p`` sees keys at positions ``> p - window`` only (Hugging Face's ``sliding_window_overlay``,
        counted in sequence positions, so padding never takes a place in the window)."""
        cached = self._additive.get((dtype, window))
        if cached is None:
            query = self.positions[:, None, :, None]
            near = query - self.key_positions[:, None, None, :] < window  # [B, 1, T, S]
            mask = self.mask & near
            if self.prefill:  # padded queries (position 0) still see themselves, never NaN
                mask = mask | torch.eye(self.mask.shape[-1], dtype=torch.bool, device=mask.device)
            cached = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            cached.masked_fill_(~mask, float("-inf"))
            self._additive[(dtype, window)] = cached
        return cached

    def commit(self) -> None:
        """Records the new sequence lengths once every layer of the shard has run."""
        for s, n in zip(self.slots.tolist(), self.new_lengths):
            self.cache.lengths[s] = n

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Stores k/v of this step in ``layer``'s cache and attends.

        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; bias: optional additive [B, Hq, 1|T, S] (ALiBi);
        window: sliding-window attention over the last ``window`` positions (`window_mask`).
        Returns [B, T, Hq * D].
        """
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        rows, times = self.write_batch, self.write_time
        cells = self.slots[rows]
        k_cache[cells, :, self.write_pos] = k[rows, :, times]
        v_cache[cells, :, self.write_pos] = v[rows, :, times]
        if not self.prefill:  # prefill attends to its own fresh k/v; decode reads the cache
            span = self.key_positions.shape[1]
            k = k_cache[:, :, :span].index_select(0, self.slots)
            v = v_cache[:, :, :span].index_select(0, self.slots)
        attn_mask = self.additive_mask(q.dtype) if window is None else self.window_mask(window, q.dtype)
        if bias is not None:
            attn_mask = attn_mask + bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        batch, heads, width, dim = out.shape
        return out.transpose(1, 2).reshape(batch, width, heads * dim)
