"""Predicted time of one job on a mesh: the coordinator's schedule replayed micro-batch by micro-batch.

The replay follows `coordinator.scheduler.Scheduler`'s policy exactly (tested against it in
`tests/test_mesh_model.py`): at most one micro-batch per stage in flight; a decode micro-batch of the
decode size whenever that many sequences are ready, else a prefill micro-batch into free KV slots
(continuous refill; grouped by length as the scheduler groups them, `pqmesh.length_groups`), else
a smaller decode micro-batch of what is ready. So prefill and decode interleave as they do on the
mesh, pipeline bubbles and the last partial waves come out of the replay, not out of a formula.

Every micro-batch passes: the coordinator -> first-stage hop, then per stage its compute (a serial
resource: one compute thread per stage, micro-batches in arrival order) and the hop after it (its own
serial resource: a stage hands the output to a sender and starts the next micro-batch); the last hop
brings token ids back. The coordinator handles one reply at a time (`MeshCost.coordinator_s` each:
store, schedule, send); a reply that finishes sequences also releases their KV slots on every stage
(a unary call per stage, queued behind that stage's compute). A job is done when its last sequence is
stored. Every sequence is assumed to run to its ``max_new_tokens`` (no early EOS): one number for the
job, or one per sequence (a job whose requests set their own, or a workload's generation histogram).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from pqmesh.errors import InvalidArgument
from pqmesh.length_groups import DEFAULT_WINDOW, take_prefill_group
from pqmesh.mesh_cost import MeshCost

TOKEN_ID_BYTES = 4


@dataclass(frozen=True)
class SimResult:
    job_s: float
    prefill_micro_batches: int
    decode_micro_batches: int
    trace: tuple[tuple[str, int], ...] = ()  # (phase, sequences) of every micro-batch, in send order
    prefill_rows: tuple[tuple[int, ...], ...] = ()  # context lengths of each prefill micro-batch's rows


class _Replay:
    def __init__(self, cost: MeshCost, prompts: Sequence[int], max_new: Sequence[int], max_sequences: int,
                 prefill_mb: int, decode_mb: int, max_in_flight: int, group_window: int) -> None:
        self.cost, self.prompts, self.max_new = cost, list(prompts), list(max_new)
        self.group_window = group_window
        self.prefill_mb, self.decode_mb, self.max_in_flight = prefill_mb, decode_mb, max_in_flight
        n = len(cost.stages)
        self.stage_free, self.hop_free = [0.0] * n, [0.0] * n
        # per phase and stage: (const, per sequence, per token, per token x key, hop latency, hop bytes/s)
        self.terms = {phase: [(m.const_s, m.per_sequence_s, m.per_token_s, m.per_token_key_s, st.hop_latency_s,
                               st.hop_bytes_per_s) for st in cost.stages for m in [getattr(st, phase)]]
                      for phase in ("prefill", "decode")}
        self.waiting, self.ready = deque(range(len(self.prompts))), deque()
        self.free_slots, self.generated = max_sequences, [0] * len(self.prompts)
        self.replies: list = []
        self.in_flight, self.ids = 0, itertools.count()
        self.counts = {"prefill": 0, "decode": 0}
        self.trace: list[tuple[str, int]] = []
        self.prefill_rows: list[tuple[int, ...]] = []  # the context length of every row of every prefill

    def _send(self, phase: str, group: list[int], at: float) -> None:
        self.counts[phase] += 1
        self.trace.append((phase, len(group)))
        contexts = [self.prompts[s] + self.generated[s] for s in group]
        if phase == "prefill":
            self.prefill_rows.append(tuple(contexts))
        new_tokens = max(contexts) if phase == "prefill" else 1  # prefill rows are left-padded
        arrive = at + self.cost.send_latency_s
        last = len(self.cost.stages) - 1
        rows, keys = len(group), max(contexts)
        tokens = rows * new_tokens  # PhaseCost.seconds and StageCost.hop_seconds, inlined (the hot loop)
        hidden, ids = tokens * self.cost.hidden_bytes_per_token, rows * TOKEN_ID_BYTES
        stage_free, hop_free = self.stage_free, self.hop_free
        for i, (const, per_seq, per_tok, per_key, hop_s, hop_bps) in enumerate(self.terms[phase]):
            done = max(arrive, stage_free[i]) + (const + per_seq * rows + per_tok * tokens + per_key * tokens * keys)
            stage_free[i] = done
            arrive = hop_free[i] = max(done, hop_free[i]) + (hop_s + (ids if i == last else hidden) / hop_bps)
        heapq.heappush(self.replies, (arrive, next(self.ids), group))
        self.in_flight += 1

    def _next(self) -> tuple[str, list[int]] | None:
        if len(self.ready) >= self.decode_mb:
            return "decode", [self.ready.popleft() for _ in range(self.decode_mb)]
        if self.waiting and self.free_slots:
            take = min(self.prefill_mb, self.free_slots, len(self.waiting))
            self.free_slots -= take
            return "prefill", take_prefill_group(self.waiting, take, self.group_window,
                                                 lambda s: self.prompts[s] + self.generated[s])
        if self.ready:
            return "decode", [self.ready.popleft() for _ in range(len(self.ready))]
        return None

    def _schedule(self, at: float) -> None:
        while self.in_flight < self.max_in_flight:
            batch = self._next()
            if batch is None:
                return
            self._send(*batch, at)

    def _release(self, slots: int, at: float) -> float:
        for i, stage in enumerate(self.cost.stages):  # one unary call per stage, behind its queued compute
            at = max(at, self.stage_free[i]) + 2 * stage.hop_latency_s
        self.free_slots += slots
        return at

    def run(self) -> float:
        now, done, end = 0.0, 0, 0.0
        self._schedule(now)
        while self.replies:
            arrive, _, group = heapq.heappop(self.replies)
            self.in_flight -= 1
            now = max(now, arrive) + self.cost.coordinator_s
            finished = 0
            for s in group:
                self.generated[s] += 1
                if self.generated[s] >= self.max_new[s]:
                    finished += 1
                else:
                    self.ready.append(s)
            if finished:
                done += finished
                end = now if done == len(self.prompts) else end
                now = self._release(finished, now)
            self._schedule(now)
        return end


def simulate(cost: MeshCost, prompt_lengths: Sequence[int], max_new_tokens: int | Sequence[int], max_sequences: int,
             prefill_micro_batch: int, decode_micro_batch: int, max_in_flight: int = 0,
             group_window: int = DEFAULT_WINDOW) -> SimResult:
    """Predicted seconds from the job's first scheduling step until its last sequence is stored.
    ``max_new_tokens``: one for every sequence, or one per prompt;
    ``max_in_flight``: micro-batches in the pipeline at once (0: one per stage, the coordinator's default);
    ``group_window``: the scheduler's prefill grouping window (1: FIFO)."""
    if not prompt_lengths or min(prompt_lengths) < 1:
        raise InvalidArgument("simulate a job of at least one prompt of at least one token")
    max_new = [max_new_tokens] * len(prompt_lengths) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(max_new) != len(prompt_lengths):
        raise InvalidArgument(f"{len(max_new)} max_new_tokens for {len(prompt_lengths)} prompts: give one per prompt")
    if min(min(max_new), max_sequences, prefill_micro_batch, decode_micro_batch, group_window) < 1:
        raise InvalidArgument("max_new_tokens, KV slots, micro-batch sizes and the grouping window must be >= 1")
    replay = _Replay(cost, prompt_lengths, max_new, max_sequences, prefill_micro_batch, decode_micro_batch,
                     max_in_flight or len(cost.stages), group_window)
    job_s = replay.run()
    return SimResult(job_s, replay.counts["prefill"], replay.counts["decode"], tuple(replay.trace),
                     tuple(replay.prefill_rows))
