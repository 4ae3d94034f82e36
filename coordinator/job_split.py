"""One jsonl job across several coordinators (each driving its own mesh, one pipeline replica): the
file's lines are dealt to them as contiguous index ranges (even, or weighted by ``shares``, e.g. the
planner's replica throughputs), each shard is uploaded as a job of its own, and the results of every
shard are followed concurrently into one output, each line's result once, with its index in the file.

Each shard's idempotency key and content digest are derived from the file digest, the settings, the
shard's number and its range, so a re-run of the same command finds every shard's job again (and
resumes its upload or its results) instead of creating a second one. A coordinator that stays
unreachable past ``reconnect_s`` fails its shard only: the other shards run to the end and keep their
results in the output, and the failure names the coordinator and what was stored.

The pure parts (`deal`, `shard_key`, `MergedOutput`) are tested without gRPC.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

import structlog

from coordinator import batch_client
from coordinator.openai_batch import result_line
from coordinator.progress_display import ProgressDisplay
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.errors import InvalidArgument

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    number: int
    coordinator: str  # HOST:PORT
    part: range  # indices of the file's non-blank lines

    def describe(self) -> str:
        lines = f"lines {self.part.start}-{self.part.stop - 1}" if self.part else "no lines"
        return f"shard {self.number} ({lines}) on {self.coordinator}"


def parse_shares(text: str, count: int) -> tuple[float, ...]:
    """``"3,1.5"`` -> (3.0, 1.5): one positive weight per coordinator, in the order they were given."""
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgument(f"--shares {text!r}: give comma-separated numbers, one per --coordinator, "
                              "e.g. --shares 3,1") from None
    if len(shares) != count:
        raise InvalidArgument(f"--shares has {len(shares)} weight(s) for {count} --coordinator address(es); "
                              "give one weight per coordinator, in the same order")
    if any(not share > 0 for share in shares):
        raise InvalidArgument(f"--shares {text!r}: every weight must be a positive number")
    return shares


def shares_from(value: str, count: int) -> tuple[float, ...]:
    """``--shares``: comma-separated weights, or a `pqmesh plan --replicas --json` file, whose replicas'
    predicted throughputs become the weights (replica i for the i-th --coordinator)."""
    path = Path(value)
    if not path.is_file():
        return parse_shares(value, count)
    try:
        replicas = json.loads(path.read_text())["replicas"]
        shares = tuple(float(r["plan"]["predicted"]["throughput_tokens_per_s"]) for r in replicas)
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"--shares {path}: not the output of `pqmesh plan --replicas --json` (no replicas "
                              "with plan.predicted.throughput_tokens_per_s); give that file or weights like "
                              "3,1") from None
    return parse_shares(",".join(str(x) for x in shares), count)


def deal(total: int, coordinators: Sequence[str], shares: Sequence[float] | None = None) -> list[Shard]:
    """Contiguous index ranges covering ``range(total)``, one per coordinator, sized in proportion to
    ``shares`` (even by default); rounding by largest remainder, ties to the earlier coordinator."""
    if not coordinators:
        raise InvalidArgument("no coordinator given; pass --coordinator HOST:PORT at least once")
    if len(set(coordinators)) != len(coordinators):
        raise InvalidArgument(f"--coordinator names the same address twice ({', '.join(coordinators)}); "
                              "give each coordinator once")
    weights = list(shares) if shares is not None else [1.0] * len(coordinators)
    if len(weights) != len(coordinators) or any(not w > 0 for w in weights):
        raise InvalidArgument(f"need one positive share per coordinator; got {weights} for {len(coordinators)}")
    exact = [total * w / sum(weights) for w in weights]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    shards, start = [], 0
    for number, (address, size) in enumerate(zip(coordinators, sizes)):
        shards.append(Shard(number, address, range(start, start + size)))
        start += size
    return shards


def shard_key(base_key: str, shard: Shard, shards: int) -> str:
    """The shard's idempotency key: the file's key (digest of file + settings, or --idempotency-key)
    with the shard's number, the shard count and its range, so a different split is a different job."""
    tag = f"{base_key}/{shard.number}of{shards}/{shard.part.start}-{shard.part.stop}"
    return f"{base_key}-s{shard.number}-" + hashlib.sha256(tag.encode()).hexdigest()[:12]


