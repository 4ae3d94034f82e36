"""The client side of a batch job of any size: upload a jsonl file in chunks (CreateJob / AppendPrompts /
StartJob), then follow its results as they finish (StreamResults) into an output jsonl file.

Memory stays bounded on the client too: the file is read line by line, twice (once for its digest,
which makes the default idempotency key, once to upload). Every line goes to the coordinator as it is
(``Prompt.jsonl_line``); the coordinator parses it, so a bad line gets its own error line in the output
and never fails the job. While the coordinator is unreachable (a restart, a SIGKILL) the client retries
for ``reconnect_s`` seconds: CreateJob with the same key tells it how many prompts are stored, and it
resumes the upload (or the result stream) from there.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

import grpc

from coordinator.openai_batch import looks_openai, result_line
from coordinator.progress_display import ProgressDisplay
from pqmesh.api.coordinator.v1 import coordinator_pb2

CHUNK_PROMPTS = 8192
CHUNK_BYTES = 4 << 20  # well under the 8 MiB message limit
RECONNECT_S = 120.0


class BatchFailed(Exception):
    """A call the coordinator refused (or an unreachable coordinator); one line for stderr."""


@dataclass(frozen=True)
class Upload:
    job_id: str
    total: int
    resumed_from: int  # prompts the coordinator held already (a re-run or a resumed upload)


def file_digest(path: Path, extra: bytes = b"") -> str:
    digest = hashlib.sha256(extra)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lines(path: Path) -> Iterator[str]:
    """The file's non-blank lines, without their newline."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\r\n")


def is_openai_file(path: Path) -> bool:
    return next((looks_openai(line) for line in lines(path)), False)


def default_key(path: Path, params: coordinator_pb2.GenerationParams) -> str:
    return "cli-" + file_digest(path, params.SerializeToString(deterministic=True))[:24]


def _retrying(what: str, call: Callable, reconnect_s: float, on_wait: Callable[[str], None] | None = None):
    """``call()``, again every second while the coordinator is UNAVAILABLE (up to ``reconnect_s``)."""
    deadline = None
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise BatchFailed(f"{what}: {err.code().name}: {err.details()}") from None
            deadline = deadline or time.monotonic() + reconnect_s
            if time.monotonic() > deadline:
                raise BatchFailed(f"{what}: the coordinator has been unreachable for {reconnect_s:.0f} s") from None
            if on_wait is not None:
                on_wait(f"coordinator unavailable ({err.details()}), retrying ...")
            time.sleep(1.0)


def upload(stub, path: Path, params: coordinator_pb2.GenerationParams, key: str,
           display: ProgressDisplay | None = None, reconnect_s: float = RECONNECT_S,
           part: range | None = None, digest: str | None = None) -> Upload:
    """Creates (or finds) the job for ``key`` and appends every line the coordinator does not hold yet.

    ``part`` (indices of the file's non-blank lines) uploads only those lines, as a job of their own
    whose ``content_digest`` is ``digest`` (a job splitter's shard); the whole file by default."""
    digest = digest or file_digest(path)
    request = coordinator_pb2.CreateJobRequest(idempotency_key=key, params=params, content_digest=digest)
    say = display.write if display else None
    first = None
    while True:
        created = _retrying("CreateJob", lambda: stub.CreateJob(request, timeout=60), reconnect_s, say)
        first = created.prompts_received if first is None else first
        if created.state != coordinator_pb2.JOB_STATE_UPLOADING:
            return Upload(created.job_id, created.prompts_received, first)
        try:
            total = _append_all(stub, path, created.job_id, created.prompts_received, display, part)
            _retrying("StartJob", lambda: stub.StartJob(
                coordinator_pb2.StartJobRequest(job_id=created.job_id, prompts_total=total), timeout=60),
                reconnect_s, say)
            return Upload(created.job_id, total, first)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise BatchFailed(f"AppendPrompts: {err.code().name}: {err.details()}") from None
            if say:
                say(f"upload interrupted ({err.details()}); resuming where the coordinator stopped")
            time.sleep(1.0)


