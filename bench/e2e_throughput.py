"""End-to-end throughput: the coordinator driving 1, 2 and 3 `pqmesh-stage` processes on loopback vs
Hugging Face `generate` on the same batch in one process, measured in the same run.

Workload: SmolLM2-135M (the embedded model), a batch of 32 random prompts of 128 tokens, 64 new tokens
each (EOS ignored, greedy). Mesh time runs from SubmitJob until WatchJob reports SUCCEEDED, so it
includes submission, prefill, decode, result storage (SQLite) and gRPC; HF time is one `generate`
call. HF runs before, between and after the mesh runs (--repeat rounds) and the best run of each
configuration is compared, since a shared CPU's load comes and goes. Layers are split evenly;
micro-batches default to 32 / stages (one per stage in flight), or set --prefill-mb / --decode-mb.
Each stage process gets CPUs / stages threads, as stages sharing one host would (HF uses every CPU);
run with OMP_NUM_THREADS=1 and --threads-per-stage 1 for a single-thread comparison.

Run: .venv/bin/python bench/e2e_throughput.py [--stages 1 2 3] [--repeat 2] [--batch 32] [--prompt 128] [--new 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig
from coordinator.main import serve
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel
from pqmesh.log import configure
from pqmesh.model.embedded import prepare
from pqmesh.plan import even_plan

STAGE = str(Path(sys.executable).parent / "pqmesh-stage")


def hf_generate(model_dir: Path, prompts: torch.Tensor, new_tokens: int) -> float:
    """Tokens per second of one HF generate call (after a short warm-up)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        model.generate(prompts[:4], attention_mask=mask[:4], max_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        elapsed = time.perf_counter() - started
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return prompts.shape[0] * new_tokens / elapsed


def start_stage(model_root: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen([STAGE, "--listen", "127.0.0.1:0", "--model-root", str(model_root), "--memory-budget",
                             "16GiB", "--log-level", "info"], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        event = json.loads(line)
        if event["event"] == "stage_serving":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
            return proc, f"127.0.0.1:{event['port']}"
    raise RuntimeError(f"pqmesh-stage exited with {proc.wait()} before serving")


def run_job(port: int, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds from SubmitJob to SUCCEEDED, and the generated tokens (in prompt order). ``prompts``: a
    tensor of rows or a list of token-id lists (of any lengths)."""
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts
    conn = channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(conn)
    request = coordinator_pb2.SubmitJobRequest(
        prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=row)) for row in rows],
        params=coordinator_pb2.GenerationParams(max_new_tokens=new_tokens, stop_on_eos=False,
                                                sampling=tensor_pb2.SamplingParams()))
    started = time.perf_counter()
    job = stub.SubmitJob(request).job_id
    for progress in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job)):
        last = progress
    elapsed = time.perf_counter() - started
    assert last.state == coordinator_pb2.JOB_STATE_SUCCEEDED, last
    results = stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job, page_size=10_000)).results
    conn.close()
    return elapsed, [list(r.token_ids) for r in results]


def mesh_throughput(model_root: Path, stages: int, prompts: torch.Tensor, new_tokens: int, args) -> tuple[float, list]:
    batch = prompts.shape[0]
    prefill = args.prefill_mb or math.ceil(batch / stages)
    decode = args.decode_mb or math.ceil(batch / stages)
    threads = args.threads_per_stage or max(1, (os.cpu_count() or 1) // stages)
    processes = [start_stage(model_root, threads) for _ in range(stages)]
    try:
        with tempfile.TemporaryDirectory() as state:
            plan = even_plan(30, [address for _, address in processes], prefill, decode)
            config = CoordinatorConfig("127.0.0.1:0", Path(state), plan, args.model_id, max_sequences=batch,
                                       max_tokens_per_sequence=prompts.shape[1] + new_tokens, log_level="warning")
            coordinator = serve(config)
            try:
                run_job(coordinator.port, prompts[:4, :16], 4)  # warm-up
                elapsed, tokens = run_job(coordinator.port, prompts, new_tokens)
            finally:
                coordinator.stop(grace=None)
    finally:
        for proc, _ in processes:
            proc.terminate()
            proc.wait()
    return batch * new_tokens / elapsed, tokens, (prefill, decode, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prefill-mb", type=int, default=0, help="default: ceil(batch / stages)")
    parser.add_argument("--decode-mb", type=int, default=0, help="default: ceil(batch / stages)")
    parser.add_argument("--threads-per-stage", type=int, default=0,
                        help="OMP_NUM_THREADS of each stage process (default: CPUs / stages, at least 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of (HF, every mesh); HF runs once more at the end; the best of each is reported")
    args = parser.parse_args()
    configure("warning")
    model_dir = prepare()
    load_before = os.getloadavg()[0]
    prompts = torch.randint(3, 40000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    hf_rates, mesh_rates, outputs, sizes = [], {k: [] for k in args.stages}, {}, {}
    args.model_id = model_dir.name  # stages refuse links out of their model root: serve the prepared copy
    for _ in range(args.repeat):
        hf_rates.append(hf_generate(model_dir, prompts, args.new))
        for stages in args.stages:
            rate, outputs[stages], sizes[stages] = mesh_throughput(model_dir.parent, stages, prompts, args.new, args)
            mesh_rates[stages].append(rate)
    hf_rates.append(hf_generate(model_dir, prompts, args.new))
    hf = max(hf_rates)
    same = all(outputs[k] == outputs[args.stages[0]] for k in args.stages)
    print(f"SmolLM2-135M fp32, batch {args.batch} x prompt {args.prompt} + {args.new} new tokens, "
          f"HF with {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; best of {len(hf_rates)} HF runs "
          f"and {args.repeat} mesh runs")
    print(f"HF generate (one process): {hf:8.1f} tokens/s (runs: {', '.join(f'{r:.1f}' for r in hf_rates)})")
    print(
        "| stages | micro-batches (prefill, decode) | threads per stage | mesh tokens/s (runs) "
        "| HF tokens/s | mesh / HF |"
    )
    print("|---|---|---|---|---|---|")
    for stages in args.stages:
        prefill, decode, threads = sizes[stages]
        best, runs = max(mesh_rates[stages]), ", ".join(f"{r:.1f}" for r in mesh_rates[stages])
        print(f"| {stages} | ({prefill}, {decode}) | {threads} | {best:.1f} ({runs}) | {hf:.1f} | {best / hf:.2f}x |")
    print(f"outputs identical across stage counts: {same}")
    print(f"1-minute load average: {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
          f"(this run adds about 1-2)")


if __name__ == "__main__":
    main()