def shard_digest(file_digest: str, shard: Shard, shards: int) -> str:
    tag = f"{file_digest}/{shard.number}of{shards}/{shard.part.start}-{shard.part.stop}"
    return hashlib.sha256(tag.encode()).hexdigest()


class MergedOutput:
    """The one output of every shard: writes a shard's result with its index in the file (shard-local
    index + the shard's start), at most once per index, one whole line per write, safe across threads."""

    def __init__(self, sink: TextIO, total: int, openai: bool | None, model: str = "default") -> None:
        self.sink, self.openai, self.model = sink, openai, model
        self.created, self.total = int(time.time()), total
        self._seen = bytearray(total)
        self._lock = threading.Lock()
        self.written = 0
        self.duplicates = 0

    def add(self, shard: Shard, job_id: str, result: coordinator_pb2.SequenceResult) -> bool:
        """Writes the result unless its line already has one; False if it was a duplicate."""
        if not 0 <= result.index < len(shard.part):
            raise batch_client.BatchFailed(f"{shard.describe()}: job {job_id} returned a result for line "
                                           f"{result.index} of a shard of {len(shard.part)} lines")
        index = shard.part[result.index]
        with self._lock:
            if self._seen[index]:
                self.duplicates += 1
                log.warning("duplicate_result_dropped", job_id=job_id, index=index, shard=shard.number)
                return False
            self._seen[index] = 1
            result.index = index
            self.sink.write(result_line(result, job_id, self.model, self.created, self.openai) + "\n")
            self.written += 1
            return True

    def missing(self) -> int:
        with self._lock:
            return len(self._seen) - sum(self._seen)

    def flush(self) -> None:
        with self._lock:
            self.sink.flush()


class _SharedDisplay:
    """A ProgressDisplay several shard threads update; ``counted`` is one shard's view of it."""

    def __init__(self, display: ProgressDisplay) -> None:
        self._display, self._lock = display, threading.Lock()
        self.n = 0

    def counted(self) -> _SharedDisplay:
        view = _SharedDisplay.__new__(_SharedDisplay)
        view._display, view._lock, view.n = self._display, self._lock, 0
        return view

    def update(self, count: int = 1) -> None:
        with self._lock:
            self.n += count
            self._display.update(count)

    def write(self, text: str) -> None:
        with self._lock:
            self._display.write(text)


@dataclass
class ShardOutcome:
    shard: Shard
    job_id: str = ""
    prompts: int = 0
    results: int = 0  # written to the output
    final: coordinator_pb2.JobProgress | None = None
    error: str = ""


@dataclass(frozen=True)
class SplitJob:
    """A file dealt into shards, with what makes each shard's job findable again."""
    path: Path
    params: coordinator_pb2.GenerationParams
    shards: tuple[Shard, ...]
    base_key: str  # --idempotency-key, or the digest of file + settings
    digest: str  # of the file
    total: int  # non-blank lines

    def upload(self, stub, shard: Shard, display=None,
               reconnect_s: float = batch_client.RECONNECT_S) -> batch_client.Upload:
        return batch_client.upload(stub, self.path, self.params, shard_key(self.base_key, shard, len(self.shards)),
                                   display, reconnect_s, shard.part, shard_digest(self.digest, shard, len(self.shards)))


def split_job(path: Path, params: coordinator_pb2.GenerationParams, coordinators: Sequence[str],
              shares: Sequence[float] | None = None, key: str | None = None) -> SplitJob:
    total = sum(1 for _ in batch_client.lines(path))
    if total == 0:
        raise InvalidArgument(f"{path} has no non-blank lines: nothing to split; give a jsonl file with one "
                              "request per line")
    shards = tuple(deal(total, coordinators, shares))
    return SplitJob(path, params, shards, key or batch_client.default_key(path, params),
                    batch_client.file_digest(path), total)


