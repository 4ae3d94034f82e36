"""Quantization quality on a real model: WikiText-2 perplexity per plan and quantizer, and how well
the sensitivity indicator ranks layers.

    python bench/quant_quality.py --model smollm2-135m-instruct|gemma-3-270m|DIR --steps uniform,mixed
        [--eval-tokens 8192] [--calib-windows 16] [--seq-len 512] [--out results.json]

Corpora: WikiText-2 in its tokenized form (``--data``, default ``/work/shared/data/wikitext-2``):
``test.txt`` is the evaluation text (its first ``--eval-tokens`` tokens), ``valid.txt`` the
calibration text (its first ``--calib-windows`` windows). Windows of ``--seq-len`` tokens, no context
carried over (`pqmesh.quant.ppl`), starting with BOS where the model's tokenizer adds one (Gemma;
not SmolLM2), so every window predicts ``--seq-len - 1`` text tokens. Steps (``--steps``, results
merged into ``--out``):

- ``uniform``: perplexity at uniform 16, 8, 4, 3, 2 bits, round-to-nearest (``rtn``) and calibrated
  (``gptq``: `pqmesh quantize` into a temporary checkpoint, then evaluated as stored);
- ``indicator``: the variance indicator, and the direct one for rtn and gptq, on the calibration text;
- ``layers``: each layer alone at 3 bits (rtn), the perplexity increase over 16 bits, from cached
  16-bit hidden states at that layer's input; Spearman of every indicator against it, and of the
  increases on the two halves of the evaluation text with each other (the target's reproducibility);
- ``mixed``: per method (``--mixed-methods``), the planner's solver (`planner.quality_plan`) picks
  per layer a width of ``--mixed-bits`` with the least summed indicator (``--mixed-indicator``, one
  per method: an indicator step's name or a ``pqmesh indicator`` file) in the memory of uniform
  4-bit; the plan is evaluated with that method (skipped when it is uniform 4 bits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from planner.catalog import model_from_config_json
from planner.indicator import Indicator
from planner.quality_plan import least_indicator_plan
from pqmesh.log import configure
from pqmesh.model import ModelShard
from pqmesh.model.embedded import MODELS, prepare
from pqmesh.model.loading import load_config
from pqmesh.quant.calibrate import (
    LayerwiseRunner,
    bos_token,
    calibration_windows,
    load_tokens,
    token_windows,
)
from pqmesh.quant.calibrated import GptqSettings
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.layer import plan_hook
from pqmesh.quant.ppl import nll_sum, perplexity
from pqmesh.quant.quantize import quantize_checkpoint
from pqmesh.quant.rank import spearman
from pqmesh.types import Bits

WIDTHS = (8, 4, 3, 2)
INDICATORS = {"variance": ("variance", "rtn"), "direct-rtn": ("direct", "rtn"), "direct-gptq": ("direct", "gptq")}


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def evaluate(model: Path, plan: list[int], method: str, ctx: dict) -> dict:
    """Perplexity of ``plan`` with ``method``; gptq goes through a real quantized checkpoint."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qq-", dir=ctx["work"]) as scratch:
        source = model
        if method == "gptq" and any(b != 16 for b in plan):
            source = Path(scratch) / "q"
            quantize_checkpoint(model, source, plan, "gptq", ctx["calib"], ctx["group"], ctx["gptq"],
                                ctx["batch"], calibration={"file": "wikitext-2/valid.txt"})
        r = perplexity(source, plan, ctx["eval"], ctx["group"], ctx["batch"])
    return {"ppl": r.ppl, "weight_bytes": r.weight_bytes, "tokens": r.tokens, "seconds": time.perf_counter() - started}


