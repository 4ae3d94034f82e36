"""Phase-aware micro-batch scheduling and KV-slot bookkeeping, as plain Python (no gRPC, no torch).

The engine step is three calls, vLLM style: `schedule()` returns the micro-batches to send now,
the engine executes them on the mesh, and `update()` takes each micro-batch's sampled tokens back.

Policy, with at most ``max_in_flight`` micro-batches in the pipeline (the number of stages):
1. a decode micro-batch of ``decode_micro_batch`` sequences whenever that many are ready (a
   micro-batch whose tokens just returned is ready again at once, so its next step goes out as
   soon as its tokens come back);
2. otherwise, while prompts wait and KV slots are free, a prefill micro-batch of up to
   ``prefill_micro_batch`` prompts into free slots (this refills a decode micro-batch that lost
   finished sequences, and keeps the pipeline full while the job is larger than the KV cache): the
   oldest waiting prompt and, among the next ``group_window`` x that many, those nearest its length
   (`pqmesh.length_groups`: rows are left-padded to the longest, so this cuts padding);
3. otherwise a smaller decode micro-batch of whatever is ready, rather than let a stage idle.

A sequence holds one KV slot (the same index on every stage) from its prefill until it finishes
(EOS, a stop string or length) or is cancelled. A freed slot is handed back by `update` for release on every stage
and is only reused after the engine reports it released (`released`).

Tokens are appended by position: every micro-batch records, per sequence, the index in ``generated``
its token fills, and `update` appends a token only at that position. A reply that comes twice (or
late, for a micro-batch the mesh already lost) is ignored, so no token is ever appended twice. After
the mesh loses its KV caches (`reset`), a running sequence keeps what it generated and is prefilled
again from prompt + generated tokens, which rebuilds its cache and samples its next position.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable
from typing import Sequence as Seq

from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.length_groups import DEFAULT_WINDOW, take_prefill_group
from pqmesh.types import Phase


class FinishReason(enum.IntEnum):
    """Numbers match pqmesh.coordinator.v1.FinishReason."""

    EOS = 1
    LENGTH = 2
    STOP = 3  # a stop string


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
    attempts: int = 0  # micro-batches carrying it that a stage refused in a row (reset by every new token)
    stop_check: object = None  # callable(generated) -> True once a stop string was generated
    meta: object = None  # carried to the result untouched

    @property
    def cached_length(self) -> int:
        """Tokens its KV slot holds before the next decode step (the last sampled token is not in it)."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def context(self) -> tuple[int, ...]:
        """What a prefill feeds: the prompt and every token generated so far (after a mesh recovery)."""
        return self.prompt + tuple(self.generated)

    def accept(self, position: int, token: int) -> bool:
        """Appends ``token`` as generated token number ``position``; False (and nothing appended) when that
        position is filled already: a duplicate or late reply."""
        if position < len(self.generated):
            return False
        if position > len(self.generated):
            raise FailedPrecondition(f"prompt {self.index} of job {self.job_id}: a token for position {position} "
                                     f"arrived but only {len(self.generated)} are generated")
        self.generated.append(int(token))
        self.attempts = 0
        return True


@dataclass(frozen=True)
class MicroBatch:
    id: int
    phase: Phase
    sequences: tuple[Sequence, ...]
    slots: tuple[int, ...]
    lengths: tuple[int, ...]  # prefilled lengths (prompt + generated) or cached lengths (decode)
    positions: tuple[int, ...] = ()  # per sequence: the index in ``generated`` this step's token fills

    def rows(self) -> list[list[int]]:
        """Token rows for the first stage: prompt + generated so far (prefill) or the last sampled token (decode)."""
        if self.phase is Phase.PREFILL:
            return [list(s.context) for s in self.sequences]
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
    appended: list[Sequence] = field(default_factory=list)  # sequences that got a new token (finished ones too)
    ignored: int = 0  # tokens of a duplicate or late reply, not appended


def context_error(prompt_len: int, max_new_tokens: int, max_tokens: int, param: str = "max_new_tokens") -> str | None:
    """Why a prompt of ``prompt_len`` tokens asking for ``max_new_tokens`` (named ``param`` to the user)
    cannot run within ``max_tokens`` per sequence, and exactly what to shorten; None when it fits."""
    need = prompt_len + max_new_tokens
    if need <= max_tokens:
        return None
    head = (f"prompt of {prompt_len} tokens + {param} {max_new_tokens} = {need} tokens exceeds the mesh's "
            f"{max_tokens} tokens per sequence (--max-tokens-per-sequence)")
    lower = f"lower {param} to at most {max_tokens - prompt_len}"
    if max_new_tokens < max_tokens:
        shorten = f"shorten the prompt to at most {max_tokens - max_new_tokens} tokens"
        return f"{head}: {shorten} or {lower}" if prompt_len < max_tokens else f"{head}: {shorten}"
    if prompt_len < max_tokens:  # the new tokens alone fill the cache: no prompt length would fit
        return f"{head}: {param} alone fills it, so {lower}"
    return (f"{head}: shorten the prompt to at most {max_tokens - 1} tokens and lower {param} so that the two add "
            f"up to at most {max_tokens}, or restart the coordinator with a larger --max-tokens-per-sequence")


