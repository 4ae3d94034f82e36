"""The engine: one thread that runs the scheduler against the mesh over one Forward stream.

Each event (a job to load, a micro-batch's tokens, a cancel, a stream failure) is handled on the
engine thread, then `schedule()` tops the pipeline up and the new micro-batches are sent. Finished
sequences are committed to the store before they are counted and before their KV slots are released
on every stage. On start the engine resumes every unfinished job from the store: only prompts
without a stored result run again.

Stage failures (docs/RELIABILITY.md, "Stage failure"): the Forward stream breaking, the next reply
not arriving within its step deadline (`recovery.StepClock`, ``--step-timeout``) or a stage failing
its health checks (`recovery.HealthWatch`) pauses the pipeline: nothing new is sent, the lost
micro-batches are logged, and every running sequence keeps the tokens it generated and waits to be
prefilled again from prompt + generated tokens. The mesh is then brought up with exponential backoff
and jitter (a restarted stage loads its shard again; the others free their stale KV slots) while a
stage is unreachable, until ``--stage-recovery-timeout``; the first reply afterwards ends the outage.
If the mesh does not come back in time (or a stage refuses for good), every job with unfinished
sequences fails with the stage's name (stored results stay), new jobs are refused with UNAVAILABLE,
and the bring-up is retried every ``backoff.maximum`` seconds until the mesh is back. A job fails
early when stages *refused* (rather than lost) a micro-batch carrying one of its sequences
``max_failures`` times in a row.

Re-planning onto more devices (``ReplanMesh``, `coordinator.rejoin.MeshChanges`): while a switch
waits, nothing new is scheduled; once no micro-batch is in flight the engine pauses as above,
switches to the new plan's mesh and brings it up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import grpc
import structlog
import torch

from coordinator.feeder import Feeder
from coordinator.job_lengths import pending_lengths
from coordinator.mesh import Mesh
from coordinator.prediction import predict_job_seconds
from coordinator.progress import ProgressBoard
from coordinator.recovery import Backoff, HealthWatch, OutageHandling, StepClock
from coordinator.rejoin import MeshChanges
from coordinator.replan import Replanning
from coordinator.resolve import Resolver, finished_record
from coordinator.scheduler import MicroBatch, Phase, Scheduler, StepResult
from coordinator.store import JobState, JobStore, ResultRecord
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.stage_client import ForwardStream
from pqmesh.stage_wire import left_pad, micro_batch_header

log = structlog.get_logger(__name__)

PREDICT_SAMPLE = 4096  # requests whose lengths the job-time prediction replays; more are scaled from them
_GONE = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", ""})  # stream ends that blame no micro-batch




@dataclass(frozen=True)
class EngineSettings:
    eos_ids: frozenset[int] = frozenset()
    max_failures: int = 3  # a sequence whose micro-batch stages refused this often in a row fails its job
    connect_timeout: float = 30.0
    step_timeout: float = 120.0  # --step-timeout: seconds for the next reply (more for long prefills)
    recovery_timeout: float = 600.0  # --stage-recovery-timeout: seconds to get the mesh back before jobs fail
    health_interval: float = 5.0  # --health-interval: seconds between stage health checks (0: none)
    backoff: Backoff = Backoff()
    feed_window: int = 2048  # prompts read from the store into the scheduler at most at once
    release_in_band: bool = True  # --release-mode: freed slots ride on the next micro-batch, or a Release call


class Engine(OutageHandling, MeshChanges):
    def __init__(self, store: JobStore, mesh: Mesh, scheduler: Scheduler, board: ProgressBoard,
                 settings: EngineSettings, decode_text: Callable[[list[int]], str] | None = None,
                 metrics=None, resolver: Resolver | None = None, replanning: Replanning | None = None) -> None:
        self.store, self.mesh, self.scheduler, self.board = store, mesh, scheduler, board
        resolver = resolver or Resolver(scheduler.max_tokens, eos_ids=settings.eos_ids)
        self.feeder = Feeder(store, scheduler, resolver, settings.feed_window)
        self.settings = settings
        self.metrics = metrics  # coordinator.metrics.CoordinatorMetrics, or None
        self.decode_text = decode_text
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="coordinator-engine", daemon=True)
        self._link: ForwardStream | None = None
        self._generation = 0
        self._loaded: set[str] = set()
        self._unreleased: list[int] = []  # freed slots not yet sent to the stages (see _release)
        self._mesh_ok = True
        self._clock = StepClock(settings.step_timeout)
        self._stopping = threading.Event()
        self._init_recovery(replanning)
        self._init_mesh_changes()
        self._health = self._health_watch(mesh)

    def _health_watch(self, mesh: Mesh) -> HealthWatch | None:
        if self.settings.health_interval <= 0:
            return None
        return HealthWatch(mesh.health, len(mesh.clients), self.settings.health_interval,
                           lambda index, problem: self._events.put(("unhealthy", problem)), lambda: self._mesh_ok)

    # -- called from other threads ------------------------------------------------------------------
    def start(self) -> None:
        """Resumes unfinished jobs (oldest first) and starts the engine thread."""
        for record in self.store.unfinished_jobs():
            self._events.put(("job", record.id))
        self._open_stream()
        self._thread.start()
        threading.Thread(target=self._tick, name="coordinator-clock", daemon=True).start()
        if self._health is not None:
            self._health.start()

    def unavailable(self) -> str | None:
        """Why new jobs are refused now (the mesh was given up on and is not back yet), or None."""
        return self._down

    def enqueue(self, job_id: str) -> None:
        self._events.put(("job", job_id))

    def cancel(self, job_id: str) -> None:
        self._events.put(("cancel", job_id))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._health is not None:
            self._health.stop()
        self._events.put(("stop",))
        self._thread.join(timeout)

    def _tick(self) -> None:
        interval = min(1.0, self.settings.step_timeout / 4)
        while not self._stopping.wait(interval):
            self._events.put(("tick",))

    # -- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            kind, *args = self._events.get()
            if kind == "stop":
                break
            try:
                getattr(self, f"_on_{kind}")(*args)
                if self._change is not None:  # a ReplanMesh waits for the safe point: schedule nothing new
                    self._mesh_change_step()
                if self._mesh_ok and self._change is None:
                    self._feed()
                    for batch in self.scheduler.schedule():
                        self._send(batch)
                    if self._unreleased and not self.scheduler.in_flight:
                        self._flush_releases()
            except Exception as err:  # noqa: BLE001 - the mesh or the store failed: recover, keep serving
                log.exception("engine_step_failed", event=kind)
                try:
                    self._recover(f"{type(err).__name__}: {err}")
                except Exception:  # noqa: BLE001 - e.g. the store is unwritable: try again later
                    log.exception("engine_recovery_failed")
                    self._retry_later(self.settings.backoff.maximum)
        if self._link is not None:
            self._link.close()
        log.info("engine_stopped")

    def _on_job(self, job_id: str) -> None:
        if job_id in self._loaded:
            return
        record = self.store.job(job_id)
        if record.state.final:
            return
        self._loaded.add(job_id)
        self.board.track(record, record.params["max_new_tokens"])
        if record.num_results >= record.num_prompts:  # every result is stored already
            message = self.store.error_summary(job_id)
            self.store.set_state(job_id, JobState.SUCCEEDED, message)
            self.board.final(job_id, JobState.SUCCEEDED, message)
            return
        if self._down is not None:  # accepted just before the mesh was given up on
            self._fail(job_id, f"not run: {self._down}; submit it again once the mesh is back")
            return
        self.feeder.add(record)
        self.board.predicted(job_id, self._predicted_seconds(record))
        log.info("job_loaded", job_id=job_id, prompts=record.num_prompts,
                 pending=record.num_prompts - record.num_results,
                 resumed=record.num_results > 0 or record.state is JobState.RUNNING)

    def _predicted_seconds(self, record) -> float:
        """The cost model's time for the job's pending requests (`coordinator.prediction`), from the prompt
        lengths and max_new_tokens of up to PREDICT_SAMPLE of them (resolved as the feeder will: uploaded
        lines are tokenized here), scaled to all; 0 when none can run or the plan carries no cost."""
        if self.mesh.spec.plan.cost is None:
            return 0.0
        lengths, new_tokens = pending_lengths(self.store, self.feeder.resolver, record, PREDICT_SAMPLE)
        if not lengths:
            return 0.0
        pending = record.num_prompts - record.num_results
        seconds = predict_job_seconds(self.mesh.spec.plan, lengths, new_tokens, self.scheduler.max_sequences,
                                      self.scheduler.max_in_flight, self.scheduler.group_window)
        return seconds * pending / len(lengths)

    def _on_feed(self) -> None:
        """More stored prompts to read (the loop feeds before it schedules)."""

    def _feed(self) -> None:
        errors = self.feeder.top_up()
        if errors:
            self._commit(errors)
            if self.feeder.has_more:
                self._events.put(("feed",))  # rows that were all errors: read on without waiting for a reply

    def _on_cancel(self, job_id: str) -> None:
        self.feeder.drop(job_id)
        result = self.scheduler.cancel(job_id)
        self._release(result)
        self.board.final(job_id, JobState.CANCELLED)
        log.info("job_cancelled", job_id=job_id, dropped=result.cancelled)

    def _on_reply(self, generation: int, reply: stage_pb2.ForwardResponse) -> None:
        if generation != self._generation:
            return
        self._clock.answered(reply.micro_batch_id, time.monotonic())
        result = self.scheduler.update(reply.micro_batch_id, reply.slots, reply.token_ids)
        if result.ignored:  # appends are keyed by position: a repeated or late reply changes nothing
            log.warning("reply_ignored", micro_batch_id=reply.micro_batch_id, tokens=result.ignored)
        sampled = Counter(s.job_id for s in result.appended)
        self.board.tokens(dict(sampled))
        if self.metrics is not None:
            self.metrics.tokens.inc(sum(sampled.values()))
        if self._outage is not None:
            self._recovered()  # the first reply since the mesh came back
        self._store_finished(result)
        self._release(result)

    def _store_finished(self, result: StepResult) -> None:
        if not result.finished:
            return
        records = [(item.sequence.job_id, finished_record(item.sequence.index, list(item.sequence.generated),
                                                          int(item.reason), item.sequence.meta, self.decode_text))
                   for item in result.finished]
        try:
            self._commit(records)
        except Exception:
            self.scheduler.requeue(item.sequence for item in result.finished)  # not stored: run them again
            raise

    def _commit(self, records: list[tuple[str, ResultRecord]]) -> None:
        """Stores results (committed before anything counts them); completes the jobs they finish."""
        completed = self.store.add_results(records)
        per_job: dict[str, list[int]] = {}
        for job_id, record in records:
            per_job.setdefault(job_id, [0, 0])
            per_job[job_id][0] += 1
            per_job[job_id][1] += len(record.token_ids)
        for job_id, (count, tokens) in per_job.items():
            self.board.finished(job_id, count, tokens)
        for job_id in completed:
            self.board.final(job_id, JobState.SUCCEEDED, self.store.job(job_id).message)
            self._loaded.discard(job_id)
            self.feeder.drop(job_id)
            _log_finished(self.store.job(job_id))

    def _release(self, result: StepResult) -> None:
        """Frees the slots of finished (or cancelled) sequences. In band (the default) they ride in the
        header of the next micro-batch sent, which every stage reads before that micro-batch, so a slot is
        free on every stage before any reuse and nothing waits; with ``release_in_band`` off, a Release
        call to every stage (which queues behind their micro-batches) before the scheduler reuses them."""
        if not result.release:
            return
        if self.settings.release_in_band:
            self._unreleased.extend(result.release)
        else:
            self.mesh.release(result.release)
        self.scheduler.released(result.release)

    def _flush_releases(self) -> None:
        """Nothing in flight to carry them: free the pending slots with Release calls (the stages are idle)."""
        slots, self._unreleased = self._unreleased, []
        self.mesh.release(slots)

    def _send(self, batch: MicroBatch) -> None:
        for job_id in {s.job_id for s in batch.sequences}:
            if self.board.running(job_id, batch.phase):
                self.store.set_state(job_id, JobState.RUNNING)
        rows = batch.rows()
        tensor = left_pad(rows)[0] if batch.phase is Phase.PREFILL else torch.tensor(rows, dtype=torch.long)
        header = micro_batch_header(self.mesh.plan_id, batch.id, batch.phase, batch.slots, batch.lengths,
                                    [s.sampling for s in batch.sequences], self._unreleased)
        self._unreleased = []
        self._link.send(header, tensor)
        self._clock.sent(batch, time.monotonic())
        if self.metrics is not None:
            self.metrics.micro_batches.labels(phase=batch.phase.name.lower()).inc()

    # -- the Forward stream and recovery ------------------------------------------------------------
    def _open_stream(self) -> None:
        self._generation += 1
        self._link = self.mesh.forward()
        threading.Thread(target=self._read, args=(self._link, self._generation), name="coordinator-stream",
                         daemon=True).start()

    def _read(self, link: ForwardStream, generation: int) -> None:
        try:
            for reply in link.responses:
                self._events.put(("reply", generation, reply))
            self._events.put(("stream_error", generation, "the first stage ended the Forward stream", ""))
        except grpc.RpcError as err:
            self._events.put(("stream_error", generation, f"{err.code().name}: {err.details()}", err.code().name))

    # -- detection ----------------------------------------------------------------------------------
    def _on_stream_error(self, generation: int, reason: str, code: str) -> None:
        if generation == self._generation:  # a stage that went away blames no micro-batch; one that refused does
            self._recover(f"Forward stream failed: {reason}", blame=code not in _GONE)

    def _on_tick(self) -> None:
        late = self._clock.overdue(time.monotonic()) if self._mesh_ok else None
        if late is not None:
            batch_id, allowance = late
            batch = self.scheduler.in_flight.get(batch_id)
            what = f"{batch.phase.name.lower()} micro-batch {batch_id} ({len(batch.sequences)} sequences)" if batch \
                else f"micro-batch {batch_id}"
            self._recover(f"{what} got no reply within {allowance:.0f} s (--step-timeout): a stage hangs", blame=False)

    def _on_unhealthy(self, problem: str) -> None:
        if self._mesh_ok:
            self._recover(problem, blame=False)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.set_state(job_id, JobState.FAILED, message)
        self.feeder.drop(job_id)
        self.scheduler.cancel(job_id)  # its slots are freed with every other one by the bring-up that follows
        self.board.final(job_id, JobState.FAILED, message)
        self._loaded.discard(job_id)
        log.error("job_failed", job_id=job_id, message=message)


def _log_finished(record) -> None:
    """One line per finished job: duration, tokens and tokens/s (from the stored times)."""
    seconds = (record.finished_at or 0) - (record.started_at or record.created_at)
    log.info("job_succeeded", job_id=record.id, prompts=record.num_prompts, seconds=round(seconds, 3),
             tokens=record.tokens_generated, tokens_per_s=round(record.tokens_generated / seconds, 1) if seconds > 0
             else 0.0)