def step_uniform(model: Path, layers: int, ctx: dict, results: dict) -> None:
    out = results.setdefault("uniform", {})
    out["16"] = evaluate(model, [16] * layers, "rtn", ctx)
    log(f"uniform 16: {out['16']['ppl']:.3f}")
    for method in ("rtn", "gptq"):
        for bits in WIDTHS:
            out[f"{method}-{bits}"] = r = evaluate(model, [bits] * layers, method, ctx)
            log(f"uniform {bits} {method}: {r['ppl']:.3f} ({r['seconds']:.0f} s)")


def step_indicator(model: Path, ctx: dict, results: dict) -> None:
    out = results.setdefault("indicator", {})
    for name in ctx["indicators"]:
        kind, method = INDICATORS[name]
        started = time.perf_counter()
        runner = LayerwiseRunner(model, ctx["calib"], micro_batch=ctx["batch"])
        widths = WIDTHS if kind == "variance" else (8, 4, 3)  # what the mixed plans and the layers step use
        table = compute_indicator(runner, widths, kind, ctx["group"], method=method)
        runner.close()
        out[name] = [{str(b): table.value(i, b) for b in widths} for i in range(table.num_layers)]
        log(f"indicator {name}: {time.perf_counter() - started:.0f} s")


def layer_inputs(model: Path, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """16-bit hidden states at the input of every layer (index 0: the token ids themselves)."""
    runner = LayerwiseRunner(model, windows, micro_batch=batch)
    inputs = [windows]
    for index in range(runner.num_layers - 1):
        layer = runner.load_layer(index)
        runner.advance([runner.forward(layer, runner.hidden[part]) for part in runner.batches()])
        inputs.append(runner.hidden)
    runner.close()
    return inputs


def single_layer_parts(model: Path, index: int, layers: int, bits: int, inputs, ctx) -> list[tuple[float, int]]:
    plan = [bits] + [16] * (layers - index - 1)
    windows, batch = ctx["eval"], ctx["batch"]
    shard = ModelShard.load(model, index, layers, max_slots=batch, max_len=windows.shape[1],
                            layer_hook=plan_hook(plan, index, layers, ctx["group"]))
    return [nll_sum(shard, inputs[i:i + batch], windows[i:i + batch]) for i in range(0, windows.shape[0], batch)]


def ppl_of(parts) -> float:
    return math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))


def step_layers(model: Path, layers: int, ctx: dict, results: dict) -> None:
    inputs = layer_inputs(model, ctx["eval"], ctx["batch"])
    base = single_layer_parts(model, layers - 1, layers, 16, inputs[-1], ctx)
    half = len(base) // 2
    increase, halves = [], ([], [])
    for index in range(layers):
        parts = single_layer_parts(model, index, layers, 3, inputs[index], ctx)
        increase.append(ppl_of(parts) - ppl_of(base))
        halves[0].append(ppl_of(parts[:half]) - ppl_of(base[:half]))
        halves[1].append(ppl_of(parts[half:]) - ppl_of(base[half:]))
        log(f"layer {index} alone at 3 bits: {increase[-1]:+.3f}")
    results["layers"] = {"increase": increase, "split_half_spearman": spearman(*halves), "base_ppl": ppl_of(base)}
    for name, table in results.get("indicator", {}).items():
        results["layers"][f"spearman_{name}"] = spearman([row["3"] for row in table], increase)


def mixed_indicator(source: str, results: dict) -> Indicator:
    """An indicator step's table by name (``direct-gptq``) or an indicator file (``pqmesh indicator``)."""
    if source in results.get("indicator", {}):
        rows = [{Bits.parse(k): v for k, v in row.items()} | {Bits.B16: 0.0} for row in results["indicator"][source]]
        return Indicator(tuple(rows), kind=source)
    return Indicator.load(source)