def capacity_error(index: int, prompt_len: int, max_new_tokens: int, max_tokens: int) -> str | None:
    """Why prompt ``index`` cannot run within ``max_tokens`` per sequence, or None when it fits."""
    problem = context_error(prompt_len, max_new_tokens, max_tokens)
    return None if problem is None else f"prompt {index}: {problem}"


class Scheduler:
    """Owns waiting prompts, ready sequences, in-flight micro-batches and the KV slot pool."""

    def __init__(self, max_sequences: int, max_tokens: int, prefill_micro_batch: int, decode_micro_batch: int,
                 max_in_flight: int, group_window: int = DEFAULT_WINDOW) -> None:
        if min(max_sequences, max_tokens, prefill_micro_batch, decode_micro_batch, max_in_flight, group_window) < 1:
            raise InvalidArgument("KV slots, tokens per sequence, micro-batch sizes, in-flight depth and the "
                                  "prefill grouping window must be >= 1")
        self.group_window = group_window  # prefill candidates per place in the micro-batch (1: FIFO)
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

    def adopt(self, prefill_micro_batch: int, decode_micro_batch: int, max_in_flight: int) -> None:
        """A new plan's micro-batch sizes and pipeline depth (after a re-plan; nothing is in flight)."""
        if min(prefill_micro_batch, decode_micro_batch, max_in_flight) < 1:
            raise InvalidArgument("micro-batch sizes and in-flight depth must be >= 1")
        self.prefill_size, self.decode_size, self.max_in_flight = prefill_micro_batch, decode_micro_batch, max_in_flight

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
        take = min(self.prefill_size, len(self._free), len(self.waiting))
        group = take_prefill_group(self.waiting, take, self.group_window, lambda s: len(s.context))
        for sequence in group:
            sequence.slot = heapq.heappop(self._free)
        return MicroBatch(next(self._ids), Phase.PREFILL, tuple(group), tuple(s.slot for s in group),
                          tuple(len(s.context) for s in group), tuple(len(s.generated) for s in group))

    def _decode(self, size: int) -> MicroBatch:
        group = tuple(self.ready.popleft() for _ in range(size))
        return MicroBatch(next(self._ids), Phase.DECODE, group, tuple(s.slot for s in group),
                          tuple(s.cached_length for s in group), tuple(len(s.generated) for s in group))

    # -- update ---------------------------------------------------------------------------------------
    def update(self, micro_batch_id: int, slots: Seq[int], token_ids: Seq[int]) -> StepResult:
        """Takes one micro-batch's sampled tokens (one per sequence, in its slot order).

        A micro-batch that is not in flight (answered already, or lost in a reset) is ignored: its
        tokens are counted in ``ignored`` and nothing changes."""
        batch = self.in_flight.get(micro_batch_id)
        if batch is None:
            return StepResult(ignored=len(token_ids))
        if tuple(slots) != batch.slots or len(token_ids) != len(batch.slots):
            raise FailedPrecondition(
                f"micro-batch {micro_batch_id} went out for slots {list(batch.slots)} but came back "
                f"for {list(slots)} with {len(token_ids)} tokens"
            )
        del self.in_flight[micro_batch_id]
        result = StepResult()
        for sequence, position, token in zip(batch.sequences, batch.positions, token_ids):
            if sequence.cancelled:
                result.cancelled += 1
                self._retire(sequence, result)
                continue
            if not sequence.accept(position, token):
                result.ignored += 1
                self.ready.append(sequence)
                continue
            result.appended.append(sequence)
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
        if sequence.stop_check is not None and sequence.stop_check(sequence.generated):
            return FinishReason.STOP
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

    def reset(self, blame: bool = True) -> list[int]:
        """The mesh lost its KV caches and the in-flight micro-batches: every running sequence waits to be
        prefilled again from prompt + the tokens it generated so far (nothing generated is lost).

        With ``blame`` (a stage refused a micro-batch, rather than went away) the sequences in flight
        count an attempt. Returns the slots to release on every stage (then call `released`). Sampling
        is seeded by position, so the next token is the one the lost step would have sampled.
        """
        lost = [s for b in self.in_flight.values() for s in b.sequences]
        if blame:
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
