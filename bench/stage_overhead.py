"""gRPC overhead of a stage: one stage server holding all of SmolLM2-135M vs the same shard in-process.

Same micro-batches on both paths (prefill 16 prompts, then decode micro-batches of 16 one token at a
time, one in flight); prints decode tokens/s for each and the ratio (target: gRPC >= 0.9x).
Run: .venv/bin/python bench/stage_overhead.py [--steps 32] [--batch 16] [--prompt 64]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from pqmesh.common.v1 import tensor_pb2
from pqmesh.model import ModelShard
from pqmesh.model.embedded import prepare
from pqmesh.stage.v1 import stage_pb2
from stage_server.client import StageClient
from stage_server.config import StageConfig
from stage_server.main import serve


def in_process(model_dir: Path, prompts: torch.Tensor, steps: int) -> float:
    batch, width = prompts.shape
    shard = ModelShard.load(model_dir, 0, 30, max_slots=batch, max_len=width + steps + 1)
    slots = list(range(batch))
    tokens = shard.prefill(slots, prompts, [width] * batch).argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = shard.decode(slots, tokens.view(-1, 1)).argmax(-1)
    return batch * steps / (time.perf_counter() - started)


def over_grpc(model_root: Path, prompts: torch.Tensor, steps: int) -> float:
    batch, width = prompts.shape
    server, port, servicer = serve(StageConfig("127.0.0.1:0", "cpu", 8 << 30, model_root, 4, "warning"))
    client = StageClient(f"127.0.0.1:{port}")
    try:
        client.load_shard(stage_pb2.LoadShardRequest(
            plan_id="bench", model_id=model_root.joinpath("m").name, layers=tensor_pb2.LayerRange(start=0, end=30),
            bits=[16] * 30, role=stage_pb2.ROLE_ONLY, max_sequences=batch, max_tokens_per_sequence=width + steps + 1))
        stream, ids, slots = client.forward(), itertools.count(), list(range(batch))
        stream.send("bench", next(ids), tensor_pb2.PHASE_PREFILL, slots, [width] * batch, prompts)
        reply = next(stream.responses)
        started = time.perf_counter()
        for step in range(steps):
            tokens = torch.tensor(list(reply.token_ids)).view(-1, 1)
            stream.send("bench", next(ids), tensor_pb2.PHASE_DECODE, slots, [width + step] * batch, tokens)
            reply = next(stream.responses)
        elapsed = time.perf_counter() - started
        stream.close()
        return batch * steps / elapsed
    finally:
        client.close()
        server.stop(None)
        servicer.worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    args = parser.parse_args()
    model_dir = prepare()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 40000, (args.batch, args.prompt), generator=generator)
    with tempfile.TemporaryDirectory() as root:
        Path(root, "m").symlink_to(model_dir)
        in_process(model_dir, prompts, 4)  # warm-up
        local = in_process(model_dir, prompts, args.steps)
        remote = over_grpc(Path(root), prompts, args.steps)
        local_again = in_process(model_dir, prompts, args.steps)
    local = (local + local_again) / 2
    print(f"decode micro-batch {args.batch}, context {args.prompt}..{args.prompt + args.steps}, {args.steps} steps")
    print(f"in-process : {local:8.1f} tokens/s (mean of runs before and after)")
    print(f"gRPC stage : {remote:8.1f} tokens/s")
    print(f"ratio gRPC / in-process: {remote / local:.3f}")


if __name__ == "__main__":
    main()
