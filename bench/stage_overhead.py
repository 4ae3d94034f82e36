"""gRPC overhead of a stage: one stage server holding all of SmolLM2-135M vs the same shard in-process.

Same micro-batches on both paths (prefill 16 prompts, then decode micro-batches of 16 one token at a
time, one in flight); the two paths alternate for --rounds rounds and the best round of each counts
(CPU timings on a shared 2-core machine swing by +-15% step to step). Prints decode tokens/s for each,
the ratio (target: gRPC >= 0.9x) and the per-step time the server did not spend computing.
Run: .venv/bin/python bench/stage_overhead.py [--steps 32] [--batch 16] [--prompt 64] [--rounds 3]
On a GPU host without the embedded model: --config smollm2-config.json --device cuda:0 (random weights
of that shape, bfloat16).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from localmesh.processes import Child
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.log import configure
from pqmesh.model import ModelShard
from pqmesh.model.embedded import prepare
from pqmesh.stage_client import StageClient
from stage_server.config import StageConfig
from stage_server.main import serve

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def in_process(model_dir: Path, prompts: torch.Tensor, steps: int, args) -> float:
    batch, width = prompts.shape
    shard = ModelShard.load(model_dir, 0, args.layers, max_slots=batch, max_len=width + steps + 1,
                            dtype=DTYPES[args.dtype], device=args.device)
    slots = list(range(batch))
    tokens = shard.prefill(slots, prompts, [width] * batch).argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        # .tolist() waits for the device, as the server does when it sends the sampled ids back
        tokens = torch.tensor(shard.decode(slots, tokens.view(-1, 1)).argmax(-1).tolist())
    return batch * steps / (time.perf_counter() - started)


def over_grpc(model_dir: Path, prompts: torch.Tensor, steps: int, args) -> tuple[float, float]:
    """Decode tokens/s over gRPC and the mean per-step round trip minus the server's compute, in ms."""
    batch, width = prompts.shape
    if args.process:  # a real `pqmesh-stage` process, compute on its main thread
        child = Child(
            "stage",
            [
                sys.executable,
                "-m",
                "stage_server.main",
                "--listen",
                "127.0.0.1:0",
                "--device",
                args.device,
                "--memory-budget",
                "8G",
                "--model-root",
                str(model_dir.parent),
            ],
            Path(tempfile.mkdtemp()) / "stage.log",
        )
        port = child.wait_ready()
        server = servicer = None
    else:
        server, port, servicer = serve(StageConfig("127.0.0.1:0", args.device, 8 << 30, model_dir.parent, 4, "warning"))
    client = StageClient(f"127.0.0.1:{port}")
    try:
        client.load_shard(
            stage_pb2.LoadShardRequest(
                plan_id="bench",
                model_id=model_dir.name,
                layers=tensor_pb2.LayerRange(start=0, end=args.layers),
                bits=[16] * args.layers,
                role=stage_pb2.ROLE_ONLY,
                max_sequences=batch,
                max_tokens_per_sequence=width + steps + 1,
                dtype=args.dtype,
            )
        )
        stream, ids, slots = client.forward(), itertools.count(), list(range(batch))
        stream.send_batch("bench", next(ids), tensor_pb2.PHASE_PREFILL, slots, [width] * batch, prompts)
        reply = next(stream.responses)
        started, compute_ns = time.perf_counter(), 0
        for step in range(steps):
            tokens = torch.tensor(list(reply.token_ids)).view(-1, 1)
            stream.send_batch("bench", next(ids), tensor_pb2.PHASE_DECODE, slots, [width + step] * batch, tokens)
            reply = next(stream.responses)
            compute_ns += reply.compute_ns
        elapsed = time.perf_counter() - started
        stream.close()
        return batch * steps / elapsed, (elapsed - compute_ns / 1e9) / steps * 1e3
    finally:
        client.close()
        if server is None:
            child.stop()
        else:
            server.stop(None)
            servicer.worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--process",
        action="store_true",
        help="run the stage as a real pqmesh-stage process (compute on its main thread) instead of in-process",
    )
    parser.add_argument(
        "--config", type=Path, help="a config.json: random weights of that shape instead of the embedded model"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    configure("warning")
    scratch = tempfile.TemporaryDirectory()
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
        model_dir = Path(scratch.name, "random")
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    else:
        model_dir = prepare()
    args.layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 40000, (args.batch, args.prompt), generator=generator)
    in_process(model_dir, prompts, 4, args)  # warm-up
    local, remote, overhead = [], [], []
    for _ in range(args.rounds):
        local.append(in_process(model_dir, prompts, args.steps, args))
        speed, extra_ms = over_grpc(model_dir, prompts, args.steps, args)
        remote.append(speed)
        overhead.append(extra_ms)
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{model_dir.name}, {args.layers} layers, {args.dtype}, {where}, torch {torch.__version__}")
    print(f"decode micro-batch {args.batch}, context {args.prompt}..{args.prompt + args.steps}, "
          f"{args.steps} steps, {args.rounds} alternating rounds")
    print(f"in-process : best {max(local):8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in local)})")
    print(f"gRPC stage : best {max(remote):8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in remote)})")
    print(f"per-step time outside the server's compute: {min(overhead):.2f} ms (best round)")
    print(f"ratio gRPC / in-process: {max(remote) / max(local):.3f}")


if __name__ == "__main__":
    main()
