"""The job API core, without gRPC: validate and tokenize a submission, store it, hand it to the engine;
report progress, page through results, list and cancel jobs.

A submission is checked whole before anything is stored: every prompt non-empty, token ids inside the
vocabulary, max_new_tokens leaving room for a prompt in the KV cache per sequence. A prompt longer than
that room is not a failed job: it is stored with the others and gets its own error result
(``context_length_exceeded``, saying what to shorten) when the engine reaches it, as an uploaded line
does; the rest of the job runs and the job succeeds. A job with more prompts than KV slots is
accepted and queued (slots are reused as sequences finish), never truncated. While the
mesh is down for good (a stage stayed away past --stage-recovery-timeout) new jobs are refused with
UNAVAILABLE until it is back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import structlog

from coordinator.engine import Engine
from coordinator.progress import Progress, ProgressBoard
from coordinator.settings import GenerationSettings
from coordinator.store import JobRecord, JobState, JobStore, ResultRecord
from coordinator.text import TextCodec
from coordinator.upload import UploadLimits, Uploads
from pqmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Limits:
    """What one coordinator accepts at once; past a limit a call answers RESOURCE_EXHAUSTED."""

    max_pending_jobs: int = 64  # uploading + queued + running
    max_prompts_per_job: int = 10_000_000  # SubmitJob is bounded by the message size long before this
    max_watchers: int = 32  # open WatchJob / StreamResults streams
    max_prompt_bytes: int = 1 << 20  # one uploaded prompt


Prompt = str | Sequence[int] | bytes  # text, token ids, or a serialized `Prompt` request (resolved by the engine)


def _digest(prompts: Sequence[Prompt], settings: GenerationSettings) -> str:
    if prompts and isinstance(prompts[0], bytes):
        body = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in prompts)).hexdigest()
    else:
        body = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return hashlib.sha256(json.dumps([body, asdict(settings)]).encode()).hexdigest()


class JobService:
    def __init__(self, store: JobStore, engine: Engine, board: ProgressBoard, max_tokens: int,
                 vocab_size: int | None = None, codec: TextCodec | None = None,
                 eos_ids: frozenset[int] = frozenset(), limits: Limits = Limits()) -> None:
        self.store, self.engine, self.board = store, engine, board
        self.max_tokens, self.vocab_size, self.codec, self.eos_ids = max_tokens, vocab_size, codec, eos_ids
        self.limits = limits
        self._admit = threading.Lock()  # count-then-insert of a new job is atomic
        self._watchers = threading.BoundedSemaphore(limits.max_watchers)
        self.uploads = Uploads(store, engine, UploadLimits(limits.max_pending_jobs, limits.max_prompts_per_job,
                                                           limits.max_prompt_bytes), self._admit)

    # -- submit -------------------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Prompt], settings: GenerationSettings, idempotency_key: str = "") -> JobRecord:
        if not prompts:
            raise InvalidArgument("a job needs at least one prompt")
        if len(prompts) > self.limits.max_prompts_per_job:
            raise InvalidArgument(f"the job has {len(prompts)} prompts; this coordinator takes at most "
                                  f"{self.limits.max_prompts_per_job} per job (--max-prompts-per-job): split it")
        digest = _digest(prompts, settings)
        requests = isinstance(prompts[0], bytes)  # stored as they are; the engine resolves each (errors per prompt)
        ids = [] if requests else self._token_ids(prompts)
        if settings.stop_on_eos and not self.eos_ids:
            raise FailedPrecondition("stop_on_eos is set but this coordinator knows no end-of-sequence id; start it "
                                     "with --eos-token-id or --model-root/--tokenizer, or submit with stop_on_eos off")
        if not requests and settings.max_new_tokens >= self.max_tokens:  # shared by all: none could run
            raise InvalidArgument(f"max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the mesh's "
                                  f"{self.max_tokens} tokens per sequence (--max-tokens-per-sequence): lower it to "
                                  f"at most {self.max_tokens - 1}")
        down = self.engine.unavailable()
        if down is not None:
            raise Unavailable(f"the mesh is down ({down}); the coordinator keeps reconnecting and accepts jobs again "
                              "once every stage answers: retry later with the same idempotency key")
        job_id = "job-" + uuid.uuid4().hex[:16]
        with self._admit:
            pending = self.store.count_unfinished()
            if pending >= self.limits.max_pending_jobs and not (
                idempotency_key and self.store.has_key(idempotency_key)
            ):
                raise ResourceExhausted(f"{pending} jobs are queued or running and this coordinator holds at most "
                                        f"{self.limits.max_pending_jobs} (--max-pending-jobs); wait for one to finish "
                                        "and submit again")
            record, created = self.store.create_job(job_id, idempotency_key, digest,
                                                    {**asdict(settings), "requests": requests}, ids,
                                                    list(prompts) if requests else ())
        if created:
            log.info("job_accepted", job_id=record.id, prompts=len(prompts), key=idempotency_key,
                     prompt_tokens=sum(map(len, ids)) if ids else None)
            self.engine.enqueue(record.id)
        else:
            log.info("job_resubmitted", job_id=record.id, key=idempotency_key)
        return record

    def _token_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidArgument(f"prompt {i} is empty; every prompt needs text or at least one token id")
                if self.codec is None:
                    raise FailedPrecondition(f"prompt {i} is text but this coordinator has no tokenizer; start it with "
                                             "--tokenizer DIR (or --model-root) or send token_ids")
                row = self.codec.encode(prompt)
                if not row:
                    raise InvalidArgument(f"prompt {i} tokenizes to no tokens")
            else:
                row = [int(t) for t in prompt]
                if not row:
                    raise InvalidArgument(f"prompt {i} is empty; every prompt needs text or at least one token id")
                bad = [t for t in row if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
                if bad:
                    limit = f"0..{self.vocab_size - 1}" if self.vocab_size is not None else ">= 0"
                    raise InvalidArgument(f"prompt {i} has token ids {bad[:5]} outside the vocabulary ({limit})")
            out.append(row)
        return out

    # -- progress -----------------------------------------------------------------------------------
    def progress(self, job_id: str) -> Progress:
        live = self.board.snapshot(job_id)
        return live if live is not None else Progress.from_record(self.store.job(job_id))

    def watch(self, job_id: str, min_interval: float = 0.1, heartbeat: float = 5.0,
              alive: Callable[[], bool] = lambda: True) -> Iterator[Progress]:
        """Progress now, then on every change (at most every ``min_interval``), until a final state.
        At most ``limits.max_watchers`` watches run at once; one more raises ResourceExhausted."""
        progress = self.progress(job_id)
        if not self._watchers.acquire(blocking=False):
            raise ResourceExhausted(f"{self.limits.max_watchers} WatchJob streams are open, the most this coordinator "
                                    "serves (--max-watchers); retry later, or poll with a short WatchJob deadline")
        try:
            while True:
                yield progress
                if progress.state.final:
                    return
                version = self.board.version
                time.sleep(min_interval)
                self.board.wait(version, heartbeat, alive)
                if not alive():
                    return
                progress = self.progress(job_id)
        finally:
            self._watchers.release()

    def stream_results(self, job_id: str, resume_from: int = 0, page: int = 256, heartbeat: float = 5.0,
                       alive: Callable[[], bool] = lambda: True) -> Iterator[ResultRecord]:
        """Stored results in finishing order from the ``resume_from``-th on, as they are stored, until the job
        is final and every result was yielded. Counts against ``limits.max_watchers``."""
        self.store.job(job_id)  # NotFound before taking a watcher
        if not self._watchers.acquire(blocking=False):
            raise ResourceExhausted(f"{self.limits.max_watchers} WatchJob / StreamResults streams are open, the most "
                                    "this coordinator serves (--max-watchers); retry later")
        try:
            sent = resume_from
            while True:
                version = self.board.version
                final = self.progress(job_id).state.final  # read before the rows: none stored after it is missed
                rows = self.store.results_in_order(job_id, sent, page)
                yield from rows
                sent += len(rows)
                if len(rows) == page:
                    continue
                if final or not alive():
                    return
                self.board.wait(version, heartbeat, alive)
        finally:
            self._watchers.release()

    def jobs(self) -> list[tuple[JobRecord, Progress]]:
        return [
            (record, self.board.snapshot(record.id) or Progress.from_record(record)) for record in self.store.jobs()
        ]

    def cancel(self, job_id: str) -> Progress:
        record = self.store.job(job_id)
        if record.state.final:
            return self.progress(job_id)
        self.store.set_state(job_id, JobState.CANCELLED, "cancelled by a client")
        self.board.final(job_id, JobState.CANCELLED, "cancelled by a client")
        self.engine.cancel(job_id)
        log.info("job_cancel_requested", job_id=job_id)
        return self.progress(job_id)

    # -- results ------------------------------------------------------------------------------------
    def results(self, job_id: str, page_size: int = 0, page_token: str = "") -> tuple[list[ResultRecord], str]:
        """One page of finished sequences by index, and the token of the next page ('' when none)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _read_token(job_id, page_token) if page_token else -1
        page = self.store.results(job_id, after, size + 1)
        more = len(page) > size
        page = page[:size]
        return page, (_make_token(job_id, page[-1].index) if more else "")


def _make_token(job_id: str, last_index: int) -> str:
    return base64.urlsafe_b64encode(f"{job_id}:{last_index}".encode()).decode()


def _read_token(job_id: str, token: str) -> int:
    try:
        owner, _, index = base64.urlsafe_b64decode(token.encode()).decode().rpartition(":")
        if owner == job_id:
            return int(index)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument(f"page_token {token!r} is not a next_page_token of job {job_id}; "
                          "start with an empty page_token")