def run_split(connect: Callable[[str], object], job: SplitJob, sink: TextIO, model: str = "default",
              stream: TextIO | None = None,
              reconnect_s: float = batch_client.RECONNECT_S) -> tuple[list[ShardOutcome], MergedOutput]:
    """Uploads every shard, then follows all of them into ``sink``; ``connect(address)`` gives a stub.
    A shard whose coordinator fails has ``error`` set; the others run to the end regardless."""
    outcomes = [ShardOutcome(s) for s in job.shards if s.part]
    stubs = {o.shard.coordinator: connect(o.shard.coordinator) for o in outcomes}
    total = job.total
    merged = MergedOutput(sink, total, batch_client.is_openai_file(job.path), model)
    log.info("job_split", lines=total, shards=[(s.coordinator, s.part.start, s.part.stop) for s in job.shards])

    def upload(o: ShardOutcome, display: _SharedDisplay) -> None:
        view = display.counted()
        try:
            uploaded = job.upload(stubs[o.shard.coordinator], o.shard, view, reconnect_s)
            o.job_id, o.prompts = uploaded.job_id, uploaded.total
            view.update(max(0, uploaded.total - view.n))  # a job uploaded before shows as uploaded
        except batch_client.BatchFailed as err:
            o.error = str(err)

    def follow(o: ShardOutcome, display: _SharedDisplay) -> None:
        stub = stubs[o.shard.coordinator]

        def write(r: coordinator_pb2.SequenceResult) -> None:
            o.results += merged.add(o.shard, o.job_id, r)

        try:
            batch_client.stream_results(stub, o.job_id, write, display, reconnect_s)
            o.final = batch_client.wait_final(stub, o.job_id, reconnect_s)
        except batch_client.BatchFailed as err:
            o.error = str(err)

    with ProgressDisplay(f"upload to {len(outcomes)} coordinators", total, "prompt", stream) as display:
        shared = _SharedDisplay(display)
        _in_threads(lambda o: upload(o, shared), outcomes)
    uploaded = [o for o in outcomes if not o.error]
    jobs = ", ".join(f"{o.job_id}@{o.shard.coordinator}" for o in uploaded)
    with ProgressDisplay(f"jobs {jobs}", total, "result", stream) as display:
        shared = _SharedDisplay(display)
        _in_threads(lambda o: follow(o, shared), uploaded)
    merged.flush()
    return outcomes, merged


def _in_threads(work: Callable[[ShardOutcome], None], outcomes: Sequence[ShardOutcome]) -> None:
    """``work(o)`` for every shard at once; returns when all are done, re-raises the first unexpected
    error. Daemon threads, so Ctrl-C ends the command at once (each shard's job keeps running)."""
    errors: list[BaseException] = []

    def target(o: ShardOutcome) -> None:
        try:
            work(o)
        except BaseException as err:  # re-raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=target, args=(o,), name=f"shard-{o.shard.number}", daemon=True)
               for o in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def failure_message(outcomes: Sequence[ShardOutcome], merged: MergedOutput, out_name: str) -> str:
    """One paragraph for stderr when a shard failed: which coordinator, and what the output holds."""
    failed = [o for o in outcomes if o.error]
    done = [o for o in outcomes if not o.error]
    parts = [f"{o.shard.describe()}: {o.error}" for o in failed]
    kept = "; ".join(f"{o.shard.describe()}: job {o.job_id}, {o.results} results" for o in done) or "none"
    stored = "; ".join(f"{o.shard.describe()}: job {o.job_id or '(not created)'}, {o.results} results"
                       for o in failed)
    return (f"{'; '.join(parts)}\n{merged.written} of {merged.total} results are in {out_name} "
            f"(finished shards: {kept}; failed: {stored}). Once the coordinator is reachable, run the same "
            "command again: every shard finds its own job (same file, settings and coordinators), nothing "
            "runs twice")
