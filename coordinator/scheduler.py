"""Phase-aware micro-batch scheduling and KV-slot bookkeeping, as plain Python (no gRPC, no torch).

The engine step is three calls, vLLM style: `schedule()` returns the micro-batches to send now,
the engine executes them on the mesh, and `update()` takes each micro-batch's sampled tokens back.

Policy, with at most ``max_in_flight`` micro-batches in the pipeline (the number of stages):
1. a decode micro-batch of ``decode_micro_batch`` sequences whenever that many are ready (a
   micro-batch whose tokens just returned is ready again at once, so its next step goes out as
   soon as its tokens come back);
2. otherwise, while prompts wait and KV slots are free, a prefill micro-batch of up to
   ``prefill_micro_batch`` prompts into free slots (this refills a decode micro-batch that lost
   finished sequences, and keeps the pipeline full while the job is larger than the KV cache);
3. otherwise a smaller decode micro-batch of whatever is ready, rather than let a stage idle.

A sequence holds one KV slot (the same index on every stage) from its prefill until it finishes
(EOS or length) or is cancelled. A freed slot is handed back by `update` for release on every stage
and is only reused after the engine reports it released (`released`).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence as Seq

from pqmesh.errors import FailedPrecondition, InvalidArgument


class Phase(enum.IntEnum):
    """Numbers match pqmesh.common.v1.Phase."""

    PREFILL = 1
    DECODE = 2


class FinishReason(enum.IntEnum):
    """Numbers match pqmesh.coordinator.v1.FinishReason."""

    EOS = 1
    LENGTH = 2


@dataclass(eq=False)
class Sequence:
    """One prompt of a job and the tokens generated for it so far."""

    job_id: str
    index: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampling: object = None  # carried to the last stage untouched
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    order: int = 0  # admission order; requeued sequences keep their place
    attempts: int = 0  # times the mesh lost a micro-batch carrying it

    @property
    def cached_length(self) -> int:
        """Tokens its KV slot holds before the next decode step (the last sampled token is not in it)."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass(frozen=True)
class MicroBatch:
    id: int
    phase: Phase
    sequences: tuple[Sequence, ...]
    slots: tuple[int, ...]
    lengths: tuple[int, ...]  # prompt lengths (prefill) or cached lengths (decode)

    def rows(self) -> list[list[int]]:
        """Token rows for the first stage: whole prompts (prefill) or the last sampled token (decode)."""
        if self.phase is Phase.PREFILL:
            return [list(s.prompt) for s in self.sequences]
        return [[s.generated[-1]] for s in self.sequences]


@dataclass(frozen=True)
class Finished:
    sequence: Sequence
    reason: FinishReason


@dataclass
class StepResult:
    finished: list[Finished] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # release these slots on every stage, then call released()
    cancelled: int = 0  # sequences of cancelled jobs that left the pipeline


def capacity_error(index: int, prompt_len: int, max_new_tokens: int, max_tokens: int) -> str | None:
    """Why prompt ``index`` cannot run within ``max_tokens`` per sequence, or None when it fits."""
    if prompt_len + max_new_tokens <= max_tokens:
        return None
    return (f"prompt {index} has {prompt_len} tokens; with max_new_tokens {max_new_tokens} it needs "
            f"{prompt_len + max_new_tokens} tokens of KV cache but the mesh holds {max_tokens} per sequence "
            f"(--max-tokens-per-sequence): shorten it to at most {max(max_tokens - max_new_tokens, 0)} tokens "
            "or lower max_new_tokens")


