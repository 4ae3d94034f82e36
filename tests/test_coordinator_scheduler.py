"""The scheduler without gRPC: KV bookkeeping, phase-aware micro-batches, and a fake pipeline timeline
showing that no stage idles between its first and last micro-batch while there is work for it."""

from __future__ import annotations

import heapq
import random

import pytest

from coordinator.scheduler import FinishReason, Phase, Scheduler, Sequence, context_error
from pqmesh.errors import FailedPrecondition, InvalidArgument

EOS = 2


def fake_token(sequence: Sequence, eos_after: dict) -> int:
    """Deterministic 'model': EOS after a per-sequence number of tokens, else some token."""
    step = len(sequence.generated)
    if eos_after.get(sequence.index) == step + 1:
        return EOS
    return 3 + (sequence.index * 7 + step) % 50


def make_sequences(count, rng, max_new=(1, 9), prompt=(1, 12), job="job-a"):
    return [Sequence(job, i, tuple(rng.randrange(3, 200) for _ in range(rng.randint(*prompt))),
                     rng.randint(*max_new), frozenset({EOS})) for i in range(count)]


def simulate(scheduler: Scheduler, stages: int, eos_after: dict, cost: float = 1.0):
    """Runs the scheduler against k FIFO stages that each take ``cost`` per micro-batch.

    Returns (busy intervals per stage, finished sequences in order, every micro-batch sent, the first
    time the scheduler left the pipeline less than full, and the scheduler state at that time).
    """
    free_at = [0.0] * stages
    busy = [[] for _ in range(stages)]
    done_events, sent, finished = [], [], []
    tail = None

    def issue(now):
        nonlocal tail
        for batch in scheduler.schedule():
            sent.append(batch)
            arrival = now
            for k in range(stages):
                start = max(arrival, free_at[k])
                free_at[k] = arrival = start + cost
                busy[k].append((start, arrival))
            tokens = [fake_token(s, eos_after) for s in batch.sequences]
            heapq.heappush(done_events, (arrival, batch.id, batch.slots, tokens))
        if tail is None and scheduler.has_work() and len(scheduler.in_flight) < scheduler.max_in_flight:
            tail = (now, len(scheduler.waiting), scheduler.running)

    issue(0.0)
    while done_events:
        now, batch_id, slots, tokens = heapq.heappop(done_events)
        result = scheduler.update(batch_id, slots, tokens)
        finished.extend(result.finished)
        scheduler.released(result.release)
        issue(now)
    return busy, finished, sent, tail


@pytest.mark.parametrize("stages,prefill,decode,slots", [(3, 2, 4, 12), (4, 1, 8, 32), (2, 4, 4, 8)])
def test_pipeline_stays_full_until_the_tail(stages, prefill, decode, slots):
    rng = random.Random(stages * 100 + decode)
    sequences = make_sequences(60, rng)
    eos_after = {s.index: rng.randint(1, 8) for s in sequences if rng.random() < 0.3}
    scheduler = Scheduler(slots, 64, prefill, decode, max_in_flight=stages)
    for s in sequences:
        scheduler.add(s)
    busy, finished, sent, tail = simulate(scheduler, stages, eos_after)

    # every prompt finished exactly once, for the right reason and with the right number of tokens
    assert sorted(f.sequence.index for f in finished) == list(range(60))
    for f in finished:
        s = f.sequence
        expected_eos = eos_after.get(s.index)
        if expected_eos is not None and expected_eos <= s.max_new_tokens:
            assert (f.reason, len(s.generated), s.generated[-1]) == (FinishReason.EOS, expected_eos, EOS)
        else:
            assert (f.reason, len(s.generated)) == (FinishReason.LENGTH, s.max_new_tokens)
    assert not scheduler.has_work() and scheduler.free_slots == slots

    # phase-aware sizes; the KV cache (smaller than the job) was reused
    assert all(len(b.sequences) <= (prefill if b.phase is Phase.PREFILL else decode) for b in sent)
    assert sum(b.phase is Phase.PREFILL for b in sent) >= 60 / prefill
    assert len(sent) >= stages

    # the pipeline was never less than full before the tail, and the tail only starts once every prompt
    # is admitted and fewer sequences run than k full decode micro-batches hold
    tail_time, waiting_then, running_then = tail
    assert waiting_then == 0 and running_then < stages * decode
    for k, intervals in enumerate(busy):
        gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(intervals, intervals[1:])
                if b_start > a_end and b_start <= tail_time]
        assert gaps == [], f"stage {k} idled before the tail at {tail_time}: {gaps}"
        assert intervals[0][0] == k  # the only wait: the pipeline filling at the start


