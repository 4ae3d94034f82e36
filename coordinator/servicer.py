"""The CoordinatorService servicer: decode the request, call `JobService`, encode the reply."""

from __future__ import annotations

import grpc
import structlog

from coordinator.jobs import GenerationSettings, JobService
from coordinator.progress import Progress
from coordinator.rejoin import MeshChange
from coordinator.store import ResultRecord
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.errors import InvalidArgument, PqmeshError
from pqmesh.grpc_server import rpc_errors, status_code

log = structlog.get_logger(__name__)

REPLAN_WAIT_S = 600.0
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


def _is_request(prompt: coordinator_pb2.Prompt) -> bool:
    """Uses a field beyond plain text / token ids: stored as a request and resolved by the engine."""
    return prompt.WhichOneof("kind") in ("chat", "jsonl_line") or bool(prompt.custom_id) or prompt.HasField("params")


def decode_prompts(request: coordinator_pb2.SubmitJobRequest) -> list:
    """Text / token ids, or (when any prompt carries per-request fields) every prompt serialized."""
    if any(_is_request(p) for p in request.prompts):
        return [p.SerializeToString() for p in request.prompts]
    prompts = []
    for i, prompt in enumerate(request.prompts):
        kind = prompt.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f"prompt {i} has neither text nor token_ids")
        prompts.append(prompt.text if kind == "text" else list(prompt.token_ids.ids))
    return prompts


def decode_settings(params: coordinator_pb2.GenerationParams) -> GenerationSettings:
    s = params.sampling
    return GenerationSettings(params.max_new_tokens, params.stop_on_eos, float(s.temperature), s.top_k,
                              float(s.top_p), s.seed)


def encode_result(r: ResultRecord) -> coordinator_pb2.SequenceResult:
    return coordinator_pb2.SequenceResult(
        index=r.index, token_ids=r.token_ids, text=r.text, finish_reason=r.finish_reason, custom_id=r.custom_id,
        prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids), error=r.error, error_code=r.error_code,
        endpoint=r.endpoint, model=r.model)


def encode_progress(p: Progress) -> coordinator_pb2.JobProgress:
    return coordinator_pb2.JobProgress(
        job_id=p.job_id, state=int(p.state), sequences_total=p.sequences_total, sequences_done=p.sequences_done,
        tokens_generated=p.tokens_generated, tokens_per_second=p.tokens_per_second, phase=p.phase,
        eta_seconds=p.eta_seconds, message=p.message, predicted_seconds=p.predicted_seconds,
        elapsed_seconds=p.elapsed_seconds)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    @rpc_errors
    def SubmitJob(self, request, context):
        record = self.jobs.submit(decode_prompts(request), decode_settings(request.params), request.idempotency_key)
        return coordinator_pb2.SubmitJobResponse(job_id=record.id, state=int(record.state))

    def WatchJob(self, request, context):
        yield from _stream(context, "WatchJob", self.jobs.watch(request.job_id, alive=context.is_active),
                           encode_progress)

    def StreamResults(self, request, context):
        results = self.jobs.stream_results(request.job_id, request.resume_from, alive=context.is_active)
        yield from _stream(context, "StreamResults", results, encode_result)

    @rpc_errors
    def CreateJob(self, request, context):
        record = self.jobs.uploads.create(decode_settings(request.params), request.idempotency_key,
                                          request.content_digest)
        return coordinator_pb2.CreateJobResponse(job_id=record.id, state=int(record.state),
                                                 prompts_received=record.num_prompts)

    @rpc_errors
    def AppendPrompts(self, request, context):
        received = self.jobs.uploads.append(request.job_id, request.offset,
                                            [p.SerializeToString() for p in request.prompts])
        return coordinator_pb2.AppendPromptsResponse(prompts_received=received)

    @rpc_errors
    def StartJob(self, request, context):
        record = self.jobs.uploads.start(request.job_id, request.prompts_total)
        return coordinator_pb2.SubmitJobResponse(job_id=record.id, state=int(record.state))

    @rpc_errors
    def GetResults(self, request, context):
        page, token = self.jobs.results(request.job_id, request.page_size, request.page_token)
        return coordinator_pb2.GetResultsResponse(
            results=[encode_result(r) for r in page],
            next_page_token=token)

    @rpc_errors
    def ListJobs(self, request, context):
        return coordinator_pb2.ListJobsResponse(
            jobs=[
                coordinator_pb2.JobSummary(
                    job_id=record.id,
                    state=int(progress.state),
                    idempotency_key=record.idempotency_key,
                    sequences_total=progress.sequences_total,
                    sequences_done=progress.sequences_done,
                    tokens_generated=progress.tokens_generated,
                    submitted_at=record.created_at,
                )
                for record, progress in self.jobs.jobs()
            ]
        )

    @rpc_errors
    def CancelJob(self, request, context):
        return encode_progress(self.jobs.cancel(request.job_id))

    @rpc_errors
    def ReplanMesh(self, request, context):
        waits = min(context.time_remaining() or REPLAN_WAIT_S, REPLAN_WAIT_S)  # for the safe point
        return self.jobs.engine.replan_mesh(MeshChange.from_proto(request), timeout=waits).to_proto()


def _stream(context, method: str, items, encode):
    """A server stream with the servicer's error mapping: stops when the client goes away."""
    try:
        for item in items:
            if not context.is_active():
                return
            yield encode(item)
    except PqmeshError as err:
        context.abort(status_code(err), str(err))
    except Exception as err:  # noqa: BLE001 - the boundary: log it, tell the caller
        log.exception("rpc_failed", method=method)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