class Scheduler:
    """Owns waiting prompts, ready sequences, in-flight micro-batches and the KV slot pool."""

    def __init__(self, max_sequences: int, max_tokens: int, prefill_micro_batch: int, decode_micro_batch: int,
                 max_in_flight: int) -> None:
        if min(max_sequences, max_tokens, prefill_micro_batch, decode_micro_batch, max_in_flight) < 1:
            raise InvalidArgument("KV slots, tokens per sequence, micro-batch sizes and in-flight depth must be >= 1")
        self.max_sequences, self.max_tokens = max_sequences, max_tokens
        self.prefill_size, self.decode_size = prefill_micro_batch, decode_micro_batch
        self.max_in_flight = max_in_flight
        self.waiting: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()
        self.in_flight: dict[int, MicroBatch] = {}
        self._free: list[int] = list(range(max_sequences))  # a heap: lowest slot first
        self._releasing: set[int] = set()
        self._ids = itertools.count()
        self._order = itertools.count()

    # -- admission ----------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        problem = capacity_error(sequence.index, len(sequence.prompt), sequence.max_new_tokens, self.max_tokens)
        if problem:
            raise InvalidArgument(problem)
        if not sequence.prompt or sequence.max_new_tokens < 1:
            raise InvalidArgument(f"prompt {sequence.index} needs at least one token and max_new_tokens >= 1")
        sequence.order = next(self._order)
        self.waiting.append(sequence)

    # -- schedule -------------------------------------------------------------------------------------
    def schedule(self) -> list[MicroBatch]:
        """Micro-batches to send now, filling the pipeline up to ``max_in_flight``."""
        out = []
        while len(self.in_flight) < self.max_in_flight:
            batch = self._next()
            if batch is None:
                break
            self.in_flight[batch.id] = batch
            out.append(batch)
        return out

    def _next(self) -> MicroBatch | None:
        if len(self.ready) >= self.decode_size:
            return self._decode(self.decode_size)
        if self.waiting and self._free:
            return self._prefill()
        if self.ready:
            return self._decode(len(self.ready))
        return None

    def _prefill(self) -> MicroBatch:
        group = []
        while self.waiting and self._free and len(group) < self.prefill_size:
            sequence = self.waiting.popleft()
            sequence.slot = heapq.heappop(self._free)
            group.append(sequence)
        return MicroBatch(next(self._ids), Phase.PREFILL, tuple(group), tuple(s.slot for s in group),
                          tuple(len(s.prompt) for s in group))

    def _decode(self, size: int) -> MicroBatch:
        group = tuple(self.ready.popleft() for _ in range(size))
        return MicroBatch(next(self._ids), Phase.DECODE, group, tuple(s.slot for s in group),
                          tuple(s.cached_length for s in group))

    # -- update ---------------------------------------------------------------------------------------
    def update(self, micro_batch_id: int, slots: Seq[int], token_ids: Seq[int]) -> StepResult:
        """Takes one micro-batch's sampled tokens (one per sequence, in its slot order)."""
        batch = self.in_flight.get(micro_batch_id)
        if batch is None:
            raise FailedPrecondition(f"the mesh answered micro-batch {micro_batch_id}, which is not in flight")
        if tuple(slots) != batch.slots or len(token_ids) != len(batch.slots):
            raise FailedPrecondition(f"micro-batch {micro_batch_id} went out for slots {list(batch.slots)} but came back "
                                     f"for {list(slots)} with {len(token_ids)} tokens")
        del self.in_flight[micro_batch_id]
        result = StepResult()
        for sequence, token in zip(batch.sequences, token_ids):
            if sequence.cancelled:
                result.cancelled += 1
                self._retire(sequence, result)
                continue
            sequence.generated.append(int(token))
            reason = self._finish_reason(sequence)
            if reason is None:
                self.ready.append(sequence)
            else:
                result.finished.append(Finished(sequence, reason))
                self._retire(sequence, result)
        return result

    @staticmethod
    def _finish_reason(sequence: Sequence) -> FinishReason | None:
        if sequence.generated[-1] in sequence.stop_ids:
            return FinishReason.EOS
        if len(sequence.generated) >= sequence.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _retire(self, sequence: Sequence, result: StepResult) -> None:
        self._releasing.add(sequence.slot)
        result.release.append(sequence.slot)
        sequence.slot = None

    def released(self, slots: Iterable[int]) -> None:
        """The slots are free on every stage: they may be prefilled again."""
        for slot in slots:
            if slot not in self._releasing:
                raise FailedPrecondition(f"slot {slot} was not waiting for release")
            self._releasing.discard(slot)
            heapq.heappush(self._free, slot)

    # -- cancel and recovery --------------------------------------------------------------------------
    def cancel(self, job_id: str) -> StepResult:
        """Drops a job's waiting and ready sequences now; its in-flight ones leave when they return."""
        result = StepResult()
        kept = deque(s for s in self.waiting if s.job_id != job_id)
        result.cancelled += len(self.waiting) - len(kept)
        self.waiting = kept
        ready = deque()
        for sequence in self.ready:
            if sequence.job_id == job_id:
                result.cancelled += 1
                self._retire(sequence, result)
            else:
                ready.append(sequence)
        self.ready = ready
        for batch in self.in_flight.values():
            for sequence in batch.sequences:
                if sequence.job_id == job_id:
                    sequence.cancelled = True
        return result

    def requeue(self, sequences: Iterable[Sequence]) -> None:
        """Finished sequences whose results could not be stored run again from their prompts."""
        for sequence in sequences:
            sequence.generated.clear()
            self.waiting.append(sequence)
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.order))

    def reset(self) -> list[int]:
        """The mesh lost the in-flight micro-batches: every running sequence starts again from its prompt.

        Returns the slots to release on every stage (then call `released`). Sampling is seeded by
        position, so a restarted sequence reproduces the same tokens.
        """
        lost = [s for b in self.in_flight.values() for s in b.sequences]
        for sequence in lost:
            sequence.attempts += 1
        running = list(self.ready) + lost
        self.ready.clear()
        self.in_flight.clear()
        slots = []
        for sequence in running:
            slots.append(sequence.slot)
            self._releasing.add(sequence.slot)
            sequence.slot = None
            sequence.generated.clear()
        requeued = [s for s in running if not s.cancelled]
        self.waiting = deque(sorted([*self.waiting, *requeued], key=lambda s: s.order))
        return slots

    def all_released(self) -> None:
        """Every stage freed every slot (a fresh bring-up): slots awaiting release are free again."""
        self.released(sorted(self._releasing))

    # -- state ----------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.ready) + sum(len(b.sequences) for b in self.in_flight.values())

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.in_flight)
