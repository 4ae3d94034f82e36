"""Surviving stage failures: the parts of detection and recovery that need no gRPC.

- `StepClock` — the micro-batch deadline. Stages run micro-batches in arrival order, so replies come
  back in the order they were sent and the oldest one in flight is the next reply due. Its clock
  starts when it was sent or when the previous reply arrived, whichever is later, and it may take
  `step_allowance`: ``--step-timeout`` for a decode step, proportionally more for a prefill of more
  than `PREFILL_TOKENS_PER_TIMEOUT` tokens. A reply that does not come in time means a hung stage.
- `HealthWatch` — a thread that checks every stage's gRPC health service every ``--health-interval``
  and reports a stage that failed `HEALTH_FAILURES` checks in a row (a dead stage between micro-batches).
- `Backoff` — exponential backoff with jitter between reconnect attempts.
- `Outage` — one period without a working mesh: why it began, what was in flight, which stage was
  last found unreachable, and when ``--stage-recovery-timeout`` runs out.

The engine (`coordinator.engine`) pauses the pipeline on any of these, brings the mesh up again with
backoff, re-prefills every unfinished sequence from prompt + generated tokens, and gives up after the
recovery timeout.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import structlog

from coordinator.scheduler import MicroBatch, Phase

log = structlog.get_logger(__name__)

PREFILL_TOKENS_PER_TIMEOUT = 4096  # a prefill micro-batch of more tokens gets a proportionally longer deadline
HEALTH_FAILURES = 3  # failed health checks in a row that mark a stage down


def step_allowance(batch: MicroBatch, step_timeout: float) -> float:
    """Seconds the reply to ``batch`` may take once it is the next one due."""
    if batch.phase is Phase.PREFILL:
        return step_timeout * max(1.0, sum(batch.lengths) / PREFILL_TOKENS_PER_TIMEOUT)
    return step_timeout


class StepClock:
    """Deadlines of the micro-batches in flight (see the module docstring)."""

    def __init__(self, step_timeout: float) -> None:
        self.step_timeout = step_timeout
        self._due: dict[int, tuple[float, float]] = {}  # micro-batch id -> (sent at, allowance), in send order
        self._last_reply = 0.0

    def sent(self, batch: MicroBatch, now: float) -> None:
        self._due[batch.id] = (now, step_allowance(batch, self.step_timeout))

    def answered(self, micro_batch_id: int, now: float) -> None:
        if self._due.pop(micro_batch_id, None) is not None:
            self._last_reply = now

    def clear(self) -> None:
        self._due.clear()

    def overdue(self, now: float) -> tuple[int, float] | None:
        """(micro-batch id, allowance) of the next reply due when it is late, else None."""
        if not self._due:
            return None
        batch_id, (sent, allowance) = next(iter(self._due.items()))
        return (batch_id, allowance) if now - max(sent, self._last_reply) > allowance else None


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``initial * multiplier**n`` capped at ``maximum``,
    drawn uniformly from its upper half (jitter, so coordinators sharing stages do not retry in step)."""

    initial: float = 0.25
    maximum: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        return rng.uniform(cap / 2, cap)


@dataclass
class Outage:
    """From the first failure until the first reply after the mesh is back (or until it is given up)."""

    reason: str
    started: float
    timeout: float
    in_flight: list[tuple[str, int, int]]  # (job id, prompt index, tokens generated) of the lost micro-batches
    attempts: int = 0  # bring-up attempts so far
    stage: str = ""  # the stage last found unreachable ("stage 1 (HOST:PORT, layers [a, b))")
    last_error: str = ""
    given_up: bool = False
    resumed: int = 0  # unfinished sequences re-prefilled when the mesh came back
    resumed_tokens: int = 0  # generated tokens they carried into the re-prefill
    seconds: float = 0.0  # how long the pipeline was paused

    def expired(self, now: float) -> bool:
        return now - self.started >= self.timeout

    def left(self, now: float) -> float:
        return max(0.0, self.timeout - (now - self.started))

    def give_up_message(self, now: float) -> str:
        """Why the jobs fail: the stage and how long it was gone, or the last refusal."""
        if self.stage:
            return (f"{self.stage} unreachable for {now - self.started:.0f} s "
                    f"(--stage-recovery-timeout {self.timeout:g} s)")
        return f"the mesh did not come back within {self.timeout:g} s (--stage-recovery-timeout): {self.last_error}"


@dataclass
class HealthWatch:
    """Calls ``probe(i)`` (None when stage i is healthy, else why not) for every stage every ``interval``
    seconds while ``active()``; after `HEALTH_FAILURES` failures in a row calls ``report(i, why)``."""

    probe: Callable[[int], str | None]
    stages: int
    interval: float
    report: Callable[[int, str], None]
    active: Callable[[], bool]
    failures: int = HEALTH_FAILURES
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="coordinator-health", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        counts = [0] * self.stages
        while not self._stop.wait(self.interval):
            if not self.active():
                counts = [0] * self.stages
                continue
            for index in range(self.stages):
                problem = self.check(index, counts)
                if problem is not None:
                    self.report(index, problem)

    def check(self, index: int, counts: list[int]) -> str | None:
        """One probe of stage ``index``; the reason once it has failed ``failures`` times in a row."""
        try:
            problem = self.probe(index)
        except Exception as err:  # noqa: BLE001 - a probe that breaks counts as a failed check
            problem = f"{type(err).__name__}: {err}"
        counts[index] = counts[index] + 1 if problem is not None else 0
        if counts[index] < self.failures:
            return None
        counts[index] = 0
        log.warning("stage_unhealthy", stage=index, checks=self.failures, reason=problem)
        return f"{self.failures} health checks in a row failed: {problem}"