def step_mixed(model: Path, layers: int, ctx: dict, results: dict) -> None:
    """Per method: the planner's solver (`planner.quality_plan`) picks, from ``--mixed-bits``, the
    widths with the least summed indicator in the memory of uniform 4-bit; evaluated."""
    shape = model_from_config_json((model / "config.json").read_text(), name=model.name)
    allowed = tuple(Bits.parse(b) for b in ctx["mixed_bits"])
    out = results.setdefault("mixed", {})
    for method, source in zip(ctx["mixed"], ctx["mixed_indicator"]):
        chosen = least_indicator_plan(shape, mixed_indicator(source, results), allowed, Bits.B4, "float32",
                                      ctx["eval"].shape[1])
        plan = [int(b) for b in chosen.bits]
        r = {"plan": plan, "indicator": source, "indicator_total": chosen.indicator_total,
             "uniform4_indicator_total": chosen.uniform_total, "stage_bytes": chosen.memory_bytes,
             "uniform4_stage_bytes": chosen.budget_bytes, "layer_weight_bytes": chosen.weight_bytes,
             "uniform4_layer_weight_bytes": chosen.uniform_weight_bytes}
        if all(b == 4 for b in plan):
            log(f"mixed {method} ({source}): the planner keeps uniform 4 bits; not evaluated again")
        else:
            r.update(evaluate(model, plan, method, ctx))
            log(f"mixed {method} {plan}: {r['ppl']:.3f}")
        out[f"{method}:{source}"] = r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help=f"one of {', '.join(MODELS)} or a DIR")
    parser.add_argument("--steps", default="uniform,indicator,layers,mixed")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/wikitext-2"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="gptq act-order")
    parser.add_argument("--true-sequential", action="store_true", help="gptq: linears input by input in a layer")
    parser.add_argument("--hessian-clip", action=argparse.BooleanOptionalAction, default=True,
                        help="gptq: group clipping weighted by H_jj")
    parser.add_argument("--indicators", default=",".join(INDICATORS), help="indicators the indicator step computes")
    parser.add_argument("--mixed-methods", default="rtn,gptq", help="quantizers the mixed step plans for")
    parser.add_argument("--mixed-indicator", default="direct-rtn,direct-gptq",
                        help="per mixed method: an indicator step's name or an indicator JSON file")
    parser.add_argument("--mixed-bits", default="8,4,3", help="widths the mixed plans may use")
    parser.add_argument("--out", type=Path, default=None, help="JSON results, merged with what is there")
    args = parser.parse_args(argv)
    configure("warning")
    model = prepare(model=args.model) if args.model in MODELS else Path(args.model)
    layers = load_config(model).num_hidden_layers
    tokens = load_tokens(model, args.data / "test.txt", args.eval_tokens)
    ctx = {"eval": token_windows(tokens, args.seq_len, bos=bos_token(model)), "group": args.group_size,
           "batch": args.batch,
           "calib": calibration_windows(model, args.data / "valid.txt", args.calib_windows, args.seq_len),
           "work": os.environ.get("TMPDIR", "/tmp"),
           "gptq": GptqSettings(act_order=args.act_order, true_sequential=args.true_sequential,
                                hessian_clip=args.hessian_clip),
           "indicators": args.indicators.split(","), "mixed": args.mixed_methods.split(","),
           "mixed_indicator": args.mixed_indicator.split(","), "mixed_bits": args.mixed_bits.split(",")}
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    results.update(model=args.model, seq_len=args.seq_len, eval_tokens=int(ctx["eval"].numel()),
                   calib_tokens=int(ctx["calib"].numel()), group_size=args.group_size,
                   threads=torch.get_num_threads(), act_order=args.act_order,
                   true_sequential=args.true_sequential, hessian_clip=args.hessian_clip,
                   corpus="wikitext-2 (tokenized form): test / valid")
    steps = {"uniform": lambda: step_uniform(model, layers, ctx, results),
             "indicator": lambda: step_indicator(model, ctx, results),
             "layers": lambda: step_layers(model, layers, ctx, results),
             "mixed": lambda: step_mixed(model, layers, ctx, results)}
    for name in args.steps.split(","):
        steps[name]()
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.write(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
