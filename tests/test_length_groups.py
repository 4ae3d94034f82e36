"""Prefill micro-batches grouped by length: the oldest prompt always goes, the group wastes the fewest
padded tokens any group with it could (checked against every combination), nothing starves, window 1
is FIFO, and on a spread of real-job lengths padding falls against FIFO order."""

from __future__ import annotations

import itertools
import random

import pytest

from coordinator.scheduler import Scheduler, Sequence
from pqmesh.length_groups import padded_tokens, prefill_group


def _padding(lengths, picked):
    return len(picked) * max(lengths[i] for i in picked) - sum(lengths[i] for i in picked)


@pytest.mark.parametrize("seed", range(40))
def test_group_holds_the_oldest_and_is_the_least_padded_of_all_groups_that_do(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(1, 200)]) for _ in range(rng.randint(2, 10))]
    size = rng.randint(1, len(lengths))
    picked = prefill_group(lengths, size)
    assert picked[0] == 0 and picked == sorted(set(picked)) and len(picked) == size
    best = min(_padding(lengths, (0, *rest)) for rest in itertools.combinations(range(1, len(lengths)), size - 1))
    assert _padding(lengths, picked) == best


def test_ties_go_to_the_shorter_then_the_older_prompts():
    assert prefill_group([5, 5, 9, 9, 5], 2) == [0, 1]       # no padding either way: the older
    assert prefill_group([5, 7, 3], 2) == [0, 2]              # padding 2 either way: the shorter group
    assert prefill_group([5, 1, 2, 3], 4) == [0, 1, 2, 3]     # the whole window


def _prefill_rows(lengths, size, window):
    scheduler = Scheduler(max_sequences=size, max_tokens=max(lengths) + 1, prefill_micro_batch=size,
                          decode_micro_batch=size, max_in_flight=1, group_window=window)
    for i, n in enumerate(lengths):
        scheduler.add(Sequence("job", i, tuple([1] * n), max_new_tokens=1))
    order, rows = [], []
    while scheduler.has_work():
        (batch,) = scheduler.schedule()
        order.append([s.index for s in batch.sequences])
        rows.append(batch.lengths)
        result = scheduler.update(batch.id, batch.slots, [7] * len(batch.slots))
        scheduler.released(result.release)
    return order, rows


def test_window_one_is_first_come_first_served():
    order, _ = _prefill_rows([30, 2, 17, 2, 30, 5, 9], size=3, window=1)
    assert order == [[0, 1, 2], [3, 4, 5], [6]]


def test_no_prompt_waits_past_its_queue_position_and_padding_falls_on_a_spread_of_lengths():
    rng = random.Random(7)
    lengths = [max(1, min(2000, int(rng.lognormvariate(4.5, 1.0)))) for _ in range(512)]  # ShareGPT-like spread
    fifo_order, fifo_rows = _prefill_rows(lengths, size=8, window=1)
    order, rows = _prefill_rows(lengths, size=8, window=8)
    assert sorted(i for group in order for i in group) == list(range(len(lengths)))  # each prompt once
    done_at = {i: n for n, group in enumerate(order) for i in group}
    waiting = list(range(len(lengths)))
    for n, group in enumerate(order):  # the oldest waiting prompt is in every micro-batch
        assert waiting[0] in group
        waiting = [i for i in waiting if i not in group]
    assert all(done_at[i] <= i for i in done_at)  # queue position p: prefilled within p + 1 micro-batches
    real, fifo_padded = padded_tokens(fifo_rows)
    _, grouped_padded = padded_tokens(rows)
    assert grouped_padded - real < 0.5 * (fifo_padded - real)  # measured: a fifth of FIFO's padding