def test_slots_are_reused_only_after_release_and_lengths_follow_the_cache():
    scheduler = Scheduler(max_sequences=2, max_tokens=16, prefill_micro_batch=2, decode_micro_batch=2, max_in_flight=1)
    seqs = [Sequence("j", i, (5,) * (i + 2), max_new_tokens=2) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    (prefill,) = scheduler.schedule()
    assert (prefill.phase, prefill.slots, prefill.lengths, prefill.rows()) == (Phase.PREFILL, (0, 1), (2, 3),
                                                                               [[5, 5], [5, 5, 5]])
    assert scheduler.schedule() == []  # one in flight at most
    scheduler.update(prefill.id, (0, 1), [7, 8])
    (decode,) = scheduler.schedule()
    # decode lengths: what each slot's cache holds (prompt + generated - 1), input = the last token
    assert (decode.phase, decode.slots, decode.lengths, decode.rows()) == (Phase.DECODE, (0, 1), (2, 3), [[7], [8]])
    result = scheduler.update(decode.id, (0, 1), [9, 10])
    assert [f.sequence.generated for f in result.finished] == [[7, 9], [8, 10]] and result.release == [0, 1]
    assert scheduler.schedule() == []  # the third prompt waits until its slot is released everywhere
    scheduler.released([1])
    (third,) = scheduler.schedule()
    assert (third.slots, third.lengths) == ((1,), (4,))


def test_capacity_and_cancel_and_reset():
    scheduler = Scheduler(max_sequences=4, max_tokens=10, prefill_micro_batch=2, decode_micro_batch=2, max_in_flight=2)
    with pytest.raises(InvalidArgument, match=r"prompt 0: prompt of 8 tokens \+ max_new_tokens 3 = 11 tokens exceeds "
                                              r"the mesh's 10 tokens per sequence .* at most 7 tokens or lower "
                                              "max_new_tokens to at most 2"):
        scheduler.add(Sequence("j", 0, (1,) * 8, max_new_tokens=3))
    for i in range(6):
        scheduler.add(Sequence("a" if i % 2 else "b", i, (1, 2), max_new_tokens=5))
    first, second = scheduler.schedule()
    scheduler.update(first.id, first.slots, [3, 3])
    # cancelling "a" drops its waiting and ready sequences now and its in-flight ones when they return
    result = scheduler.cancel("a")
    assert result.cancelled == 2 and result.release == [1]
    assert [s.index for s in scheduler.waiting] == [4]
    back = scheduler.update(second.id, second.slots, [4, 4])
    assert back.cancelled == 1 and back.release == [3]
    # the mesh lost everything in flight: running sequences wait again, in order, keeping their tokens
    scheduler.released([1, 3])
    scheduler.schedule()
    slots = scheduler.reset()
    assert sorted(slots) == [0, 1, 2] and scheduler.running == 0
    assert [s.index for s in scheduler.waiting] == [0, 2, 4]
    assert [s.generated for s in scheduler.waiting] == [[3], [4], []]
    assert all(s.slot is None for s in scheduler.waiting)
    scheduler.all_released()
    assert scheduler.free_slots == 4


def test_reset_re_prefills_prompt_plus_generated_and_continues_at_the_next_position():
    scheduler = Scheduler(max_sequences=2, max_tokens=16, prefill_micro_batch=2, decode_micro_batch=2, max_in_flight=1)
    seqs = [Sequence("j", i, (5 + i,) * (i + 2), max_new_tokens=4) for i in range(2)]
    for s in seqs:
        scheduler.add(s)
    (prefill,) = scheduler.schedule()
    assert prefill.positions == (0, 0)
    scheduler.update(prefill.id, prefill.slots, [7, 8])
    (decode,) = scheduler.schedule()
    assert decode.positions == (1, 1)
    scheduler.update(decode.id, decode.slots, [9, 10])
    (lost,) = scheduler.schedule()  # the third step goes out, then the mesh loses it
    slots = scheduler.reset(blame=False)
    assert sorted(slots) == [0, 1] and all(s.attempts == 0 for s in seqs)
    scheduler.all_released()
    (again,) = scheduler.schedule()
    # the KV cache is rebuilt from prompt + generated; the token that comes back fills position 2
    assert again.phase is Phase.PREFILL and again.rows() == [[5, 5, 7, 9], [6, 6, 6, 8, 10]]
    assert again.lengths == (4, 5) and again.positions == (2, 2)
    scheduler.update(again.id, again.slots, [11, 12])
    (decode,) = scheduler.schedule()
    assert decode.lengths == (4, 5) and decode.rows() == [[11], [12]] and decode.positions == (3, 3)
    # the reply of the lost step arrives late: ignored, nothing appended twice
    assert scheduler.update(lost.id, lost.slots, [99, 98]).ignored == 2
    result = scheduler.update(decode.id, decode.slots, [13, 14])
    assert [f.sequence.generated for f in result.finished] == [[7, 9, 11, 13], [8, 10, 12, 14]]


def test_token_appends_are_keyed_by_position():
    sequence = Sequence("j", 0, (1, 2), max_new_tokens=5)
    assert sequence.accept(0, 7) and sequence.accept(1, 8)
    assert not sequence.accept(1, 8) and not sequence.accept(0, 3)  # a duplicate changes nothing
    assert sequence.generated == [7, 8]
    with pytest.raises(FailedPrecondition, match="position 3 arrived but only 2 are generated"):
        sequence.accept(3, 9)
    # the same reply twice: the second is ignored, the sequence is not doubled nor rescheduled twice
    scheduler = Scheduler(max_sequences=1, max_tokens=16, prefill_micro_batch=1, decode_micro_batch=1, max_in_flight=1)
    scheduler.add(Sequence("j", 1, (4,), max_new_tokens=3))
    (prefill,) = scheduler.schedule()
    first = scheduler.update(prefill.id, prefill.slots, [6])
    second = scheduler.update(prefill.id, prefill.slots, [6])
    assert ([s.generated for s in first.appended], second.ignored, second.appended) == ([[6]], 1, [])
    assert len(scheduler.ready) == 1


def test_only_refused_micro_batches_count_attempts_and_a_new_token_clears_them():
    scheduler = Scheduler(max_sequences=1, max_tokens=16, prefill_micro_batch=1, decode_micro_batch=1, max_in_flight=1)
    sequence = Sequence("j", 0, (4,), max_new_tokens=3)
    scheduler.add(sequence)
    for blame, expected in [(True, 1), (False, 1), (True, 2)]:
        scheduler.schedule()
        scheduler.reset(blame=blame)
        scheduler.all_released()
        assert sequence.attempts == expected
    (prefill,) = scheduler.schedule()
    scheduler.update(prefill.id, prefill.slots, [6])
    assert sequence.attempts == 0


def test_context_error_says_exactly_what_to_shorten():
    head = ("prompt of {} tokens + {} {} = {} tokens exceeds the mesh's 10 tokens per sequence "
            "(--max-tokens-per-sequence): ")
    assert context_error(7, 3, 10) is None
    assert context_error(8, 3, 10) == head.format(8, "max_new_tokens", 3, 11) + (
        "shorten the prompt to at most 7 tokens or lower max_new_tokens to at most 2")
    # the new tokens alone fill the cache: no prompt is short enough, so never "at most 0 tokens"
    assert context_error(2, 10, 10, "max_tokens") == head.format(2, "max_tokens", 10, 12) + (
        "max_tokens alone fills it, so lower max_tokens to at most 8")
    assert context_error(12, 3, 10) == head.format(12, "max_new_tokens", 3, 15) + (
        "shorten the prompt to at most 7 tokens")
    both = context_error(10, 10, 10)
    assert both.endswith("shorten the prompt to at most 9 tokens and lower max_new_tokens so that the two add up to "
                         "at most 10, or restart the coordinator with a larger --max-tokens-per-sequence")
    for n, m in [(1, 10), (9, 2), (5, 6), (10, 1), (3, 20)]:
        message = context_error(n, m, 10)
        assert "at most 0 " not in message and "at most -" not in message, message
