"""`pqmesh run-batch -i IN.jsonl -o OUT.jsonl`: a batch file end to end.

With ``--coordinator HOST:PORT`` it uploads the file to that coordinator, follows the results as
they finish and writes them (`coordinator.batch_client.run_file`); with it given several times it
shards the file across those coordinators and merges their results (`coordinator.job_split`).
Without it, it starts a mesh on this machine the way `pqmesh demo` does (the embedded SmolLM2 by
default, ``--model DIR`` for another checkpoint): profiles the CPU (cached), starts a planner and
the stage servers, lets the planner choose the plan for this file's workload, starts a coordinator
on it, runs the file, writes the output and stops every process (also on Ctrl-C or an error).

The workload the planner sees (prompt length) comes from tokenizing the first ``SAMPLE_LINES`` lines;
each sequence gets twice the longest of those plus ``--max-new-tokens`` of KV cache, so a later, much
longer line gets a ``context_length_exceeded`` error line rather than failing the run.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from coordinator.batch_client import BatchFailed, lines, run_file
from coordinator.openai_batch import parse_line
from coordinator.requests import RequestError
from localmesh.mesh import (
    bin_path,
    check_layout,
    cpu_layout,
    profile_devices,
    profile_link,
    register_and_plan,
    stage_command,
    workload_grid,
)
from localmesh.processes import Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan

SAMPLE_LINES = 2000


@dataclass(frozen=True)
class RunBatchOptions:
    source: Path
    out: Path
    params: coordinator_pb2.GenerationParams
    coordinators: tuple[str, ...] = ()  # one: upload there; several: shard the file across them
    model: Path | None = None
    budgets_mb: tuple[int, ...] = (2000,)
    max_sequences: int = 32
    quick_profile: bool = False
    workdir: Path | None = None
    idempotency_key: str | None = None
    threads_per_process: int = 1


def run(options: RunBatchOptions, err: TextIO | None = None) -> coordinator_pb2.JobProgress:
    err = err or sys.stderr  # looked up per call, not bound at import (a test may swap sys.stderr)
    if not options.source.is_file():
        raise InvalidArgument(f"{options.source} is not a file")
    if len(options.coordinators) > 1:
        return _run_split(options, err)
    if options.coordinators:
        with channel(options.coordinators[0]) as ch:
            final, written = run_file(coordinator_pb2_grpc.CoordinatorServiceStub(ch), options.source, options.out,
                                      options.params, options.idempotency_key, stream=err)
        err.write(f"{written} results written to {options.out}\n")
        return final
    return _run_local(options, err)


def _run_split(options: RunBatchOptions, err: TextIO) -> coordinator_pb2.JobProgress:
    """The file sharded across the coordinators (`coordinator.job_split`), one merged output; the
    progress of the first shard's job that did not succeed (the last shard's if all did)."""
    from coordinator.job_split import failure_message, run_split, split_job

    job = split_job(options.source, options.params, options.coordinators, key=options.idempotency_key)
    channels = []

    def connect(address: str):
        channels.append(channel(address))
        return coordinator_pb2_grpc.CoordinatorServiceStub(channels[-1])

    try:
        with options.out.open("w") as sink:
            outcomes, merged = run_split(connect, job, sink, stream=err)
    finally:
        for ch in channels:
            ch.close()
    if any(o.error for o in outcomes):
        raise BatchFailed(failure_message(outcomes, merged, str(options.out)))
    err.write(f"{merged.written} results of {merged.total} lines written to {options.out} from "
              f"{len(outcomes)} jobs\n")
    return next((o.final for o in outcomes if o.final.state != coordinator_pb2.JOB_STATE_SUCCEEDED),
                outcomes[-1].final)


def sample_prompt_tokens(source: Path, tokenizer) -> tuple[int, int]:
    """(lines sampled, longest prompt in tokens) over the first SAMPLE_LINES lines that parse."""
    longest, count = 1, 0
    for count, line in enumerate(lines(source), 1):
        if count > SAMPLE_LINES:
            break
        try:
            request = parse_line(line)
        except RequestError:
            continue
        if request.messages is not None:
            ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in request.messages],
                                                add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        elif request.token_ids is not None:
            ids = request.token_ids
        else:
            ids = tokenizer(request.text or "")["input_ids"]
        longest = max(longest, len(ids))
    return count, longest


def _run_local(options: RunBatchOptions, err: TextIO) -> coordinator_pb2.JobProgress:
    from transformers import AutoTokenizer

    from pqmesh.model.embedded import prepare

    model_dir = Path(options.model) if options.model else prepare()
    if not (model_dir / "config.json").is_file():
        raise FailedPrecondition(f"{model_dir} has no config.json; --model takes a Hugging Face checkpoint directory")
    sampled, longest = sample_prompt_tokens(options.source, AutoTokenizer.from_pretrained(model_dir))
    new_tokens = options.params.max_new_tokens
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="pqmesh-run-batch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    devices = cpu_layout(options.budgets_mb)  # one device per budget, each on its own cores
    check_layout(devices)
    env = {"OMP_NUM_THREADS": str(options.threads_per_process), "PYTHONUNBUFFERED": "1"}
    err.write(f"run-batch: model {model_dir.name}, longest of the first {sampled} prompts {longest} tokens; "
              f"{', '.join(d.describe() for d in devices)}; logs in {workdir}\n")
    err.write("profiling this host's devices (cached after the first run) ...\n")
    grid = workload_grid(options.max_sequences, longest, new_tokens)
    profiles = profile_devices(model_dir, devices, workdir, "16,8,4", options.quick_profile, env, grid=grid)
    network = profile_link(workdir, env)
    with Children(workdir) as children:
        planner = children.start("planner", [bin_path("pqmesh-planner"), "--listen", "127.0.0.1:0",
                                             "--state-dir", str(workdir / "planner")], env)
        stages = [children.start(f"stage-{i}", stage_command(model_dir, d), env) for i, d in enumerate(devices)]
        planner.wait_ready()
        reply = register_and_plan(planner.address, profiles, (model_dir / "config.json").read_text(), devices,
                                  (options.max_sequences, longest, new_tokens), network, "16,8,4")
        for stage in stages:
            stage.wait_ready()
        plan = PipelinePlan.from_proto(reply.plan)
        addresses = {d.name: s.address for d, s in zip(devices, stages)}
        plan_path = workdir / "plan.json"
        plan_path.write_text(plan.with_addresses([addresses[s.device] for s in plan.stages]).to_json())
        err.write(f"plan: {len(reply.plan.stages)} stage(s), prefill micro-batch {reply.plan.prefill_micro_batch}, "
                  f"decode micro-batch {reply.plan.decode_micro_batch}, predicted "
                  f"{reply.predicted.throughput_tokens_per_s:.1f} tokens/s\n")
        coordinator = children.start("coordinator", [
            bin_path("pqmesh-coordinator"), "--listen", "127.0.0.1:0", "--state-dir", str(workdir / "coordinator"),
            "--plan", str(plan_path), "--model-id", model_dir.name, "--model-root", str(model_dir.parent),
            "--max-sequences", str(options.max_sequences),
            "--max-tokens-per-sequence", str(2 * longest + new_tokens)], env)
        coordinator.wait_ready("coordinator_serving", timeout=300)
        with channel(coordinator.address) as ch:
            final, written = run_file(coordinator_pb2_grpc.CoordinatorServiceStub(ch), options.source, options.out,
                                      options.params, options.idempotency_key, model_dir.name, err)
    err.write(f"{written} results written to {options.out}; every server stopped\n")
    return final
