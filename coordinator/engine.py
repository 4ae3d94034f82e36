"""The engine: one thread that runs the scheduler against the mesh over one Forward stream.

Each event (a job to load, a micro-batch's tokens, a cancel, a stream failure) is handled on the
engine thread, then `schedule()` tops the pipeline up and the new micro-batches are sent. Finished
sequences are committed to the store before they are counted and before their KV slots are released
on every stage. On start the engine resumes every unfinished job from the store: only prompts
without a stored result run again.

When the Forward stream fails, every running sequence goes back to the queue (sampling is seeded by
position, so it reproduces the same tokens), the mesh is brought up again and a new stream opened.
A job fails when the mesh has lost a micro-batch carrying one of its sequences ``max_failures``
times; while a stage is unreachable, jobs wait and the bring-up is retried.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
import structlog
import torch

from pqmesh.common.v1 import tensor_pb2
from pqmesh.stage.v1 import stage_pb2
from coordinator.mesh import ForwardLink, Mesh
from coordinator.progress import ProgressBoard
from coordinator.scheduler import MicroBatch, Phase, Scheduler, Sequence as Seq, StepResult, capacity_error
from coordinator.store import JobState, JobStore, ResultRecord

log = structlog.get_logger(__name__)

_MASK64 = (1 << 64) - 1


def sequence_seed(job_seed: int, index: int) -> int:
    """Seed of prompt ``index`` of a job (splitmix64 of the pair): distinct per prompt, independent of
    slots and micro-batches, so sampled outputs are the same whatever the batching."""
    z = (job_seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
    return ids


@dataclass(frozen=True)
class EngineSettings:
    eos_ids: frozenset[int] = frozenset()
    max_failures: int = 3  # a sequence whose micro-batch the mesh lost this often fails its job
    retry_seconds: float = 2.0
    connect_timeout: float = 30.0


class Engine:
    def __init__(self, store: JobStore, mesh: Mesh, scheduler: Scheduler, board: ProgressBoard,
                 settings: EngineSettings, decode_text: Callable[[list[int]], str] | None = None) -> None:
        self.store, self.mesh, self.scheduler, self.board = store, mesh, scheduler, board
        self.settings = settings
        self.decode_text = decode_text
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="coordinator-engine", daemon=True)
        self._link: ForwardLink | None = None
        self._generation = 0
        self._loaded: set[str] = set()
        self._mesh_ok = True

    # -- called from other threads ------------------------------------------------------------------
    def start(self) -> None:
        """Resumes unfinished jobs (oldest first) and starts the engine thread."""
        for record in self.store.unfinished_jobs():
            self._events.put(("job", record.id))
        self._open_stream()
        self._thread.start()

    def enqueue(self, job_id: str) -> None:
        self._events.put(("job", job_id))

    def cancel(self, job_id: str) -> None:
        self._events.put(("cancel", job_id))

    def stop(self, timeout: float = 10.0) -> None:
        self._events.put(("stop",))
        self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            kind, *args = self._events.get()
            if kind == "stop":
                break
            try:
                getattr(self, f"_on_{kind}")(*args)
                if self._mesh_ok:
                    for batch in self.scheduler.schedule():
                        self._send(batch)
            except Exception as err:  # noqa: BLE001 - the mesh or the store failed: recover, keep serving
                log.exception("engine_step_failed", event=kind)
                try:
                    self._recover(f"{type(err).__name__}: {err}")
                except Exception:  # noqa: BLE001 - e.g. the store is unwritable: try again later
                    log.exception("engine_recovery_failed")
                    self._retry_later()
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
        params = record.params
        self.board.track(record, params["max_new_tokens"])
        stop_ids = self.settings.eos_ids if params["stop_on_eos"] else frozenset()
        pending = self.store.pending_prompts(job_id)
        if not pending:  # every result is stored already
            self.store.set_state(job_id, JobState.SUCCEEDED)
            self.board.final(job_id, JobState.SUCCEEDED)
            return
        problems = [p for index, ids in pending if (p := capacity_error(index, len(ids), params["max_new_tokens"],
                                                                         self.scheduler.max_tokens))]
        if problems:  # accepted by a coordinator started with a larger KV cache
            self._fail(job_id, problems[0])
            return
        for index, ids in pending:
            sampling = tensor_pb2.SamplingParams(temperature=params["temperature"], top_k=params["top_k"],
                                                 top_p=params["top_p"], seed=sequence_seed(params["seed"], index))
            self.scheduler.add(Seq(job_id, index, tuple(ids), params["max_new_tokens"], stop_ids, sampling))
        log.info("job_loaded", job_id=job_id, prompts=record.num_prompts, pending=len(pending),
                 resumed=record.num_results > 0 or record.state is JobState.RUNNING)

    def _on_cancel(self, job_id: str) -> None:
        result = self.scheduler.cancel(job_id)
        self._release(result)
        self.board.final(job_id, JobState.CANCELLED)
        log.info("job_cancelled", job_id=job_id, dropped=result.cancelled)

    def _on_reply(self, generation: int, reply: stage_pb2.ForwardResponse) -> None:
        if generation != self._generation:
            return
        batch = self.scheduler.in_flight.get(reply.micro_batch_id)
        sampled = Counter(s.job_id for s in batch.sequences if not s.cancelled) if batch else Counter()
        result = self.scheduler.update(reply.micro_batch_id, reply.slots, reply.token_ids)
        self.board.tokens(dict(sampled))
        self._store_finished(result)
        self._release(result)

    def _store_finished(self, result: StepResult) -> None:
        if not result.finished:
            return
        records = []
        for item in result.finished:
            tokens = list(item.sequence.generated)
            text = self.decode_text(tokens) if self.decode_text else ""
            records.append((item.sequence.job_id, ResultRecord(item.sequence.index, tokens, text, int(item.reason))))
        try:
            completed = self.store.add_results(records)  # committed before anything counts them
        except Exception:
            self.scheduler.requeue(item.sequence for item in result.finished)  # not stored: run them again
            raise
        per_job: dict[str, list[int]] = {}
        for job_id, record in records:
            per_job.setdefault(job_id, [0, 0])
            per_job[job_id][0] += 1
            per_job[job_id][1] += len(record.token_ids)
        for job_id, (count, tokens) in per_job.items():
            self.board.finished(job_id, count, tokens)
        for job_id in completed:
            self.board.final(job_id, JobState.SUCCEEDED)
            self._loaded.discard(job_id)
            log.info("job_succeeded", job_id=job_id)

    def _release(self, result: StepResult) -> None:
        if result.release:
            self.mesh.release(result.release)
            self.scheduler.released(result.release)

    def _send(self, batch: MicroBatch) -> None:
        for job_id in {s.job_id for s in batch.sequences}:
            if self.board.running(job_id, batch.phase):
                self.store.set_state(job_id, JobState.RUNNING)
        rows = batch.rows()
        tensor = left_pad(rows) if batch.phase is Phase.PREFILL else torch.tensor(rows, dtype=torch.long)
        header = stage_pb2.MicroBatchHeader(
            plan_id=self.mesh.plan_id, micro_batch_id=batch.id, phase=int(batch.phase), slots=list(batch.slots),
            lengths=list(batch.lengths), sampling=[s.sampling for s in batch.sequences])
        self._link.send(header, tensor)

    # -- the Forward stream and recovery ------------------------------------------------------------
    def _open_stream(self) -> None:
        self._generation += 1
        self._link = self.mesh.forward()
        threading.Thread(target=self._read, args=(self._link, self._generation), name="coordinator-stream",
                         daemon=True).start()

    def _read(self, link: ForwardLink, generation: int) -> None:
        try:
            for reply in link.responses:
                self._events.put(("reply", generation, reply))
            self._events.put(("stream_error", generation, "the first stage ended the Forward stream"))
        except grpc.RpcError as err:
            self._events.put(("stream_error", generation, f"{err.code().name}: {err.details()}"))

    def _on_stream_error(self, generation: int, reason: str) -> None:
        if generation == self._generation:
            self._recover(f"Forward stream failed: {reason}")

    def _on_retry(self) -> None:
        if not self._mesh_ok:
            self._recover("retrying the mesh bring-up")

    def _recover(self, reason: str) -> None:
        """The stream or a stage failed: requeue running sequences, bring the mesh up, open a new stream."""
        running = list(self.scheduler.ready) + [s for b in self.scheduler.in_flight.values() for s in b.sequences]
        discarded = Counter()
        for sequence in running:
            discarded[sequence.job_id] -= len(sequence.generated)
        self.scheduler.reset()
        self.board.tokens(dict(discarded))
        if self._link is not None:
            self._link.cancel()
            self._link = None
        doomed = sorted({s.job_id for s in running if s.attempts >= self.settings.max_failures})
        for job_id in doomed:
            self._fail(job_id, f"the mesh lost this job's micro-batches {self.settings.max_failures} times; last: {reason}")
        log.warning("mesh_recovering", reason=reason, requeued=len(running), failed_jobs=doomed)
        try:
            self.mesh.bring_up(self.settings.connect_timeout)  # frees every slot on every stage
        except Exception as err:  # noqa: BLE001 - a stage is down or refuses: wait and try again
            self._mesh_ok = False
            for job_id in {s.job_id for s in self.scheduler.waiting}:
                self.board.note(job_id, f"waiting for the mesh: {err}")
            log.error("mesh_unavailable", error=str(err), retry_s=self.settings.retry_seconds)
            self._retry_later()
            return
        self.scheduler.all_released()
        self._mesh_ok = True
        for job_id in {s.job_id for s in self.scheduler.waiting}:
            self.board.note(job_id, "")
        self._open_stream()

    def _retry_later(self) -> None:
        self._mesh_ok = False
        timer = threading.Timer(self.settings.retry_seconds, self._events.put, args=(("retry",),))
        timer.daemon = True
        timer.start()

    def _fail(self, job_id: str, message: str) -> None:
        self.store.set_state(job_id, JobState.FAILED, message)
        self.scheduler.cancel(job_id)  # its slots are freed with every other one by the bring-up that follows
        self.board.final(job_id, JobState.FAILED, message)
        self._loaded.discard(job_id)
        log.error("job_failed", job_id=job_id, message=message)
