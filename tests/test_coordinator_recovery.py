"""The pure parts of surviving a stage failure: step deadlines, backoff with jitter, the outage record
and the health watch's failure counting."""

from __future__ import annotations

import random

from coordinator.recovery import Backoff, HealthWatch, Outage, StepClock, step_allowance
from coordinator.scheduler import MicroBatch, Phase


def batch(batch_id: int, phase: Phase = Phase.DECODE, lengths=(10, 10)) -> MicroBatch:
    return MicroBatch(batch_id, phase, (), tuple(range(len(lengths))), tuple(lengths))


def test_step_allowance_grows_with_long_prefills_only():
    assert step_allowance(batch(0, Phase.DECODE, (5000,) * 4), 10.0) == 10.0
    assert step_allowance(batch(0, Phase.PREFILL, (100,) * 4), 10.0) == 10.0
    assert step_allowance(batch(0, Phase.PREFILL, (4096,) * 3), 10.0) == 30.0


def test_the_next_reply_due_is_timed_from_its_send_or_the_previous_reply():
    clock = StepClock(step_timeout=5.0)
    assert clock.overdue(100.0) is None  # nothing in flight
    clock.sent(batch(1), 0.0)
    clock.sent(batch(2), 1.0)
    clock.sent(batch(3), 2.0)
    assert clock.overdue(4.9) is None and clock.overdue(5.1) == (1, 5.0)
    clock.answered(1, 4.0)
    # batch 2 waited behind batch 1 in the pipeline: its clock starts at batch 1's reply
    assert clock.overdue(8.9) is None and clock.overdue(9.1) == (2, 5.0)
    clock.answered(2, 9.0)
    clock.answered(2, 9.5)  # a duplicate reply moves nothing
    assert clock.overdue(13.9) is None and clock.overdue(14.1) == (3, 5.0)
    clock.clear()
    assert clock.overdue(1000.0) is None


def test_backoff_doubles_up_to_its_maximum_with_jitter():
    backoff, rng = Backoff(initial=0.5, maximum=4.0), random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0), (500, 4.0)]:
        delays = {round(backoff.delay(attempt, rng), 6) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays) and len(delays) > 1


def test_outage_deadline_and_messages():
    outage = Outage("Forward stream failed: UNAVAILABLE", started=100.0, timeout=30.0, in_flight=[("j", 0, 3)])
    assert not outage.expired(129.0) and outage.left(120.0) == 10.0 and outage.expired(130.0)
    outage.stage = "stage 1 (127.0.0.1:5001, layers [1, 3))"
    assert outage.give_up_message(131.0) == ("stage 1 (127.0.0.1:5001, layers [1, 3)) unreachable for 31 s "
                                             "(--stage-recovery-timeout 30 s)")
    outage.stage, outage.last_error = "", "stage 0 refused LoadShard: FAILED_PRECONDITION: short by 1 GiB"
    assert "did not come back within 30 s" in outage.give_up_message(131.0)
    assert outage.give_up_message(131.0).endswith("short by 1 GiB")


def test_health_watch_reports_a_stage_after_consecutive_failures_only():
    answers = {0: [None, "UNAVAILABLE", "UNAVAILABLE", None, "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE"]}

    def probe(index):
        value = answers[index].pop(0)
        if value == "boom":
            raise RuntimeError("probe broke")
        return value

    watch = HealthWatch(probe, 1, 1.0, lambda *a: None, lambda: True)
    reports = [watch.check(0) for _ in range(7)]
    assert reports[:6] == [None] * 6  # a success in between starts the count again
    assert reports[6] == "3 health checks in a row failed: UNAVAILABLE"
    answers[0] = ["boom"] * 3  # a report starts the count again: three more failures for the next one
    broke = "3 health checks in a row failed: RuntimeError: probe broke"
    assert [watch.check(0) for _ in range(3)] == [None, None, broke]


def test_health_rounds_report_only_while_active_and_an_idle_round_forgets_the_failures():
    reported, active = [], [True]
    watch = HealthWatch(lambda index: "UNAVAILABLE" if index == 1 else None, 2, 1.0,
                        lambda index, why: reported.append(index), lambda: active[0])
    watch.tick()
    watch.tick()
    active[0] = False
    watch.tick()  # idle (no job running): counts start over
    active[0] = True
    watch.tick()
    watch.tick()
    assert reported == []
    watch.tick()
    assert reported == [1]
