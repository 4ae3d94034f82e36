"""`pqmesh indicator` and `pqmesh ppl`: the quantization tools on the command line.

    pqmesh indicator --model DIR --calib TEXT --out ind.json [--bits 8,4,3,2] [--kind variance|direct]
    pqmesh ppl --model DIR --bits 4|16,8,...|plan.json --text TEXT [--seq-len 256] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog
import torch

from pqmesh.errors import InvalidArgument
from pqmesh.model.loading import load_config
from pqmesh.quant.bit_plan import parse_bits_spec
from pqmesh.quant.calibrate import LayerwiseRunner, load_tokens, token_windows
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.indicator_file import KINDS
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE
from pqmesh.quant.ppl import perplexity

log = structlog.get_logger(__name__)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"--dtype must be float32, float16 or bfloat16, got {name!r}")
    return dtype


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument(
        "--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="weights per quantization group (default 128)"
    )
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    parser.add_argument("--device", default="cpu")


def add_parser(subparsers) -> None:
    ind = subparsers.add_parser("indicator", help="per-layer quantization sensitivity table for the planner")
    _common(ind)
    ind.add_argument("--calib", required=True, help="calibration text file")
    ind.add_argument("--out", required=True, help="JSON file to write")
    ind.add_argument("--bits", default="8,4,3,2", help="bitwidths to rate (default 8,4,3,2)")
    ind.add_argument("--kind", choices=KINDS, default="variance")
    ind.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    ind.set_defaults(func=run_indicator)

    ppl = subparsers.add_parser("ppl", help="perplexity of a per-layer bit plan on a text file")
    _common(ppl)
    ppl.add_argument("--bits", required=True, help="uniform width (4), comma list per layer, or a JSON plan file")
    ppl.add_argument("--text", required=True, help="evaluation text file")
    ppl.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    ppl.set_defaults(func=run_ppl)


def run_indicator(args) -> int:
    tokens = load_tokens(args.model, args.calib, max_tokens=args.samples * args.seq_len)
    windows = token_windows(tokens, args.seq_len, args.samples)
    runner = LayerwiseRunner(args.model, windows, micro_batch=args.batch, dtype=_dtype(args.dtype), device=args.device)
    try:
        table = compute_indicator(
            runner, args.bits.split(","), args.kind, args.group_size, model_name=_model_name(args.model)
        )
    finally:
        runner.close()
    table.save(args.out)
    log.info("indicator_written", out=args.out, layers=table.num_layers, tokens=table.tokens, kind=table.kind)
    return 0


def run_ppl(args) -> int:
    plan = parse_bits_spec(args.bits, load_config(args.model).num_hidden_layers)
    windows = token_windows(load_tokens(args.model, args.text, args.max_tokens), args.seq_len)
    result = perplexity(args.model, plan, windows, args.group_size, args.batch, _dtype(args.dtype), args.device)
    sys.stdout.write(json.dumps({"model": _model_name(args.model), **result.to_json()}) + "\n")
    return 0


def _model_name(model_dir: str) -> str:
    return getattr(load_config(Path(model_dir)), "name_or_path", "") or Path(model_dir).name
