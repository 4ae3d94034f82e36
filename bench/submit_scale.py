"""Prompts per second into a coordinator, and its memory with a million prompts queued.

Starts one stage server and one `pqmesh-coordinator` as real processes (a tiny random 2-layer Llama:
the model is not the point), writes a jsonl file of --prompts short OpenAI Batch lines, uploads it
with the CLI's client (`coordinator.batch_client.upload`: CreateJob, chunked AppendPrompts,
StartJob), and prints the upload rate (client and coordinator share this machine) and the
coordinator's RSS (now and peak) with the job queued, against its RSS before the upload.
Targets: >= 20,000 prompts/s; < 500 MB RSS with 1,000,000 prompts queued.
Run: .venv/bin/python bench/submit_scale.py [--prompts 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from coordinator import batch_client
from localmesh.processes import Children
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def tiny_checkpoint(directory: Path) -> None:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)


def write_prompts(path: Path, count: int) -> None:
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": [5 + i % 200, 7, 11], "max_tokens": 4}}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pqmesh-submit-scale-"))
    tiny_checkpoint(work / "models" / "tiny")
    source = work / "prompts.jsonl"
    write_prompts(source, args.prompts)
    python = sys.executable
    with Children(work) as children:
        stage = children.start("stage", [python, "-m", "stage_server.main", "--listen", "127.0.0.1:0", "--device",
                                         "cpu", "--memory-budget", str(1 << 30), "--model-root",
                                         str(work / "models")])
        stage.wait_ready()
        (work / "plan.json").write_text(json.dumps({"version": 1, "prefill_micro_batch": 4, "decode_micro_batch": 4,
                                                    "stages": [{"device": "cpu", "layers": [0, 2], "bits": [16, 16],
                                                                "address": stage.address}]}))
        coordinator = children.start("coordinator", [
            python, "-m", "coordinator.main", "--listen", "127.0.0.1:0", "--state-dir", str(work / "state"),
            "--plan", str(work / "plan.json"), "--model-id", "tiny", "--max-sequences", "4",
            "--max-tokens-per-sequence", "32", "--dtype", "float32"])
        coordinator.wait_ready("coordinator_serving", timeout=120)
        pid = coordinator._proc.pid
        before = rss_mib(pid)
        with channel(coordinator.address) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            started = time.perf_counter()
            job = batch_client.upload(stub, source, coordinator_pb2.GenerationParams(max_new_tokens=4), "bench")
            seconds = time.perf_counter() - started
            time.sleep(2.0)  # the engine loads its first window and runs
            now, peak = rss_mib(pid), rss_mib(pid, "VmHWM")
            stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id))
    rate = job.total / seconds
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"file: {job.total} prompts, {source.stat().st_size / 2**20:.1f} MiB")
    print(f"upload: {job.total} prompts in {seconds:.1f} s = {rate:,.0f} prompts/s "
          f"(target >= 20,000: {'met' if rate >= 20_000 else 'NOT met'})")
    print(f"coordinator RSS: {before:.0f} MiB before, {now:.0f} MiB with the job queued and running, "
          f"peak {peak:.0f} MiB (target < 500 MB: {'met' if peak * 2**20 < 500e6 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
