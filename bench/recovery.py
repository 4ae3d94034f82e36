"""Slot release in band vs a blocking Release call, and how fast a mesh decodes again after a stage dies.

Real processes on loopback: `pqmesh-stage` servers holding parts of the embedded SmolLM2-135M
(16-bit; float32 on a CPU), a `pqmesh-coordinator` per run, and (part 3) a `pqmesh-planner`. A job
of --prompts chat prompts with more sequences than KV slots, so slots are freed and reused all through it.

1. ``release``: release modes, interleaved and repeated in one run: `--release-mode in-band` (freed
   slots ride on the next micro-batch's header) against `--release-mode rpc` (a Release call to every
   stage, which waits behind their queued micro-batches, each time sequences finish), on two stages
   holding halves of the model. Prints job tokens/s per mode (median of --rounds) and the ratio.
2. ``restart``: SIGKILL the second stage in the middle of a job, restart it at once on its port (what
   systemd does), and print the seconds from the kill to the first new token, and to the job's end.
3. ``replan``: a stage that never returns. Three CPU devices are registered with the planner (memory
   set so that one device cannot hold the model and two can), the job runs on the planner's plan over
   two of them, the third is a spare; the plan's last stage is SIGKILLed for good mid-job. Past
   ``--replan-after`` the coordinator re-plans onto the survivor and the spare, loads the new shards,
   re-prefills and finishes. Prints seconds from the kill to the first new token and to the job's end,
   the bring-up (load phase) of the new plan from the coordinator's log, and whether the outputs equal
   those of an undisturbed run of the same job on the first plan. Run twice: stages that keep an
   unchanged shard on LoadShard (the default), and stages started with --no-keep-shard (always reload).

Run: .venv/bin/python bench/recovery.py [--parts release,restart,replan] [--prompts 32]
     [--max-new-tokens 24] [--rounds 3] [--replan-after 2]
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
from datetime import datetime
from pathlib import Path

from google.protobuf import json_format

from coordinator.batch_client import final_progress
from localmesh.processes import Child, Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.model.embedded import prepare
from pqmesh.plan import PipelinePlan

BIN = Path(sys.executable).parent
CUT = 15  # SmolLM2 has 30 decoder layers
DEVICES = ("cpu-a", "cpu-b", "cpu-spare")  # part 3: the plan uses two, the third is the spare
REPLAN_RUNS = (("keep", []), ("reload", ["--no-keep-shard"]))  # part 3: (tag, pqmesh-stage flags) of each run
PROMPT_TOKENS = 48  # about the length of the chat prompts below with the template: the planner's workload


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


# -- part 3: re-plan onto the devices that remain --------------------------------------------------------
def plan_request(model_dir: Path, devices, args) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        model_config_json=(model_dir / "config.json").read_text(), dtype="float32", allowed_bits=[16],
        devices=[planner_pb2.ClusterDevice(device_type="cpu-bench", count=1, name=n, host=n) for n in devices],
        workload=planner_pb2.Workload(batch_size=args.prompts, prompt_length=PROMPT_TOKENS,
                                      generation_length=args.max_new_tokens))


def register(stub, memory_bytes: int) -> None:
    for name in DEVICES:
        profile = {"name": name, "device_type": "cpu-bench", "memory_bytes": str(memory_bytes), "reserve_bytes": "0",
                   "roofline": {"peak_fp16_tflops": 1.0, "memory_bandwidth_gbs": 20.0}, "version": 1}
        stub.RegisterDevice(planner_pb2.RegisterDeviceRequest(
            profile=json_format.ParseDict(profile, planner_pb2.DeviceProfile())), timeout=30)


def start_planner(children: Children, workdir: Path, model_dir: Path, args):
    """A planner whose three devices can each hold 70% of the model: two are needed, any two fit."""
    planner = children.start("planner", [str(BIN / "pqmesh-planner"), "--listen", "127.0.0.1:0", "--state-dir",
                                         str(workdir / "planner")])
    planner.wait_ready()
    stub = planner_pb2_grpc.PlannerServiceStub(channel(planner.address))
    register(stub, 16 << 30)
    whole = stub.Plan(plan_request(model_dir, DEVICES[:1], args), timeout=120).predicted.memory_bytes[0]
    register(stub, int(0.7 * whole))
    return planner, stub


def replan_argv(model_dir: Path, state: Path, plan: Path, request: Path, planner: str, addresses: dict, args):
    return coordinator_argv(model_dir, state, plan, args, "in-band") + [
        "--planner", planner, "--replan-request", str(request), "--replan-after", str(args.replan_after),
        *[f"--device-address={name}={address}" for name, address in addresses.items()]]


def job_results(stub, job: str) -> list[list[int]]:
    results, token = [], ""
    while True:
        page = stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job, page_token=token), timeout=60)
        results += page.results
        token = page.next_page_token
        if not token:
            return [list(r.token_ids) for r in sorted(results, key=lambda r: r.index)]


def stamp(entry: dict) -> float:
    """Epoch seconds of a JSON log line (structlog's ISO timestamp, UTC)."""
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def log_events(path: Path, names: set[str], after: float) -> list[dict]:
    """The coordinator's JSON log lines of events ``names`` stamped at or after ``after`` (epoch seconds)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") in names and stamp(entry) >= after:
            out.append(entry)
    return out


def replan_summary(log_path: Path, killed_epoch: float) -> dict:
    """From the coordinator's log after the kill: the new plan, the bring-up of its mesh (load phase),
    which stages kept their shard and which loaded one, and when the first reply came back (the
    re-prefill samples a token per sequence: decoding again), and how long the new plan's first stage took to
    answer LoadShard (kept or loaded)."""
    events = log_events(log_path, {"replanned", "mesh_ready", "stage_loaded", "stage_kept", "mesh_recovered"},
                        killed_epoch)
    ready = [e for e in events if e["event"] == "mesh_ready"]
    replanned = next((e for e in events if e["event"] == "replanned"), {})
    recovered = next((e for e in events if e["event"] == "mesh_recovered"), None)
    loads = [e for e in events if e["event"] in ("stage_loaded", "stage_kept")]
    # replies are read in pipeline order: the first one's time since the re-plan is that stage's LoadShard call
    first_reply = round(stamp(loads[0]) - stamp(replanned), 3) if loads and replanned else None
    return {"replanned": replanned.get("stages"), "load_phase_s": ready[-1]["seconds"] if ready else None,
            "stage0_load_reply_s": first_reply,
            "seconds_to_decoding_again": round(stamp(recovered) - killed_epoch, 3) if recovered else None,
            "kept": [e["stage"] for e in events if e["event"] == "stage_kept"],
            "loaded": [e["stage"] for e in events if e["event"] == "stage_loaded"]}


def replan(children: Children, workdir: Path, model_dir: Path, planner: tuple, args, tag: str,
           stage_flags: list[str], reference: list[list[int]] | None) -> dict:
    """One run of part 3 on fresh stage processes (started with ``stage_flags``); with no ``reference``
    an undisturbed run of the job comes first and gives it."""
    planner, planner_stub = planner
    stages = {name: children.start(f"{tag}-{name}", stage_argv(model_dir) + stage_flags) for name in DEVICES}
    for stage in stages.values():
        stage.wait_ready()
    addresses = {name: stage.address for name, stage in stages.items()}
    reply = planner_stub.Plan(plan_request(model_dir, DEVICES[:2], args), timeout=120)
    plan = PipelinePlan.from_proto(reply.plan)
    plan = plan.with_addresses([addresses[s.device] for s in plan.stages])
    if len(plan.stages) != 2:
        raise SystemExit(f"the planner put the model on {len(plan.stages)} stages, expected 2")
    plan_path, request_path = workdir / f"{tag}-plan.json", workdir / f"{tag}-replan-request.json"
    plan_path.write_text(plan.to_json())
    request_path.write_text(json_format.MessageToJson(plan_request(model_dir, DEVICES, args)))
    coordinator = children.start(f"coordinator-{tag}", replan_argv(model_dir, workdir / tag, plan_path, request_path,
                                                                 planner.address, addresses, args))
    coordinator.wait_ready("coordinator_serving", timeout=300)
    out = {"plan": [[s.device, s.start, s.end] for s in plan.stages], "stage_flags": stage_flags,
           "predicted_tokens_per_s": round(reply.predicted.throughput_tokens_per_s, 2)}
    if reference is None:
        stub, job = submit(coordinator.address, args, f"{tag}-undisturbed")
        started = time.perf_counter()
        for last in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=900):
            pass
        out["undisturbed_tokens_per_s"] = round(last.tokens_generated / (time.perf_counter() - started), 2)
        reference = job_results(stub, job)
    stub, job = submit(coordinator.address, args, f"{tag}-disturbed")
    watch = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=900)
    half = args.prompts * args.max_new_tokens // 2
    next(p for p in watch if p.tokens_generated >= half)
    lost = plan.stages[-1].device
    stages[lost].kill()  # never started again
    killed, killed_epoch = time.perf_counter(), time.time()
    at_kill = final_progress(stub, job).tokens_generated  # the last stage samples: nothing new comes after this
    first_new = None
    for progress in watch:
        if first_new is None and progress.tokens_generated > at_kill:
            first_new = time.perf_counter() - killed
    done = time.perf_counter() - killed
    identical = job_results(stub, job) == reference
    children.stop(coordinator)
    out |= {"lost": lost, "seconds_to_new_token_seen_by_watcher": first_new, "seconds_to_job_end": done,
            "final_state": coordinator_pb2.JobState.Name(progress.state),
            "identical": identical} | replan_summary(coordinator.log_path, killed_epoch)
    for name, stage in stages.items():
        if name != lost:
            children.stop(stage)
    return out | {"reference": reference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="release,restart,replan",
                        help="comma-separated: release, restart, replan (default: all three)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--slots", type=int, default=8, help="KV slots per stage (fewer than --prompts)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replan-after", type=float, default=2.0, help="part 3: the coordinator's --replan-after")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"release", "restart", "replan"}:
        parser.error(f"--parts: unknown {sorted(parts - {'release', 'restart', 'replan'})}")
    model_dir = prepare()
    workdir = Path(tempfile.mkdtemp(prefix="pqmesh-bench-recovery-"))
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    report: dict = {}
    out = sys.stdout
    out.write(f"# {os.cpu_count()} CPUs, OMP_NUM_THREADS={env_threads or 'unset'}; SmolLM2-135M; {args.prompts} "
              f"prompts x {args.max_new_tokens} new tokens, {args.slots} KV slots; logs in {workdir}\n")
    with Children(workdir) as children:
        if parts & {"release", "restart"}:
            stages = [children.start(f"stage-{i}", stage_argv(model_dir)) for i in range(2)]
            for stage in stages:
                stage.wait_ready()
            plan = plan_file(workdir / "plan.json", [s.address for s in stages], args)
        if "release" in parts:
            modes = report["release"] = release_modes(children, workdir, model_dir, plan, args)
            runs = ", ".join(f"{m}: " + "/".join(f"{r:.1f}" for r in modes["runs"][m]) for m in ("in-band", "rpc"))
            out.write(f"release in band {modes['in-band']:.1f} tokens/s, by Release call {modes['rpc']:.1f} "
                      f"tokens/s: {modes['in-band'] / modes['rpc']:.2f}x (median of {args.rounds}, micro-batch "
                      f"{args.micro_batch}; runs {runs})\n")
        if "restart" in parts:
            back = report["restart"] = recovery(children, workdir, model_dir, plan, stages, args)
            out.write(f"stage 1 SIGKILLed and restarted on its port: decoding again after "
                      f"{back['seconds_to_decoding_again']:.1f} s, job {back['final_state']} "
                      f"{back['seconds_to_job_end']:.1f} s after the kill\n")
        if "replan" in parts:
            planner = start_planner(children, workdir, model_dir, args)
            reference = None
            for tag, flags in REPLAN_RUNS:
                run = replan(children, workdir, model_dir, planner, args, tag, flags, reference)
                reference = run.pop("reference")
                report[f"replan_{tag}"] = run
                out.write(f"re-plan ({tag}): plan {run['plan']}, "
                          f"{run['lost']} SIGKILLed for good, re-planned to {run['replanned']}; decoding again after "
                          f"{run['seconds_to_decoding_again']} s (load phase {run['load_phase_s']} s; stage 0 "
                          f"answered LoadShard {run['stage0_load_reply_s']} s after the re-plan; kept "
                          f"{run['kept']}, loaded {run['loaded']}), job {run['final_state']} "
                          f"{run['seconds_to_job_end']:.1f} s after the kill; outputs identical to the undisturbed "
                          f"run: {run['identical']}\n")
    out.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
