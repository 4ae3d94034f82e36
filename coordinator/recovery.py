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

- `OutageHandling` — the engine's outage state machine (a mixin of `coordinator.engine.Engine`, run on
  the engine thread): on any of these it pauses the pipeline, brings the mesh up again with backoff,
  re-prefills every unfinished sequence from prompt + generated tokens, and gives up after the recovery
  timeout (failing the jobs, keeping their results, refusing new jobs until the mesh is back).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import grpc
import structlog

from coordinator.mesh import Mesh, StageUnavailable
from coordinator.periodic import start_periodic
from coordinator.scheduler import MicroBatch
from pqmesh.errors import PqmeshError
from pqmesh.types import Phase

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
    stage_index: int | None = None  # its place in the plan, while one stage is to blame
    blamed_since: float = 0.0  # when bring-up attempts started to find that same stage unreachable
    replans: int = 0  # plans switched to during this outage
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
    _counts: list[int] = field(init=False)  # failed checks in a row, per stage

    def __post_init__(self) -> None:
        self._counts = [0] * self.stages

    def start(self) -> None:
        start_periodic("coordinator-health", self.interval, self.tick, self._stop)

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        """One round: probes every stage while ``active()`` (else forgets the failure counts)."""
        if not self.active():
            self._counts = [0] * self.stages
            return
        for index in range(self.stages):
            problem = self.check(index)
            if problem is not None:
                self.report(index, problem)

    def check(self, index: int) -> str | None:
        """One probe of stage ``index``; the reason once it has failed ``failures`` times in a row."""
        try:
            problem = self.probe(index)
        except Exception as err:  # noqa: BLE001 - a probe that breaks counts as a failed check
            problem = f"{type(err).__name__}: {err}"
        self._counts[index] = self._counts[index] + 1 if problem is not None else 0
        if self._counts[index] < self.failures:
            return None
        self._counts[index] = 0
        log.warning("stage_unhealthy", stage=index, checks=self.failures, reason=problem)
        return f"{self.failures} health checks in a row failed: {problem}"


