"""Latency of quantized decoder layers vs the 16-bit layer, measured in the same run.

Builds a random checkpoint with decoder layers of a real model's shape (SmolLM2-135M or OPT-1.3B),
loads a middle stage of ``--layers`` layers at each bitwidth through `ModelShard` (the code path a
stage server runs), and times one prefill micro-batch and one decode step per layer:

    python bench/quant_layer.py --shape smollm2 --layers 1
    python bench/quant_layer.py --shape smollm2 --layers 8   # weights no longer fit the CPU's L3
    python bench/quant_layer.py --shape llama-7b --device cuda:0   # bf16 on a GPU (4-bit: tinygemm)

"16" is the unquantized layer in the stage dtype (float32 on CPU, bfloat16 on CUDA by default).
All bitwidths are loaded at once and timed in interleaved rounds; the table shows the best round per
layer (the machine is shared, so the best filters other load; medians are in the JSON line), ratios against 16 bits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from pqmesh.log import configure
from pqmesh.model import ModelShard
from pqmesh.quant.layer import uniform_hook
from pqmesh.quant.memory import measure_layer_bytes, predict_layer_bytes

SHAPES = {
    "smollm2": lambda n: LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        num_hidden_layers=n, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    "llama-7b": lambda n: LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=n, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "opt-1.3b": lambda n: OPTConfig(
        hidden_size=2048, ffn_dim=8192, num_attention_heads=32, num_hidden_layers=n, vocab_size=1024,
        word_embed_proj_dim=2048, max_position_embeddings=2048, dropout=0.0,
    ),
}


def _pair(text: str) -> tuple[int, int]:
    batch, tokens = text.lower().split("x")
    return int(batch), int(tokens)


class Stage:
    """One loaded stage at one bitwidth, with its prefill and decode calls ready to time."""

    def __init__(self, directory: Path, layers: int, bits: int, args) -> None:
        prefill_batch, self.prompt = _pair(args.prefill)
        decode_batch, self.context = _pair(args.decode)
        self.bits, self.layers = bits, layers
        self.shard = ModelShard.load(
            directory,
            1,
            1 + layers,
            max_slots=prefill_batch + decode_batch,
            max_len=max(self.prompt, self.context) + 1,
            layer_hook=uniform_hook(bits, args.group_size),
            dtype=args.torch_dtype,
            device=args.device,
        )
        hidden, self.device = self.shard.hidden_size, torch.device(args.device)
        self.dtype = args.torch_dtype
        gen = torch.Generator().manual_seed(0)
        self.dec_slots = list(range(decode_batch))  # stay filled; prefill uses the slots after them
        self.pre_slots = list(range(decode_batch, decode_batch + prefill_batch))
        self.prompt_x = torch.randn(prefill_batch, self.prompt, hidden, generator=gen).to(self.device, self.dtype)
        context_x = torch.randn(decode_batch, self.context, hidden, generator=gen).to(self.device, self.dtype)
        self.shard.prefill(self.dec_slots, context_x, [self.context] * decode_batch)
        self.token_x = torch.randn(decode_batch, 1, hidden, generator=gen).to(self.device, self.dtype)
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}

    def prefill(self) -> None:
        self.shard.prefill(self.pre_slots, self.prompt_x, [self.prompt] * len(self.pre_slots))
        self.shard.release(self.pre_slots)

    def decode(self) -> None:
        self.shard.decode(self.dec_slots, self.token_x)
        for s in self.dec_slots:  # rewind so every timed step attends over exactly `context` tokens
            self.shard.cache.lengths[s] = self.context

    def time(self, phase: str, calls: int) -> None:
        fn = getattr(self, phase)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[phase].append((time.perf_counter() - start) / calls / self.layers * 1e3)

    def row(self, group_size: int) -> dict:
        return {
            "bits": self.bits,
            **{f"{p}_ms": min(t) for p, t in self.times.items()},
            **{f"{p}_median_ms": statistics.median(t) for p, t in self.times.items()},
            "layer_bytes": measure_layer_bytes(self.shard.layers[0]),
            "predicted_bytes": predict_layer_bytes(self.shard.config, self.bits, group_size, self.dtype),
        }


def measure(directory: Path, layers: int, widths: list[int], args) -> list[dict]:
    """Rounds over all bitwidths (so load from other processes hits them alike); best and median."""
    stages = [Stage(directory, layers, b, args) for b in widths]
    for stage in stages:  # warm-up: work buffers, page faults
        stage.prefill()
        stage.decode()
    for _ in range(args.repeats):
        for stage in stages:
            stage.time("prefill", 1)
            stage.time("decode", 4)
    return [stage.row(args.group_size) for stage in stages]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--layers", type=int, default=1, help="layers in the timed stage (default 1)")
    parser.add_argument("--bits", default="16,8,4,3,2")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--prefill", default="4x128", help="BATCHxTOKENS of the prefill micro-batch")
    parser.add_argument("--decode", default="16x256", help="BATCHxCONTEXT of the decode micro-batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all bitwidths (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--dtype", default="", help="stage dtype (default: float32 on cpu, bfloat16 on cuda)")
    args = parser.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    configure("warning")
    widths = [int(b) for b in args.bits.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(SHAPES[args.shape](args.layers + 2), dtype=torch.float32)
        model.save_pretrained(tmp)
        del model
        rows = measure(Path(tmp), args.layers, widths, args)
    base = next((r for r in rows if r["bits"] == 16), rows[0])
    out = sys.stdout
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} CPU threads"
    )
    out.write(f"# {args.shape} layer x{args.layers}, prefill {args.prefill}, decode {args.decode}, {args.torch_dtype}, "
              f"{where}, torch {torch.__version__}\n")
    out.write("bits | layer MB (predicted) | prefill ms/layer | x16 | decode ms/layer | x16\n")
    for r in rows:
        r["prefill_x16"] = r["prefill_ms"] / base["prefill_ms"]
        r["decode_x16"] = r["decode_ms"] / base["decode_ms"]
        out.write(
            f"{r['bits']:>4} | {r['layer_bytes'] / 2**20:6.2f} ({r['predicted_bytes'] / 2**20:.2f}) | "
            f"{r['prefill_ms']:16.2f} | {r['prefill_x16']:4.2f} | "
            f"{r['decode_ms']:15.3f} | {r['decode_x16']:4.2f}\n"
        )
    out.write(json.dumps({"shape": args.shape, "layers": args.layers, "device": args.device, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
