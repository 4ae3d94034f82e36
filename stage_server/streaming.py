"""Forward streams: micro-batches in from the previous hop, activations out to the next, tokens back.

Each inbound `Forward` stream is a `Session`. A reader thread assembles micro-batches (header plus
tensor chunks) and hands them to the stage's single compute `Worker` through a bounded queue, so a
slow stage pushes back on its caller while the stages before it keep working on later
micro-batches. A middle stage sends its output on one persistent stream to the next hop and relays
that hop's responses (token ids from the last stage) back up its own stream, adding its timing.
The first error ends the session with that error's status; the server keeps serving other streams.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Iterator

import grpc
import structlog

from pqmesh import codec
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.errors import PqmeshError, Unavailable
from pqmesh.grpc_server import channel, status_code
from pqmesh.stage_wire import micro_batch_requests, read_frames
from pqmesh.types import Phase
from stage_server.runtime import MicroBatch, Output, StageRuntime
from stage_server.sampling import Sampling

log = structlog.get_logger(__name__)

_END = object()


def read_micro_batches(
    requests: Iterator[stage_pb2.ForwardRequest], device
) -> Iterator[tuple[stage_pb2.MicroBatchHeader, MicroBatch]]:
    """Assembles (header, micro-batch) pairs from a request stream; malformed input -> InvalidArgument."""
    for header, pieces in read_frames(requests):
        yield header, MicroBatch(
            plan_id=header.plan_id, micro_batch_id=header.micro_batch_id, phase=Phase(header.phase),
            slots=list(header.slots), lengths=list(header.lengths),
            sampling=[Sampling.from_proto(s) for s in header.sampling], tensor=codec.join(pieces, device=device),
            release_slots=list(header.release_slots),
        )


class Worker:
    """The stage's one compute thread: runs micro-batches in arrival order (recorded in ``metrics``).

    Loading and releasing go through the same thread (`call`), so one thread does all of a stage's
    device work: on an H100, decode steps launched from a thread other than the one that loaded the
    shard and first touched CUDA ran 2.5-4x slower (docs/BENCHMARKS.md, stage overhead). With
    ``start=False`` no thread is started and the owner calls `run` from the thread it wants the work
    in (`pqmesh-stage`: the process's main thread).
    """

    def __init__(self, runtime: StageRuntime, depth: int, metrics=None, start: bool = True) -> None:
        self.runtime, self.capacity, self.metrics = runtime, depth, metrics
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        if start:
            threading.Thread(target=self._loop, name="stage-compute", daemon=True).start()

    def run(self) -> None:
        """Runs micro-batches in the calling thread until `stop`."""
        self._loop()

    def call(self, fn):
        """``fn()`` on the compute thread, after the micro-batches queued before it; its result or error."""
        done: Future = Future()
        self._queue.put((None, done, fn))
        return done.result()

    def submit(self, session: "Session", header, batch: MicroBatch | None) -> None:
        self._queue.put((session, header, batch))  # blocks when full: backpressure to the caller

    def stop(self) -> None:
        self._queue.put(None)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            session, header, batch = item
            if session is None:  # a `call`: header is its Future, batch the function
                try:
                    header.set_result(batch())
                except BaseException as err:  # noqa: BLE001 - handed to the caller
                    header.set_exception(err)
            elif batch is None:
                session.inbound_done()
            elif session.failed:  # its stream broke: drop it unrun (it allocates nothing)
                self.runtime.micro_batches_dropped += 1
                log.debug("micro_batch_dropped", micro_batch_id=batch.micro_batch_id)
            else:
                try:
                    out = self.runtime.execute(batch)
                    self._record(batch, out)
                    session.computed(header, out)
                except Exception as err:  # noqa: BLE001 - reported on the session's stream
                    session.fail(err)

    def _record(self, batch: MicroBatch, out: Output) -> None:
        if self.metrics is not None:
            tokens = sum(batch.lengths) if batch.phase is Phase.PREFILL else len(batch.slots)
            self.metrics.micro_batch(batch.phase.name.lower(), tokens, len(out.token_ids), out.compute_ns, out.queue_ns)


class Session:
    """One inbound Forward stream and, on a non-last stage, its outbound stream to the next hop."""

    def __init__(self, runtime: StageRuntime, worker: Worker, credentials=None) -> None:
        self.runtime, self.worker = runtime, worker
        self.credentials = credentials  # pqmesh.security.Credentials towards the next hop, or None
        self.responses: queue.Queue = queue.Queue()
        self.failed = False
        self.finished = False  # every response was sent: the stream ended normally
        self._downstream: queue.Queue | None = None
        self._downstream_call = None  # the Forward call to the next hop, cancelled when this stream fails
        self._timings: dict[int, stage_pb2.StageTiming] = {}
        self._lock = threading.Lock()

    # -- inbound ----------------------------------------------------------------------------------
    def run(self, requests) -> Iterator[stage_pb2.ForwardResponse]:
        threading.Thread(target=self._read, args=(requests,), name="stage-reader", daemon=True).start()
        while (item := self.responses.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
        self.finished = True

    def closed(self) -> None:
        """The RPC ended (gRPC's termination callback): unless it ended normally, the caller cancelled
        or went away, so micro-batches still queued for this stream are dropped unrun."""
        if not self.finished:
            self.fail(Unavailable("the Forward stream was cancelled or broke"), quiet=True)

    def _read(self, requests) -> None:
        try:
            for header, batch in read_micro_batches(requests, self.runtime.device):
                if self.failed:
                    return
                self.worker.submit(self, header, batch)
            self.worker.submit(self, None, None)
        except grpc.RpcError:  # the caller cancelled or went away; nothing to answer
            self.fail(Unavailable("the caller closed the stream"), quiet=True)
        except Exception as err:  # noqa: BLE001
            self.fail(err)

    def fail(self, err: Exception, quiet: bool = False) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        if quiet:
            log.info("forward_stream_closed_by_caller")
        else:
            log.warning("forward_failed", error=str(err), kind=type(err).__name__)
        if self._downstream_call is not None:  # cancel, not half-close: the next hop drops its queue too
            self._downstream_call.cancel()
        self.responses.put(err)

    # -- after compute ----------------------------------------------------------------------------
    def _timing(self, out: Output) -> stage_pb2.StageTiming:
        spec = self.runtime.spec
        layers = tensor_pb2.LayerRange(start=spec.start, end=spec.end)
        return stage_pb2.StageTiming(layers=layers, compute_ns=out.compute_ns, queue_ns=out.queue_ns)

    def computed(self, header, out: Output) -> None:
        timing = self._timing(out)
        if out.hidden is None:  # last stage: answer with the tokens
            self.responses.put(stage_pb2.ForwardResponse(
                plan_id=header.plan_id, micro_batch_id=out.micro_batch_id, slots=out.slots,
                token_ids=out.token_ids, compute_ns=out.compute_ns, queue_ns=out.queue_ns, stages=[timing]))
            return
        if self._downstream is None:
            self._open_downstream(self.runtime.spec.next_hop)
        self._timings[out.micro_batch_id] = timing
        next_header = stage_pb2.MicroBatchHeader()
        next_header.CopyFrom(header)
        for message in micro_batch_requests(next_header, out.hidden, "hidden_states"):
            self._downstream.put(message)

    def inbound_done(self) -> None:
        if self._downstream is None:
            self.responses.put(_END)
        else:
            self._downstream.put(_END)

    # -- outbound ---------------------------------------------------------------------------------
    def _open_downstream(self, address: str) -> None:
        self._downstream = queue.Queue()
        outgoing = iter(self._downstream.get, _END)
        stub = stage_pb2_grpc.StageServiceStub(channel(address, self.credentials))
        replies = self._downstream_call = stub.Forward(outgoing)
        threading.Thread(target=self._relay, args=(replies, address), name="stage-relay", daemon=True).start()

    def _relay(self, replies, address: str) -> None:
        try:
            for reply in replies:
                own = self._timings.pop(reply.micro_batch_id)
                reply.stages.insert(0, own)
                reply.compute_ns, reply.queue_ns = own.compute_ns, own.queue_ns
                self.responses.put(reply)
            self.responses.put(_END)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                self.fail(Unavailable(f"next stage {address} is unreachable: {err.details()}"))
            else:
                self.fail(_Relayed(code, f"next stage {address}: {err.details()}"))


class _Relayed(PqmeshError):
    """An error status received from the next hop, passed up unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code.name


def abort_with(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, PqmeshError):
        context.abort(status_code(err), str(err))
    log.error("forward_internal_error", error=repr(err))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
