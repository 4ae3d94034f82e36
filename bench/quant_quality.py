"""Quantization quality on the embedded SmolLM2-135M: perplexity per plan, and how well the
sensitivity indicator ranks layers.

    python bench/quant_quality.py [--eval-windows 16] [--calib-windows 16] [--out results.json]

Corpora (offline, Debian's `bible-kjv` + `bible-kjv-text`): Genesis is the calibration text, the
Gospel of John the evaluation text, so the two never overlap. Steps:
1. perplexity at uniform 16, 8, 4, 3 (and 2) bits;
2. the indicators (variance, variance-abs; with --direct also direct) from the calibration text;
3. for each layer alone at 3 bits, the perplexity increase over 16 bits; the per-layer runs start
   from cached 16-bit hidden states at that layer's input, so each runs only layers i..L-1;
4. Spearman rank correlation of indicator vs increase, and of the increases measured on the two
   halves of the evaluation text with each other (how reproducible the target is);
5. mixed plans: most sensitive third of layers (by the variance indicator) at 8 bits / middle at 4
   / least at 3 ("guided") and the reverse (same size); uniform 4 with the 3 most sensitive layers
   at 8 ("protect3").
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pqmesh.errors import FailedPrecondition
from pqmesh.log import configure
from pqmesh.model import ModelShard
from pqmesh.model.embedded import cache_root, prepare
from pqmesh.quant.calibrate import LayerwiseRunner, load_tokens, token_windows
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.layer import plan_hook
from pqmesh.quant.ppl import nll_sum, perplexity

BOOKS = {"calib": "Genesis 1:1-50:26", "eval": "John 1:1-21:25"}


def corpus(kind: str) -> Path:
    """Plain text of a book of the KJV bible, verse references stripped, cached on disk."""
    path = cache_root() / "corpora" / f"kjv-{kind}.txt"
    if path.is_file():
        return path
    if shutil.which("bible") is None:
        raise FailedPrecondition("the corpora need Debian's KJV bible: apt-get install -y bible-kjv bible-kjv-text")
    lines = subprocess.run(["bible", "-f", BOOKS[kind]], capture_output=True, text=True, check=True).stdout.splitlines()
    text = "\n".join(line.split(" ", 1)[1] if " " in line else line for line in lines if line.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


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


def single_layer_nll(
    model: Path, index: int, num_layers: int, bits: int, inputs, windows, batch, group
) -> list[tuple[float, int]]:
    """(summed NLL, tokens) per micro-batch of windows, with only layer ``index`` at ``bits``."""
    plan = [bits] + [16] * (num_layers - index - 1)
    width = windows.shape[1]
    shard = ModelShard.load(
        model, index, num_layers, max_slots=batch, max_len=width, layer_hook=plan_hook(plan, index, num_layers, group)
    )
    return [
        nll_sum(shard, inputs[first : first + batch], windows[first : first + batch])
        for first in range(0, windows.shape[0], batch)
    ]


def ppl_of(parts: list[tuple[float, int]]) -> float:
    return math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sweep(model: Path, eval_windows: torch.Tensor, base: float, num_layers: int, args) -> dict:
    """Perplexity increase with each layer alone at 3 bits, on the whole text and on its halves."""
    inputs = layer_inputs(model, eval_windows, args.batch)
    base_parts = single_layer_nll(
        model, num_layers - 1, num_layers, 16, inputs[-1], eval_windows, args.batch, args.group_size
    )
    assert abs(ppl_of(base_parts) - base) < 1e-3 * base, (
        f"cached-input path disagrees with the full model: {ppl_of(base_parts)} vs {base}"
    )
    half = len(base_parts) // 2
    increase, halves = [], ([], [])
    for index in range(num_layers):
        parts = single_layer_nll(model, index, num_layers, 3, inputs[index], eval_windows, args.batch, args.group_size)
        increase.append(ppl_of(parts) - base)
        halves[0].append(ppl_of(parts[:half]) - ppl_of(base_parts[:half]))
        halves[1].append(ppl_of(parts[half:]) - ppl_of(base_parts[half:]))
        log(f"layer {index} at 3 bits: ppl {ppl_of(parts):.3f} ({increase[-1]:+.3f})")
    # how reproducible the target itself is: rank agreement of the increases on the two halves
    return {"increase": increase, "split_half_spearman": spearman(*halves)}


def mixed_plans(table, num_layers: int) -> dict[str, list[int]]:
    order = sorted(range(num_layers), key=lambda i: -table.value(i, 3))  # most sensitive first
    third = num_layers // 3
    guided, reverse = [0] * num_layers, [0] * num_layers
    for rank, i in enumerate(order):
        guided[i] = 8 if rank < third else 4 if rank < 2 * third else 3
        reverse[i] = 3 if rank < third else 4 if rank < 2 * third else 8
    protect = [8 if i in order[:3] else 4 for i in range(num_layers)]  # uniform 4 but the top 3 at 8
    return {"guided": guided, "reverse": reverse, "protect3": protect}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--direct", action="store_true", help="also compute the direct indicator")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    args = parser.parse_args(argv)
    configure("warning")
    model = prepare()
    eval_windows = token_windows(load_tokens(model, corpus("eval")), args.seq_len, args.eval_windows)
    calib_windows = token_windows(load_tokens(model, corpus("calib")), args.seq_len, args.calib_windows)
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    results: dict = {
        "seq_len": args.seq_len,
        "eval_tokens": int(eval_windows.numel()),
        "calib_tokens": int(calib_windows.numel()),
        "group_size": args.group_size,
        "uniform": {},
        "mixed": {},
        "threads": torch.get_num_threads(),
    }
    for bits in (16, 8, 4, 3, 2):
        r = perplexity(model, [bits] * num_layers, eval_windows, args.group_size, args.batch)
        results["uniform"][bits] = {"ppl": r.ppl, "weight_bytes": r.weight_bytes, "seconds": r.seconds}
        log(f"uniform {bits}: ppl {r.ppl:.3f} ({r.seconds:.0f} s)")
    tables = {}
    for kind in ["variance", "variance-abs"] + (["direct"] if args.direct else []):
        start = time.perf_counter()
        tables[kind] = compute_indicator(
            LayerwiseRunner(model, calib_windows, micro_batch=args.batch), (8, 4, 3, 2), kind, args.group_size
        )
        log(f"indicator {kind}: {time.perf_counter() - start:.0f} s")
    results["indicator"] = {k: t.to_json() for k, t in tables.items()}
    swept = sweep(model, eval_windows, results["uniform"][16]["ppl"], num_layers, args)
    results["single_layer_3bit_increase"] = swept["increase"]
    results["split_half_spearman"] = swept["split_half_spearman"]
    results["spearman"] = {
        k: spearman([t.value(i, 3) for i in range(num_layers)], swept["increase"]) for k, t in tables.items()
    }
    for name, plan in mixed_plans(tables["variance"], num_layers).items():
        r = perplexity(model, plan, eval_windows, args.group_size, args.batch)
        results["mixed"][name] = {"plan": plan, "ppl": r.ppl, "weight_bytes": r.weight_bytes}
        log(f"mixed {name}: ppl {r.ppl:.3f}")
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def report(results: dict) -> None:
    out = sys.stdout
    out.write(
        f"eval {results['eval_tokens']} tokens, calib {results['calib_tokens']} tokens, g={results['group_size']}\n"
    )
    out.write("plan | ppl | weights MB\n")
    for bits, r in results["uniform"].items():
        out.write(f"uniform {bits} | {r['ppl']:.3f} | {r['weight_bytes'] / 2**20:.1f}\n")
    for name, r in results["mixed"].items():
        out.write(f"mixed {name} | {r['ppl']:.3f} | {r['weight_bytes'] / 2**20:.1f}\n")
    for kind, rho in results["spearman"].items():
        out.write(f"spearman({kind} indicator @3 bits, single-layer ppl increase) = {rho:.3f}\n")
    out.write(f"split-half spearman of the increases themselves = {results['split_half_spearman']:.3f}\n")
    out.write("increase per layer: " + " ".join(f"{x:.3f}" for x in results["single_layer_3bit_increase"]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
