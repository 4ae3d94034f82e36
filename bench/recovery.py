"""Slot release in band vs a blocking Release call, and how fast a mesh decodes again after a stage dies.

Real processes on loopback: two `pqmesh-stage` servers holding halves of the embedded SmolLM2-135M
(16-bit; float32 on a CPU) and one `pqmesh-coordinator` per run. A job of --prompts chat prompts with
more sequences than KV slots, so slots are freed and reused all through it.

1. Release modes, interleaved and repeated in one run: `--release-mode in-band` (freed slots ride on
   the next micro-batch's header) against `--release-mode rpc` (a Release call to every stage, which
   waits behind their queued micro-batches, each time sequences finish). Prints job tokens/s per mode
   (median of --rounds) and the ratio.
2. Recovery: SIGKILL the second stage in the middle of a job, restart it at once on its port (what
   systemd does), and print the seconds from the kill to the first new token, and to the job's end.
   Re-planning onto the remaining devices is not built (issue 17), so this is the restart path.

Run: .venv/bin/python bench/recovery.py [--prompts 32] [--max-new-tokens 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from localmesh.processes import Child, Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.model.embedded import prepare

BIN = Path(sys.executable).parent
CUT = 15  # SmolLM2 has 30 decoder layers


def stage_argv(model_dir: Path, port: int = 0) -> list[str]:
    return [str(BIN / "pqmesh-stage"), "--listen", f"127.0.0.1:{port}", "--device", "cpu", "--memory-budget",
            "4GiB", "--model-root", str(model_dir.parent)]


def plan_file(path: Path, addresses: list[str], args) -> Path:
    stages = [{"device": "cpu0", "layers": [0, CUT], "bits": [16] * CUT, "address": addresses[0]},
              {"device": "cpu1", "layers": [CUT, 30], "bits": [16] * (30 - CUT), "address": addresses[1]}]
    path.write_text(json.dumps({"stages": stages, "prefill_micro_batch": args.micro_batch,
                                "decode_micro_batch": args.micro_batch}))
    return path


def coordinator_argv(model_dir: Path, state: Path, plan: Path, args, mode: str) -> list[str]:
    return [str(BIN / "pqmesh-coordinator"), "--listen", "127.0.0.1:0", "--state-dir", str(state), "--plan", str(plan),
            "--model-id", model_dir.name, "--model-root", str(model_dir.parent), "--max-sequences", str(args.slots),
            "--max-tokens-per-sequence", "160", "--release-mode", mode, "--health-interval", "0.5"]


def submit(address: str, args, key: str) -> tuple[coordinator_pb2_grpc.CoordinatorServiceStub, str]:
    topics = ("the moon", "bread", "chess", "a bicycle", "volcanoes", "the ocean", "GPUs", "a compiler")
    prompts = [coordinator_pb2.Prompt(chat=coordinator_pb2.ChatMessages(messages=[coordinator_pb2.ChatMessage(
        role="user", content=f"Write one sentence about {topics[i % len(topics)]} (#{i}).")]))
        for i in range(args.prompts)]
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel(address))
    params = coordinator_pb2.GenerationParams(max_new_tokens=args.max_new_tokens)
    reply = stub.SubmitJob(coordinator_pb2.SubmitJobRequest(idempotency_key=key, prompts=prompts, params=params),
                           timeout=60)
    return stub, reply.job_id


def run_job(children: Children, workdir: Path, model_dir: Path, plan: Path, args, mode: str, tag: str) -> float:
    coordinator = children.start(f"coordinator-{tag}", coordinator_argv(model_dir, workdir / tag, plan, args, mode))
    coordinator.wait_ready("coordinator_serving", timeout=300)
    stub, job = submit(coordinator.address, args, tag)
    started, last = time.perf_counter(), None
    for last in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=600):
        pass
    seconds = time.perf_counter() - started
    children.stop(coordinator)
    if last.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"{mode} job ended {coordinator_pb2.JobState.Name(last.state)}: {last.message}")
    return last.tokens_generated / seconds


def release_modes(children, workdir, model_dir, plan, args) -> dict:
    rates: dict[str, list[float]] = {"in-band": [], "rpc": []}
    for round_ in range(args.rounds):
        order = ("in-band", "rpc") if round_ % 2 == 0 else ("rpc", "in-band")
        for mode in order:
            rates[mode].append(run_job(children, workdir, model_dir, plan, args, mode, f"{mode}-{round_}"))
    return {mode: statistics.median(values) for mode, values in rates.items()} | {"runs": rates}


def recovery(children, workdir, model_dir, plan, stages: list[Child], args) -> dict:
    coordinator = children.start("coordinator-recovery",
                                 coordinator_argv(model_dir, workdir / "recovery", plan, args, "in-band"))
    coordinator.wait_ready("coordinator_serving", timeout=300)
    stub, job = submit(coordinator.address, args, "recovery")
    watch = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=600)
    half = args.prompts * args.max_new_tokens // 2
    at_kill = next(p for p in watch if p.tokens_generated >= half)
    port = int(stages[1].address.rpartition(":")[2])
    stages[1].send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    stages[1] = children.start("stage-1-restarted", stage_argv(model_dir, port))
    stages[1].wait_ready()
    first_new = None
    for progress in watch:
        if first_new is None and progress.tokens_generated > at_kill.tokens_generated + 1:
            first_new = time.perf_counter() - killed
    done = time.perf_counter() - killed
    children.stop(coordinator)
    return {"seconds_to_decoding_again": first_new, "seconds_to_job_end": done,
            "final_state": coordinator_pb2.JobState.Name(progress.state)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--slots", type=int, default=8, help="KV slots per stage (fewer than --prompts)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model_dir = prepare()
    workdir = Path(tempfile.mkdtemp(prefix="pqmesh-bench-recovery-"))
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    with Children(workdir) as children:
        stages = [children.start(f"stage-{i}", stage_argv(model_dir)) for i in range(2)]
        for stage in stages:
            stage.wait_ready()
        plan = plan_file(workdir / "plan.json", [s.address for s in stages], args)
        modes = release_modes(children, workdir, model_dir, plan, args)
        back = recovery(children, workdir, model_dir, plan, stages, args)
    out = sys.stdout
    out.write(f"# {os.cpu_count()} CPUs, OMP_NUM_THREADS={env_threads or 'unset'}; SmolLM2-135M in 2 stage "
              f"processes; {args.prompts} prompts x {args.max_new_tokens} new tokens, {args.slots} KV slots, "
              f"micro-batch {args.micro_batch}; logs in {workdir}\n")
    runs = ", ".join(f"{m}: " + "/".join(f"{r:.1f}" for r in modes["runs"][m]) for m in ("in-band", "rpc"))
    out.write(f"release in band {modes['in-band']:.1f} tokens/s, by Release call {modes['rpc']:.1f} tokens/s: "
              f"{modes['in-band'] / modes['rpc']:.2f}x (median of {args.rounds}; runs {runs})\n")
    out.write(f"stage 1 SIGKILLed and restarted on its port: decoding again after "
              f"{back['seconds_to_decoding_again']:.1f} s, job {back['final_state']} "
              f"{back['seconds_to_job_end']:.1f} s after the kill\n")
    out.write(json.dumps({"release": modes, "recovery": back}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