def _append_all(stub, path: Path, job_id: str, held: int, display: ProgressDisplay | None,
                part: range | None = None) -> int:
    """Appends the lines (of ``part``, if given) from number ``held`` on; returns the number of lines."""
    chunk: list[coordinator_pb2.Prompt] = []
    size, offset, count = 0, held, 0

    def flush() -> None:
        nonlocal chunk, size, offset
        stub.AppendPrompts(coordinator_pb2.AppendPromptsRequest(job_id=job_id, offset=offset, prompts=chunk),
                           timeout=120)
        offset += len(chunk)
        if display:
            display.update(len(chunk))
        chunk, size = [], 0

    if display:
        display.update(held)
    source = lines(path) if part is None else itertools.islice(lines(path), part.start, part.stop)
    for count, line in enumerate(source, 1):
        if count <= held:
            continue
        chunk.append(coordinator_pb2.Prompt(jsonl_line=line))
        size += len(line) + 8
        if len(chunk) >= CHUNK_PROMPTS or size >= CHUNK_BYTES:
            flush()
    if chunk:
        flush()
    return count


def follow(stub, job_id: str, sink: TextIO, openai: bool | None, model: str = "default",
           display: ProgressDisplay | None = None, reconnect_s: float = RECONNECT_S) -> int:
    """Writes each result as it finishes, until the job is final; returns how many were written."""
    created = int(time.time())
    count = stream_results(stub, job_id, lambda r: sink.write(result_line(r, job_id, model, created, openai) + "\n"),
                           display, reconnect_s)
    sink.flush()
    return count


def stream_results(stub, job_id: str, on_result: Callable[[coordinator_pb2.SequenceResult], None],
                   display: ProgressDisplay | None = None, reconnect_s: float = RECONNECT_S) -> int:
    """Calls ``on_result`` once per result as it finishes, until the job is final (resuming after the
    ones it has while the coordinator is unreachable); returns how many there were."""
    received, deadline = 0, None
    while True:
        try:
            for r in stub.StreamResults(coordinator_pb2.StreamResultsRequest(job_id=job_id, resume_from=received)):
                deadline = None
                on_result(r)
                received += 1
                if display:
                    display.update(1)
            return received
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise BatchFailed(f"StreamResults: {err.code().name}: {err.details()}") from None
            deadline = deadline or time.monotonic() + reconnect_s
            if time.monotonic() > deadline:
                raise BatchFailed(f"the coordinator has been unreachable for {reconnect_s:.0f} s") from None
            if display:
                display.write("coordinator unavailable, reconnecting ...")
            time.sleep(1.0)


def final_progress(stub, job_id: str) -> coordinator_pb2.JobProgress:
    call = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=30)
    try:
        return next(call)
    finally:
        call.cancel()


def wait_final(stub, job_id: str, reconnect_s: float = RECONNECT_S) -> coordinator_pb2.JobProgress:
    """The job's final progress, retried while the coordinator is unreachable (up to ``reconnect_s``)."""
    return _retrying("WatchJob", lambda: final_progress(stub, job_id), reconnect_s)


def run_file(stub, path: Path, out: Path, params: coordinator_pb2.GenerationParams, key: str | None = None,
             model: str = "default", stream: TextIO | None = None) -> tuple[coordinator_pb2.JobProgress, int]:
    """Upload + follow + write: the whole batch workflow against one coordinator."""
    key = key or default_key(path, params)
    openai = is_openai_file(path)
    with ProgressDisplay("upload", None, "prompt", stream) as display:
        job = upload(stub, path, params, key, display)
    with ProgressDisplay(f"job {job.job_id}", job.total, "result", stream) as display, out.open("w") as sink:
        written = follow(stub, job.job_id, sink, openai, model, display)
    return wait_final(stub, job.job_id), written
