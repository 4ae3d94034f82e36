"""Jobs of any size: CreateJob, AppendPrompts (each chunk committed before the call answers), StartJob.

Prompts go to SQLite as serialized `Prompt` requests as they arrive and are not parsed here (the
engine's feeder resolves each when it reaches it, so a bad line becomes that line's error result),
which keeps an append at the cost of one insert per prompt and the coordinator's memory bounded by
one message. A known idempotency key returns its job and how many prompts it holds, so a client
resumes an interrupted upload where the coordinator's store stopped, also after a SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import asdict, dataclass
from typing import Sequence

import structlog

from coordinator.settings import GenerationSettings
from coordinator.store import JobRecord, JobStore
from pqmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UploadLimits:
    max_pending_jobs: int = 64  # uploading + queued + running
    max_prompts_per_job: int = 10_000_000  # --max-prompts-per-job
    max_prompt_bytes: int = 1 << 20  # --max-prompt-bytes: one serialized prompt


def upload_digest(content_digest: str, settings: GenerationSettings) -> str:
    return "upload-" + hashlib.sha256(json.dumps([content_digest, asdict(settings)]).encode()).hexdigest()


class Uploads:
    def __init__(self, store: JobStore, engine, limits: UploadLimits, admit: threading.Lock) -> None:
        self.store, self.engine, self.limits, self._admit = store, engine, limits, admit

    def create(self, settings: GenerationSettings, idempotency_key: str = "", content_digest: str = "") -> JobRecord:
        if settings.stop_on_eos and not self.engine.settings.eos_ids:
            raise FailedPrecondition("stop_on_eos is set but this coordinator knows no end-of-sequence id; start it "
                                     "with --eos-token-id or --model-root/--tokenizer, or create the job with "
                                     "stop_on_eos off")
        down = self.engine.unavailable()
        if down is not None:
            raise Unavailable(f"the mesh is down ({down}); retry later with the same idempotency key")
        with self._admit:
            pending = self.store.count_unfinished()
            if pending >= self.limits.max_pending_jobs and not (
                    idempotency_key and self.store.has_key(idempotency_key)):
                raise ResourceExhausted(f"{pending} jobs are uploading, queued or running and this coordinator holds "
                                        f"at most {self.limits.max_pending_jobs} (--max-pending-jobs); wait for one "
                                        "to finish and create the job again")
            job_id = "job-" + uuid.uuid4().hex[:16]
            record, created = self.store.create_upload(job_id, idempotency_key, upload_digest(content_digest, settings),
                                                       {**asdict(settings), "requests": True})
        log.info("job_created" if created else "job_upload_resumed", job_id=record.id, key=idempotency_key,
                 prompts=record.num_prompts, state=record.state.name.lower())
        return record

    def append(self, job_id: str, offset: int, requests: Sequence[bytes]) -> int:
        for i, blob in enumerate(requests):
            if len(blob) > self.limits.max_prompt_bytes:
                raise InvalidArgument(f"prompt {offset + i} of job {job_id} is {len(blob)} bytes; this coordinator "
                                      f"takes at most {self.limits.max_prompt_bytes} per prompt (--max-prompt-bytes)")
        return self.store.append_prompts(job_id, offset, requests, self.limits.max_prompts_per_job)

    def start(self, job_id: str, total: int) -> JobRecord:
        record, started = self.store.start_upload(job_id, total)
        if started:
            log.info("job_accepted", job_id=job_id, prompts=record.num_prompts, key=record.idempotency_key)
            self.engine.enqueue(job_id)
        return record
