"""`pqmesh quantize`, `pqmesh indicator` and `pqmesh ppl`: the quantization tools on the command line.

    pqmesh quantize --model DIR --bits SPEC --out DIR [--method gptq|rtn] [--calib TEXT] [--samples 32]
    pqmesh indicator --model DIR --calib TEXT --out ind.json [--bits 8,4,3,2] [--kind variance|direct|kl]
                     [--method rtn|gptq] [--around 4 --holdout 8 --stride 4]
    pqmesh ppl --model DIR --bits 4|16,8,...|plan.json --text TEXT [--method rtn|gptq --calib TEXT]
               [--seq-len 256] [--tokens N]

`ppl` prints one JSON line with the details, then the perplexity alone as a plain number on the
last line. With ``--method gptq`` it quantizes into a temporary checkpoint first (as `quantize`
would) and evaluates that; ``--model`` may also be a checkpoint written by `quantize`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import structlog
import torch

from pqmesh.errors import InvalidArgument
from pqmesh.model.loading import load_config
from pqmesh.quant.bit_plan import parse_bits_spec
from pqmesh.quant.calibrate import (
    LayerwiseRunner,
    bos_token,
    calibration_windows,
    load_tokens,
    token_windows,
)
from pqmesh.quant.calibrated import METHODS, GptqSettings
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.indicator_file import KINDS
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE
from pqmesh.quant.ppl import perplexity
from pqmesh.quant.quantize import quantize_checkpoint

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


def _calibration(parser: argparse.ArgumentParser, method_default: str) -> None:
    parser.add_argument("--method", choices=METHODS, default=method_default,
                        help=f"rtn: round-to-nearest, no calibration; gptq: calibrated (default {method_default})")
    parser.add_argument("--calib", default=None, help="calibration text file (gptq)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of --seq-len tokens (default 32)")
    _gptq_options(parser)


def _gptq_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--damp", type=float, default=0.01, help="gptq damping, fraction of mean diag(H) (0.01)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="gptq: visit input channels by decreasing H_jj (default on)")
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False,
                        help="gptq: quantize a layer's linears input by input, each calibrated on the quantized "
                             "ones before it (one more pass per input; default off)")
    parser.add_argument("--hessian-clip", action=argparse.BooleanOptionalAction, default=True,
                        help="gptq: choose each group's clipping for the output error, weighting columns by H_jj "
                             "(default on)")


def add_parser(subparsers) -> None:
    quant = subparsers.add_parser("quantize", help="write a pre-quantized checkpoint that stages load directly")
    _common(quant)
    quant.add_argument("--bits", required=True, help="uniform width (4), comma list per layer, or a JSON plan file")
    quant.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    _calibration(quant, "gptq")
    quant.set_defaults(func=run_quantize, default_log_level="info")

    ind = subparsers.add_parser("indicator", help="per-layer quantization sensitivity table for the planner")
    _common(ind)
    ind.add_argument("--calib", required=True, help="calibration text file")
    ind.add_argument("--out", required=True, help="JSON file to write")
    ind.add_argument("--bits", default="8,4,3,2", help="bitwidths to rate (default 8,4,3,2)")
    ind.add_argument("--kind", choices=KINDS, default="variance")
    ind.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    ind.add_argument("--method", choices=METHODS, default="rtn", help="quantizer the direct and kl kinds measure (rtn)")
    ind.add_argument("--around", default="16",
                     help="kl: measure each layer with every other layer at this width, quantized as a uniform "
                          "checkpoint of it is (rate plans near it; default 16: each layer alone)")
    ind.add_argument("--holdout", type=int, default=0,
                     help="kl: measure the damage on this many windows after the --samples calibration windows "
                          "of --calib instead of on the calibration windows themselves (default 0)")
    ind.add_argument("--stride", type=int, default=1,
                     help="kl: score every stride-th position only (the head of a large vocabulary dominates the "
                          "cost; default 1)")
    ind.add_argument("--confidence", type=float, default=None,
                     help="kl --around: charge every move away from the reference width this many standard "
                          "errors of its measured difference (window to window), so only gains beyond the "
                          "noise move a layer (default 1; 0: the plain means)")
    _gptq_options(ind)
    ind.set_defaults(func=run_indicator, default_log_level="info")

    ppl = subparsers.add_parser("ppl", help="perplexity of a per-layer bit plan on a text file")
    _common(ppl)
    ppl.add_argument("--bits", required=True, help="uniform width (4), comma list per layer, or a JSON plan file")
    ppl.add_argument("--text", required=True, help="evaluation text file")
    ppl.add_argument("--tokens", "--max-tokens", dest="max_tokens", type=int, default=None,
                     help="evaluate at most this many tokens of the text (default: all)")
    _calibration(ppl, "rtn")
    ppl.set_defaults(func=run_ppl, default_log_level="info")


def run_indicator(args) -> int:
    # BOS first where the tokenizer adds one (Gemma), as `pqmesh ppl` and `pqmesh quantize` do
    if args.holdout < 0:
        raise InvalidArgument(f"--holdout is a number of windows, at least 0, got {args.holdout}")
    windows = calibration_windows(args.model, args.calib, args.samples + args.holdout, args.seq_len)
    runner = LayerwiseRunner(args.model, windows[:args.samples], micro_batch=args.batch, dtype=_dtype(args.dtype),
                             device=args.device)
    try:
        table = compute_indicator(
            runner, args.bits.split(","), args.kind, args.group_size, model_name=_model_name(args.model),
            method=args.method, settings=_settings(args), around=args.around,
            measure=windows[args.samples:] if args.holdout else None, stride=args.stride,
            confidence=args.confidence,
        )
    finally:
        runner.close()
    table.save(args.out)
    log.info("indicator_written", out=args.out, layers=table.num_layers, tokens=table.tokens, kind=table.kind)
    return 0


def _settings(args) -> GptqSettings:
    return GptqSettings(damp=args.damp, act_order=args.act_order, true_sequential=args.true_sequential,
                        hessian_clip=args.hessian_clip)


def _quantize(args, plan, out: Path):
    windows = None
    calibration = {}
    if args.method == "gptq":
        if not args.calib:
            raise InvalidArgument("--method gptq needs --calib FILE (calibration text), or use --method rtn")
        windows = calibration_windows(args.model, args.calib, args.samples, args.seq_len)
        calibration = {"file": Path(args.calib).name}
    return quantize_checkpoint(args.model, out, plan, args.method, windows, args.group_size, _settings(args),
                               args.batch, args.device, calibration)


def run_quantize(args) -> int:
    plan = parse_bits_spec(args.bits, load_config(args.model).num_hidden_layers)
    _quantize(args, plan, Path(args.out))
    sys.stdout.write(f"{args.out}\n")
    return 0


def run_ppl(args) -> int:
    plan = parse_bits_spec(args.bits, load_config(args.model).num_hidden_layers)
    windows = token_windows(load_tokens(args.model, args.text, args.max_tokens), args.seq_len,
                            bos=bos_token(args.model))
    with tempfile.TemporaryDirectory(prefix="pqmesh-ppl-") as scratch:
        model = args.model
        if args.method == "gptq":
            model = Path(scratch) / "quantized"
            _quantize(args, plan, model)
        result = perplexity(model, plan, windows, args.group_size, args.batch, _dtype(args.dtype), args.device)
    line = {"model": _model_name(args.model), "method": args.method, **result.to_json()}
    sys.stdout.write(json.dumps(line) + "\n" + f"{result.ppl:.6g}\n")
    return 0


def _model_name(model_dir: str) -> str:
    """The directory's name: what the planner calls the model (`planner.catalog`), so an indicator
    file made here matches the plan that uses it. Called after the model has loaded."""
    return Path(model_dir).resolve().name