class OutageHandling:
    """The outage state machine, mixed into `coordinator.engine.Engine` and run on its thread.

    Uses the engine's ``store``, ``mesh``, ``scheduler``, ``board``, ``settings``, ``metrics``, its event
    queue ``_events``, step clock ``_clock``, Forward stream ``_link`` / ``_generation``, the pipeline flag
    ``_mesh_ok``, and its ``_fail`` and ``_open_stream``; owns the outage fields set by `_init_recovery`.
    """

    def _init_recovery(self, replanning=None) -> None:
        self.replanning = replanning  # coordinator.replan.Replanning, or None: never re-plan
        self._outage: Outage | None = None
        self._down: str | None = None  # set when the mesh was given up on: why new jobs are refused
        self._retry_token = 0
        self._rng = random.Random()
        self.recoveries: list[Outage] = []  # outages the mesh came back from, oldest first

    def _recover(self, reason: str, blame: bool = True) -> None:
        """Pauses the pipeline (keeping every generated token) and tries to bring the mesh up again."""
        self._pause(reason, blame)
        self._try_bring_up()

    def _pause(self, reason: str, blame: bool) -> None:
        lost = [(s.job_id, s.index, len(s.generated)) for b in self.scheduler.in_flight.values()
                for s in b.sequences if not s.cancelled]
        if self._outage is None:
            self._outage = Outage(reason, time.monotonic(), self.settings.recovery_timeout, lost)
        else:  # failed again before the first reply: the same outage, the same deadline
            self._outage.last_error = reason
        self._mesh_ok = False
        running = self.scheduler.running
        self.scheduler.reset(blame)  # every running sequence waits for a re-prefill from prompt + generated
        self._clock.clear()
        if self._link is not None:
            self._generation += 1  # what the cancelled stream still reports is ignored
            self._link.cancel()
            self._link = None
        doomed = sorted({s.job_id for s in self.scheduler.waiting if s.attempts >= self.settings.max_failures})
        for job_id in doomed:
            self._fail(
                job_id, f"the mesh lost this job's micro-batches {self.settings.max_failures} times; last: {reason}"
            )
        for job_id in {s.job_id for s in self.scheduler.waiting}:
            self.board.note(job_id, f"paused, reconnecting: {reason}")
        log.warning("pipeline_paused", reason=reason, running=running, in_flight=len(lost), lost=lost[:64],
                    failed_jobs=doomed)
        if self.metrics is not None:
            self.metrics.recoveries.inc()

    def _try_bring_up(self) -> None:
        """One bring-up attempt (a restarted stage loads its shard, the others free their stale KV slots);
        on failure another one after a backoff."""
        outage = self._outage
        outage.attempts += 1
        try:
            self.mesh.bring_up(0.0, load_timeout=self.settings.recovery_timeout)
        except StageUnavailable as err:  # down, hung or still busy: worth retrying
            if err.index is None or err.index != outage.stage_index:  # another stage to blame: its clock starts now
                outage.blamed_since = time.monotonic()
            outage.stage, outage.last_error, outage.stage_index = err.stage, str(err), err.index
            self._wait_for_mesh(str(err), retryable=True)
            return
        except (PqmeshError, grpc.RpcError) as err:  # refused for good (e.g. the shard no longer fits)
            outage.stage, outage.last_error, outage.stage_index = "", str(err), None
            self._wait_for_mesh(str(err), retryable=False)
            return
        self.scheduler.all_released()
        self._unreleased.clear()  # bring_up freed every slot on every stage
        self._mesh_ok, self._down = True, None
        waiting = list(self.scheduler.waiting)
        outage.resumed = sum(1 for s in waiting if s.generated)
        outage.resumed_tokens = sum(len(s.generated) for s in waiting)
        for job_id in {s.job_id for s in waiting}:
            self.board.note(job_id, "")
        log.info("mesh_back", attempts=outage.attempts, seconds=round(time.monotonic() - outage.started, 3),
                 resumed=outage.resumed, resumed_tokens=outage.resumed_tokens)
        self._open_stream()
        if outage.given_up or not self.scheduler.has_work():
            self._recovered()

    def _wait_for_mesh(self, error: str, retryable: bool) -> None:
        outage, now = self._outage, time.monotonic()
        if retryable and not outage.given_up and self._replan_due(now):
            self._replan()
            return
        if not outage.given_up and (not retryable or outage.expired(now)):
            self._give_up(outage.give_up_message(now) if retryable else f"a stage refused to come back: {error}")
        if outage.given_up:
            delay = self.settings.backoff.maximum
            log.info("mesh_still_down", error=error, retry_s=delay)
        else:
            delay = min(self.settings.backoff.delay(outage.attempts - 1, self._rng), outage.left(now) + 0.05)
            for job_id in {s.job_id for s in self.scheduler.waiting}:
                self.board.note(job_id, f"paused, reconnecting ({outage.left(now):.0f} s left): {error}")
            log.warning("mesh_unavailable", error=error, attempt=outage.attempts, retry_s=round(delay, 2),
                        left_s=round(outage.left(now), 1))
        self._retry_later(delay)

    def _give_up(self, message: str) -> None:
        """Fails every job with unfinished sequences (stored results stay) and refuses new jobs until the
        mesh is back."""
        self._outage.given_up = True
        self._down = message
        jobs = sorted({s.job_id for s in self.scheduler.waiting} | set(self.feeder.jobs()))
        for job_id in jobs:
            record = self.store.job(job_id)
            self._fail(job_id, f"{message}; {record.num_results} of {record.num_prompts} results finished and kept "
                               "(GetResults returns them)")
        log.error("mesh_given_up", reason=message, failed_jobs=jobs)

    def _recovered(self) -> None:
        outage, self._outage = self._outage, None
        outage.seconds = time.monotonic() - outage.started
        self.recoveries.append(outage)
        log.info("mesh_recovered", reason=outage.reason, seconds=round(outage.seconds, 3), attempts=outage.attempts,
                 lost=len(outage.in_flight), resumed=outage.resumed, resumed_tokens=outage.resumed_tokens)

    def _retry_later(self, delay: float) -> None:
        self._mesh_ok = False
        self._retry_token += 1  # only the latest timer counts
        timer = threading.Timer(delay, self._events.put, args=(("retry", self._retry_token),))
        timer.daemon = True
        timer.start()

    def _on_retry(self, token: int) -> None:
        if token != self._retry_token or self._mesh_ok:
            return
        if self._outage is None:  # a recovery that broke half-way
            self._pause("retrying after a failed recovery", blame=False)
        self._try_bring_up()

    # -- re-planning ----------------------------------------------------------------------------------
    def _replan_due(self, now: float) -> bool:
        """The same stage has been unreachable past ``--replan-after`` (counted from the first bring-up attempt
        that found it so: a stage merely slow to answer one attempt on a busy host is not planned around when
        the next attempt finds another one down) and a planner is configured."""
        outage = self._outage
        return (self.replanning is not None and outage.stage_index is not None
                and now - outage.blamed_since >= self.replanning.after_s)

    def _replan(self) -> None:
        """Plans again without the lost stage's device and brings the new mesh up; when nothing fits, the
        jobs fail with the planner's reason (their finished results kept)."""
        outage, replanning = self._outage, self.replanning
        device = self.mesh.spec.plan.stages[outage.stage_index].device or outage.stage
        try:
            plan = replanning.without(device)
        except PqmeshError as err:
            self._give_up(f"{outage.stage} is lost and re-planning found no plan: {err}")
            self._retry_later(self.settings.backoff.maximum)
            return
        self._switch_mesh(plan)
        outage.replans += 1
        outage.stage_index, outage.started = None, time.monotonic()  # the new mesh gets a full recovery timeout
        for job_id in {s.job_id for s in self.scheduler.waiting}:
            self.board.note(job_id, f"re-planned without {device}; loading the new plan")
        self._try_bring_up()

    def _switch_mesh(self, plan) -> None:
        """The engine's mesh, health watch and micro-batch sizes follow ``plan`` from now on."""
        old = self.mesh
        self.mesh = Mesh(replace(old.spec, plan=plan), old.credentials)
        old.close()
        if self._health is not None:
            self._health.stop()
            self._health = self._health_watch(self.mesh)
            self._health.start()
        self.scheduler.adopt(plan.prefill_micro_batch, plan.decode_micro_batch, len(plan.stages))
        log.warning("mesh_replanned", plan_id=self.mesh.plan_id, stages=len(plan.stages),
                    layers=[[s.device, s.start, s.end] for s in plan.stages])
