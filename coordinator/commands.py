"""`pqmesh submit`, `pqmesh results`, `pqmesh jobs` and `pqmesh cancel`: the coordinator's clients.

`submit` uploads a jsonl file of any size as one job (`coordinator.batch_client`: CreateJob, chunked
AppendPrompts, StartJob), one line per prompt: OpenAI Batch API request lines, or plain
``{"prompt": "text"}`` / ``{"token_ids": [...]}`` lines (with optional ``custom_id`` and generation
keys). It follows the results as they finish and writes them as jsonl: OpenAI Batch output lines for an
OpenAI file, otherwise ``{"index", "token_ids", "text", "finish_reason", "usage"}`` per prompt. Its
idempotency key defaults to a hash of the file and the settings, so running the same command again
after a crash or a coordinator restart finds (and resumes) the same job instead of starting a second.
With ``--coordinator`` given more than once it shards the file across those coordinators (one mesh,
one pipeline replica each; ``coordinator.job_split``) and merges their results into one output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

import grpc

from coordinator import batch_client
from coordinator.openai_batch import result_line
from coordinator.progress_display import ProgressDisplay
from pqmesh import security
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.errors import InvalidArgument
from pqmesh.grpc_server import channel

DEFAULT_COORDINATOR = "127.0.0.1:50051"
STATES = {v.number: v.name.removeprefix("JOB_STATE_").lower() for v in coordinator_pb2.JobState.DESCRIPTOR.values}
PHASES = {tensor_pb2.PHASE_PREFILL: "prefill", tensor_pb2.PHASE_DECODE: "decode"}
RECONNECT_S = 120.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="run a jsonl file of prompts (OpenAI Batch or plain lines) as one job")
    submit.add_argument("prompts", type=Path, help='jsonl: OpenAI Batch request lines, or {"prompt": "text"} / '
                                                   '{"token_ids": [ids]} lines')
    submit.add_argument("--coordinator", action="append", default=None, metavar="HOST:PORT",
                        help=f"coordinator address (default {DEFAULT_COORDINATOR}); repeat it to shard the file "
                             "across several coordinators (one mesh each), results merged into one output")
    submit.add_argument("--shares", default=None, metavar="W,W,...|REPLICAS.json",
                        help="with several --coordinator: the share of lines each gets (weights in the same "
                             "order, or a `pqmesh plan --replicas --json` file: its replicas' throughputs); "
                             "even by default")
    security.add_flags(submit, server=False, peer="the coordinator")
    submit.add_argument("--out", type=Path, default=None, help="results jsonl (default: stdout)")
    submit.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens to generate per prompt without its own max_tokens (default 64)")
    submit.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    submit.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    submit.add_argument("--top-k", type=int, default=0)
    submit.add_argument("--top-p", type=float, default=0.0)
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--idempotency-key", default=None,
                        help="default: a hash of the file and settings, so a re-run finds the same job")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    submit.set_defaults(func=_submit)

    results = sub.add_parser("results", help="write a job's results as jsonl")
    results.add_argument("job_id")
    _coordinator_flag(results)
    results.add_argument("--out", type=Path, default=None, help="results jsonl (default: stdout)")
    results.add_argument("--wait", action="store_true", help="wait for the job to finish first, with a progress bar")
    results.add_argument("--follow", action="store_true",
                         help="stream results as they finish (finishing order) until the job ends")
    results.add_argument("--format", choices=("auto", "openai", "plain"), default="auto",
                         help="output lines: OpenAI Batch, plain, or auto (per result: OpenAI for OpenAI requests)")
    results.set_defaults(func=_results)

    jobs = sub.add_parser("jobs", help="list the coordinator's jobs, newest first")
    _coordinator_flag(jobs)
    jobs.set_defaults(func=_jobs)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job (finished results are kept)")
    cancel.add_argument("job_id")
    _coordinator_flag(cancel)
    cancel.set_defaults(func=_cancel)


def _coordinator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=DEFAULT_COORDINATOR, metavar="HOST:PORT",
                        help=f"coordinator address (default {DEFAULT_COORDINATOR})")
    security.add_flags(parser, server=False, peer="the coordinator")


def _stub(args) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(channel(args.coordinator, security.from_args(args)))


def _rpc(name: str, call):
    """Runs a call; a gRPC error becomes one line on stderr and exit code 2."""
    try:
        return call()
    except grpc.RpcError as err:
        raise _Failed(f"{name}: {err.code().name}: {err.details()}") from None


class _Failed(Exception):
    """A call the coordinator refused; reported as one line on stderr."""


def generation_params(args) -> coordinator_pb2.GenerationParams:
    return coordinator_pb2.GenerationParams(
        max_new_tokens=args.max_new_tokens, stop_on_eos=not args.ignore_eos,
        sampling=tensor_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           seed=args.seed))


def _submit(args) -> int:
    if not args.prompts.is_file():
        raise InvalidArgument(f"{args.prompts} is not a file")
    coordinators = args.coordinator or [DEFAULT_COORDINATOR]
    if len(coordinators) > 1:
        return _submit_split(args, coordinators)
    if args.shares is not None:
        raise InvalidArgument("--shares deals lines to several coordinators; give --coordinator more than once "
                              "or leave --shares out")
    args.coordinator = coordinators[0]
    params = generation_params(args)
    key = args.idempotency_key or batch_client.default_key(args.prompts, params)
    stub = _stub(args)
    try:
        if args.no_wait:
            with ProgressDisplay("upload", None, "prompt") as display:
                job = batch_client.upload(stub, args.prompts, params, key, display)
            sys.stderr.write(f"job {job.job_id}: {job.total} prompts\n")
            sys.stdout.write(job.job_id + "\n")
            return 0
        if args.out is None:
            return _submit_to_stdout(stub, args.prompts, params, key)
        final, written = batch_client.run_file(stub, args.prompts, args.out, params, key)
    except batch_client.BatchFailed as err:
        sys.stderr.write(f"pqmesh submit: {err}\n")
        return 2
    sys.stderr.write(f"{written} results written to {args.out}\n")
    return _report(final)


def _submit_split(args, coordinators: list[str]) -> int:
    """`submit` with several --coordinator: one shard of the file per coordinator, one merged output."""
    from coordinator.job_split import failure_message, run_split, shares_from, split_job

    shares = shares_from(args.shares, len(coordinators)) if args.shares is not None else None
    job = split_job(args.prompts, generation_params(args), coordinators, shares, args.idempotency_key)
    options = security.from_args(args)

    def connect(address: str):
        return coordinator_pb2_grpc.CoordinatorServiceStub(channel(address, options))

    if args.no_wait:
        return _upload_shards(job, connect)
    sink = args.out.open("w") if args.out is not None else sys.stdout
    try:
        outcomes, merged = run_split(connect, job, sink)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; every shard's job keeps running on its coordinator: run the same "
                         "command again to follow them\n")
        return 130
    finally:
        if args.out is not None:
            sink.close()
    out_name = str(args.out) if args.out is not None else "stdout"
    if any(o.error for o in outcomes):
        sys.stderr.write(f"pqmesh submit: {failure_message(outcomes, merged, out_name)}\n")
        return 2
    sys.stderr.write(f"{merged.written} results of {merged.total} lines written to {out_name} "
                     f"from {len(outcomes)} jobs\n")
    code = 0 if merged.missing() == 0 else 1
    if code:
        sys.stderr.write(f"{merged.missing()} lines got no result from their shard's job\n")
    for o in outcomes:
        sys.stderr.write(f"{o.shard.describe()}: " + progress_line(o.final).rstrip() + "\n")
        if o.final.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
            sys.stderr.write(f"job {o.job_id} ended {STATES[o.final.state]}: {o.final.message}\n")
            code = 1
    return code


def _upload_shards(job, connect) -> int:
    """`submit --no-wait` with several coordinators: uploads every shard, prints 'ADDRESS JOB_ID' lines."""
    for shard in job.shards:
        if not shard.part:
            continue
        try:
            uploaded = job.upload(connect(shard.coordinator), shard)
        except batch_client.BatchFailed as err:
            sys.stderr.write(f"pqmesh submit: {shard.describe()}: {err}\n")
            return 2
        sys.stderr.write(f"{shard.describe()}: job {uploaded.job_id}, {uploaded.total} prompts\n")
        sys.stdout.write(f"{shard.coordinator} {uploaded.job_id}\n")
    return 0


def _submit_to_stdout(stub, path: Path, params, key: str) -> int:
    with ProgressDisplay("upload", None, "prompt") as display:
        job = batch_client.upload(stub, path, params, key, display)
    with ProgressDisplay(f"job {job.job_id}", job.total, "result") as display:
        batch_client.follow(stub, job.job_id, sys.stdout, batch_client.is_openai_file(path), display=display)
    return _report(batch_client.final_progress(stub, job.job_id))


def _report(final: coordinator_pb2.JobProgress) -> int:
    sys.stderr.write(progress_line(final).rstrip() + "\n")
    if final.state == coordinator_pb2.JOB_STATE_SUCCEEDED and final.message:  # e.g. how many got an error result
        sys.stderr.write(f"job {final.job_id}: {final.message}\n")
    if final.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
        sys.stderr.write(f"job {final.job_id} ended {STATES[final.state]}: {final.message}\n")
        return 1
    return 0


def _finish(stub, job_id: str, out: Path | None, openai: bool | None = None) -> int:
    final = watch(stub, job_id, sys.stderr)
    if final.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
        sys.stderr.write(f"job {job_id} ended {STATES[final.state]}: {final.message}\n")
    elif final.message:  # e.g. how many requests got an error result
        sys.stderr.write(f"job {job_id}: {final.message}\n")
    count = write_results(stub, job_id, out, openai)
    if out is not None:
        sys.stderr.write(f"{count} results written to {out}\n")
    return 0 if final.state == coordinator_pb2.JOB_STATE_SUCCEEDED else 1


def watch(stub, job_id: str, err: TextIO) -> coordinator_pb2.JobProgress:
    """Shows progress until the job is final; reconnects while the coordinator restarts."""
    deadline = None
    while True:
        try:
            progress, display = None, None
            for progress in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id)):
                deadline = None
                display = display or ProgressDisplay(f"job {job_id}", progress.sequences_total, "seq", err)
                display.update(progress.sequences_done - display.n)
                display.set_postfix(f"{progress.tokens_generated} tokens, {progress.tokens_per_second:.1f} tok/s")
            if display is not None:
                display.close()
            return progress
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise _Failed(f"WatchJob: {error.code().name}: {error.details()}") from None
            deadline = deadline or time.monotonic() + RECONNECT_S
            if time.monotonic() > deadline:
                raise _Failed(f"the coordinator has been unreachable for {RECONNECT_S:.0f} s") from None
            err.write("coordinator unavailable, reconnecting...\n")
            time.sleep(1.0)


def progress_line(p: coordinator_pb2.JobProgress, width: int = 24) -> str:
    share = p.sequences_done / p.sequences_total if p.sequences_total else 0.0
    bar = "#" * int(share * width) + "-" * (width - int(share * width))
    phase = PHASES.get(p.phase, STATES.get(p.state, "?"))
    eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds else ""
    return (f"[{bar}] {p.sequences_done}/{p.sequences_total} sequences, {p.tokens_generated} tokens, "
            f"{p.tokens_per_second:.1f} tok/s{eta}, {phase}{prediction_note(p)}   ")


def prediction_note(p: coordinator_pb2.JobProgress) -> str:
    """", predicted 9.6 s vs 10.2 s measured (-6%)" once a job with a prediction succeeded."""
    if p.state != coordinator_pb2.JOB_STATE_SUCCEEDED or p.predicted_seconds <= 0 or p.elapsed_seconds <= 0:
        return ""
    error = (p.predicted_seconds - p.elapsed_seconds) / p.elapsed_seconds
    return f"; predicted {p.predicted_seconds:.1f} s vs {p.elapsed_seconds:.1f} s measured ({error:+.0%})"


def write_results(stub, job_id: str, out: Path | None, openai: bool | None = None) -> int:
    """Every stored result of the job by index (one page at a time)."""
    sink = out.open("w") if out is not None else sys.stdout
    count, token, created = 0, "", int(time.time())
    try:
        while True:
            page = _rpc("GetResults", lambda: stub.GetResults(
                coordinator_pb2.GetResultsRequest(job_id=job_id, page_size=500, page_token=token), timeout=60))
            for r in page.results:
                sink.write(result_line(r, job_id, "default", created, openai) + "\n")
                count += 1
            token = page.next_page_token
            if not token:
                return count
    finally:
        if out is not None:
            sink.close()


def _results(args) -> int:
    stub = _stub(args)
    openai = {"auto": None, "openai": True, "plain": False}[args.format]
    try:
        if args.follow:
            sink = args.out.open("w") if args.out is not None else sys.stdout
            try:
                total = _rpc("WatchJob", lambda: _current(stub, args.job_id)).sequences_total
                with ProgressDisplay(f"job {args.job_id}", total, "result") as display:
                    batch_client.follow(stub, args.job_id, sink, openai, display=display)
            finally:
                if args.out is not None:
                    sink.close()
            return _report(_rpc("WatchJob", lambda: _current(stub, args.job_id)))
        if args.wait:
            return _finish(stub, args.job_id, args.out, openai)
        progress = _rpc("WatchJob", lambda: _current(stub, args.job_id))
        if progress.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
            sys.stderr.write(f"job {args.job_id} is {STATES[progress.state]}: {progress.sequences_done}/"
                             f"{progress.sequences_total} sequences done so far\n")
        elif progress.message:  # e.g. how many requests got an error result
            sys.stderr.write(f"job {args.job_id}: {progress.message}\n")
        write_results(stub, args.job_id, args.out, openai)
        return 0
    except (_Failed, batch_client.BatchFailed) as err:
        sys.stderr.write(f"pqmesh results: {err}\n")
        return 2


def _current(stub, job_id: str) -> coordinator_pb2.JobProgress:
    call = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=30)
    try:
        return next(call)
    finally:
        call.cancel()


def _jobs(args) -> int:
    try:
        reply = _rpc("ListJobs", lambda: _stub(args).ListJobs(coordinator_pb2.ListJobsRequest(), timeout=30))
    except _Failed as err:
        sys.stderr.write(f"pqmesh jobs: {err}\n")
        return 2
    for job in reply.jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted_at))
        sys.stdout.write(f"{job.job_id}  {STATES[job.state]:<9}  {job.sequences_done}/{job.sequences_total}  "
                         f"{job.tokens_generated} tokens  {when}  {job.idempotency_key}\n")
    return 0


def _cancel(args) -> int:
    try:
        progress = _rpc("CancelJob", lambda: _stub(args).CancelJob(coordinator_pb2.CancelJobRequest(job_id=args.job_id),
                                                                   timeout=30))
    except _Failed as err:
        sys.stderr.write(f"pqmesh cancel: {err}\n")
        return 2
    sys.stdout.write(f"{progress.job_id} {STATES[progress.state]}: {progress.sequences_done}/"
                     f"{progress.sequences_total} sequences done\n")
    return 0
