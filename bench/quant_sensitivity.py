"""How well each sensitivity indicator ranks layers by their measured damage, on WikiText-2.

    python bench/quant_sensitivity.py --model smollm2-135m-instruct|gemma-3-270m|DIR --steps target,indicators
        [--bits 3] [--methods rtn,gptq] [--eval-windows 32] [--calib-windows 16] [--kl-windows 4]
        [--seq-len 512] [--out r.json]

``--steps ""`` only merges (``--merge``, ``--indicator-file``) and summarizes.

- ``target``: per method, every layer quantized alone at ``--bits`` (`pqmesh.quant.sensitivity`) on
  the first ``--eval-windows`` windows of ``test.txt``; the mean KL per position against 16 bits and
  the NLL increase, per layer, and the split-half Spearman (first half of the windows against the
  second) at 2, 4, 8, ... windows up to all, so the table shows how many tokens the target needs.
- ``indicators``: on the first ``--calib-windows`` windows of ``valid.txt``, the variance,
  variance-abs and direct kinds, and on the first ``--kl-windows`` of them the kl kind (direct and
  kl for each method); the Spearman of
  each (at ``--bits``) against each method's target (run ``target`` first, or in the same call).

WikiText-2 in its tokenized form (``--data``); windows of ``--seq-len`` tokens, no context carried
over, BOS first where the tokenizer adds one (`pqmesh.quant.calibrate`). GPTQ: act-order, damping
1%, calibrated on the ``valid.txt`` windows with 16-bit inputs to each layer. Results are merged
into ``--out`` (JSON) and a summary is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pqmesh.log import configure
from pqmesh.model.embedded import MODELS, prepare
from pqmesh.quant.calibrate import LayerwiseRunner, bos_token, calibration_windows, load_tokens, token_windows
from pqmesh.quant.calibrated import GptqSettings
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.indicator_file import load_indicator
from pqmesh.quant.rank import spearman
from pqmesh.quant.sensitivity import measure_damage, quantized_variants
from pqmesh.types import Bits

INDICATORS = ("variance", "variance-abs", "direct-rtn", "direct-gptq", "kl-rtn", "kl-gptq")


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def step_target(model: Path, ctx: dict, results: dict) -> None:
    out = results.setdefault("target", {})
    for method in ctx["methods"]:
        started = time.perf_counter()
        calib = LayerwiseRunner(model, ctx["calib"], micro_batch=ctx["batch"]) if method == "gptq" else None
        variants = quantized_variants(model, (ctx["bits"],), method, ctx["group"], calib, ctx["gptq"])
        if calib is not None:
            calib.close()
        table = measure_damage(model, ctx["eval"], variants, method, ctx["batch"])[Bits.parse(ctx["bits"])]
        counts = [n for n in (2, 4, 8, 16, 32, 64, 128) if n < table.windows] + [table.windows]
        out[method] = {**table.to_json(), "seconds": time.perf_counter() - started,
                       "hessian_clip": ctx["gptq"].hessian_clip if method == "gptq" else None,
                       "split_half_kl": {str(n * (table.seq_len - 1)): table.split_half(n) for n in counts},
                       "split_half_nll": {str(n * (table.seq_len - 1)): table.split_half(n, "nll") for n in counts}}
        log(f"target {method}: split-half KL {out[method]['split_half_kl']} ({out[method]['seconds']:.0f} s)")


def step_indicators(model: Path, ctx: dict, results: dict) -> None:
    out = results.setdefault("indicators", {})
    for name in ctx["indicators"]:
        kind, method = (name, "rtn") if name.startswith("variance") else name.split("-")
        started = time.perf_counter()
        windows = ctx["calib"][:ctx["kl_windows"]] if kind == "kl" else ctx["calib"]
        runner = LayerwiseRunner(model, windows, micro_batch=ctx["batch"])
        table = compute_indicator(runner, (ctx["bits"],), kind, ctx["group"], method=method, settings=ctx["gptq"])
        runner.close()
        out[name] = {"values": [table.value(i, ctx["bits"]) for i in range(table.num_layers)],
                     "seconds": time.perf_counter() - started, "windows": int(windows.shape[0]),
                     "hessian_clip": ctx["gptq"].hessian_clip if method == "gptq" else None}
        log(f"indicator {name}: {out[name]['seconds']:.0f} s")


def read_indicator_files(specs: list[str], bits: int, results: dict) -> None:
    """``NAME=PATH`` indicator files (`pqmesh indicator` output) join the indicators as NAME."""
    for spec in specs:
        name, _, path = spec.partition("=")
        table = load_indicator(path)
        results.setdefault("indicators", {})[name] = {
            "values": [table.value(i, bits) for i in range(table.num_layers)], "file": path,
            "kind": table.kind, "samples": table.samples, "seq_len": table.seq_len}


def summary(results: dict) -> dict:
    """Spearman of every indicator against every method's target (KL and NLL increase)."""
    rows = {}
    for method, target in results.get("target", {}).items():
        for name, ind in results.get("indicators", {}).items():
            rows[f"{name} vs {method} kl"] = spearman(ind["values"], target["mean_kl"])
            rows[f"{name} vs {method} nll"] = spearman(ind["values"], target["mean_nll_increase"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help=f"one of {', '.join(MODELS)} or a DIR")
    parser.add_argument("--steps", default="target,indicators")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/wikitext-2"))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--kl-windows", type=int, default=4, help="calibration windows of the kl kind (4)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hessian-clip", action=argparse.BooleanOptionalAction, default=True,
                        help="gptq (targets and indicators): group clipping weighted by H_jj")
    parser.add_argument("--indicators", default=",".join(INDICATORS), help="what the indicators step computes")
    parser.add_argument("--indicator-file", action="append", default=[], metavar="NAME=PATH",
                        help="an indicator file written by `pqmesh indicator`, reported as NAME (repeatable)")
    parser.add_argument("--merge", action="append", default=[], type=Path,
                        help="results JSON of another run whose targets and indicators join these (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results, merged with what is there")
    args = parser.parse_args(argv)
    configure("warning")
    model = prepare(model=args.model) if args.model in MODELS else Path(args.model)
    bos = bos_token(model)
    need = args.eval_windows * (args.seq_len - (bos is not None))
    tokens = load_tokens(model, args.data / "test.txt", need)
    ctx = {"eval": token_windows(tokens, args.seq_len, args.eval_windows, bos),
           "calib": calibration_windows(model, args.data / "valid.txt", args.calib_windows, args.seq_len),
           "kl_windows": args.kl_windows, "bits": args.bits, "methods": args.methods.split(","),
           "group": args.group_size, "batch": args.batch, "indicators": args.indicators.split(","),
           "gptq": GptqSettings(hessian_clip=args.hessian_clip)}
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    results.update(model=args.model, bits=args.bits, seq_len=args.seq_len, group_size=args.group_size,
                   eval_windows=int(ctx["eval"].shape[0]), calib_windows=int(ctx["calib"].shape[0]),
                   corpus="wikitext-2 (tokenized form): test (target) / valid (indicators, gptq calibration)")
    for other in args.merge:
        for key in ("target", "indicators"):
            results.setdefault(key, {}).update(json.loads(other.read_text()).get(key, {}))
    read_indicator_files(args.indicator_file, args.bits, results)
    steps = {"target": step_target, "indicators": step_indicators}
    for name in filter(None, args.steps.split(",")):
        steps[name](model, ctx, results)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = {"split_half_kl": {m: t["split_half_kl"] for m, t in results.get("target", {}).items()},
             "split_half_nll": {m: t["split_half_nll"] for m, t in results.get("target", {}).items()},
             "spearman": summary(results)}
    if args.out:
        results["summary"] = table
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.write(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

