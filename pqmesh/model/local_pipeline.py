"""Chain shards in one process: the reference driver for tests, the demo and in-process baselines.

Runs prefill in micro-batches of one size and decode in micro-batches of another, regrouping the
same sequences (by KV slot) between the phases, the way the coordinator drives the real mesh.
Greedy decoding only; sampling lives on the last stage of the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pqmesh.errors import InvalidArgument
from pqmesh.model.shard import ModelShard
from pqmesh.stage_wire import left_pad


def _batches(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


@dataclass
class LocalPipeline:
    """Shards covering all layers in order; each micro-batch flows through them one after another."""

    shards: list[ModelShard]

    def __post_init__(self) -> None:
        if not self.shards or self.shards[0].embed is None or self.shards[-1].head is None:
            raise InvalidArgument("a pipeline needs shards from the first layer through the LM head")
        for before, after in zip(self.shards, self.shards[1:]):
            if before.end != after.start:
                raise InvalidArgument(
                    f"shards [{before.start}, {before.end}) and [{after.start}, {after.end}) are not contiguous"
                )

    def prefill(
        self, slots: Sequence[int], ids: torch.Tensor, lengths: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        x = ids
        for shard in self.shards:
            if shard.head is not None:
                return shard.prefill(slots, x, lengths, all_logits=all_logits)
            x = shard.prefill(slots, x, lengths).to(self.shards[-1].device)
        raise AssertionError("unreachable: the last shard has a head")

    def decode(self, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.view(-1, 1)
        for shard in self.shards:
            x = shard.decode(slots, x)
        return x

    def release(self, slots: Sequence[int]) -> None:
        for shard in self.shards:
            shard.release(slots)

    def generate_greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        prefill_micro_batch: int,
        decode_micro_batch: int,
        pad_id: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, prompt i in KV slot i.

        A sequence ends after ``max_new_tokens`` or on a token in ``stop_ids`` (kept in its output);
        finished sequences leave the decode micro-batches, which regroup the rest.
        """
        if max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be at least 1")
        slots = list(range(len(prompts)))
        last = torch.empty(len(prompts), dtype=torch.long)
        for group in _batches(slots, prefill_micro_batch):
            ids, lengths = left_pad([prompts[i] for i in group], pad_id)
            last[group] = self.prefill(group, ids, lengths).argmax(-1).cpu()
        out = [[int(last[i])] for i in slots]
        stops = set(stop_ids)
        active = [i for i in slots if out[i][-1] not in stops]
        for _ in range(max_new_tokens - 1):
            if not active:
                break
            for group in _batches(active, decode_micro_batch):
                last[group] = self.decode(group, last[group]).argmax(-1).cpu()
            for i in active:
                out[i].append(int(last[i]))
            active = [i for i in active if out[i][-1] not in stops]
        self.release(slots)
        return out
