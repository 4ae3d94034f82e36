"""A stored job's own lengths: the workload to plan for (``ReplanMesh.for_job``, ``pqmesh mesh
replan --for-job JOB``) and the sequences its job-time prediction replays (`coordinator.engine`).

Up to JOB_SAMPLE of the job's pending requests are resolved as the feeder would resolve them (text
tokenized, chat templates applied, max_new_tokens from the request or the job); their prompt lengths
and max_new_tokens become the workload's histograms (`pqmesh.lengths.LengthHistogram`), on this
mesh's KV slots (``--max-sequences``) of ``--max-tokens-per-sequence`` tokens each, which is what the
stages allocate. Requests that would get an error result (too long, bad parameters) are left out.
"""

from __future__ import annotations

from coordinator.resolve import Resolved, Resolver
from coordinator.settings import GenerationSettings
from coordinator.store import JobRecord, JobStore
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import FailedPrecondition
from pqmesh.lengths import LengthHistogram

JOB_SAMPLE = 4096


def pending_lengths(store: JobStore, resolver: Resolver, record: JobRecord,
                    limit: int = JOB_SAMPLE) -> tuple[list[int], list[int]]:
    """(prompt tokens, max_new_tokens) of up to ``limit`` of the job's pending requests that can run,
    resolved as the feeder resolves them (requests that would get an error result are left out)."""
    settings = GenerationSettings.from_stored(record.params)
    prompts, new_tokens = [], []
    for resolved in resolver.stored_many(store.pending_prompts(record.id, limit=limit), settings):
        if isinstance(resolved, Resolved):
            prompts.append(len(resolved.prompt))
            new_tokens.append(resolved.max_new_tokens)
    return prompts, new_tokens


def job_workload(store: JobStore, resolver: Resolver, job_id: str, max_sequences: int,
                 max_tokens: int) -> planner_pb2.Workload:
    """The workload of ``job_id``'s pending requests; NotFound for an unknown job, FailedPrecondition when
    none of its requests is left to run."""
    record = store.job(job_id)
    prompts, new_tokens = pending_lengths(store, resolver, record)
    if not prompts:
        raise FailedPrecondition(f"job {job_id} has no pending request that can run ({record.num_results} of "
                                 f"{record.num_prompts} have results): nothing to plan for; name a job still running")
    workload = planner_pb2.Workload(batch_size=max_sequences, kv_tokens_per_sequence=max_tokens)
    workload.prompt_lengths.extend(LengthHistogram.from_lengths(prompts).to_proto())
    workload.generation_lengths.extend(LengthHistogram.from_lengths(new_tokens).to_proto())
    return workload
