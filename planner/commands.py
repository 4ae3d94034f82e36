"""`pqmesh plan`: solve for a plan from a cluster file and print it (a table, or JSON with --json).

The solver and gRPC modules are imported inside `run`, so `pqmesh --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from planner.memory import GIB
from pqmesh.errors import InvalidArgument, NotFound


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose device order, layer ranges, bits and micro-batch sizes (LLM-PQ)")
    p.add_argument("--cluster", required=True, type=Path, help="cluster TOML ([[device]] tables, [network])")
    p.add_argument("--model", required=True, help="built-in model name (e.g. opt-30b), config.json or checkpoint dir")
    p.add_argument("--batch", type=int, default=0,
                   help="global batch: sequences planned together (default: the --prompt-lengths total)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-len", type=int, help="tokens per prompt")
    prompt.add_argument("--prompt-lengths", metavar="LEN:COUNT,...",
                        help="the job's prompt lengths as a histogram, e.g. 128:900,2048:100: KV cache for the "
                             "longest, costs at the padded mean, the job-time replay over the distribution")
    gen = p.add_mutually_exclusive_group(required=True)
    gen.add_argument("--gen-len", type=int, help="new tokens per sequence")
    gen.add_argument("--gen-lengths", metavar="LEN:COUNT,...", help="the job's max_new_tokens as a histogram")
    quality = p.add_mutually_exclusive_group()
    quality.add_argument("--theta", type=float, help="weight of the summed quality indicator (seconds per unit)")
    quality.add_argument(
        "--quality-bound", type=float, help="upper bound on the summed indicator (default: uniform int4's)"
    )
    p.add_argument("--indicator", type=Path, help="sensitivity indicator JSON (default: the model's shipped one "
                   "in planner/indicators/, else 2^-2b per layer)")
    p.add_argument("--bits", default="",
                   help="allowed bitwidths, e.g. 16,8,4 (default: 16,8,4,3,2; 6 and 5 on request)")
    p.add_argument("--dtype", default="", choices=("", "float16", "bfloat16", "float32"),
                   help="dtype the stages run in: bytes of unquantized weights, KV cache and activations "
                        "(default: the dtype the devices' profiles were measured in, float32 for a CPU "
                        "profile; float16 for built-in GPU types)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="solver time limit in seconds (default: 10; with --what-if, for all its solves: 60)")
    p.add_argument("--profile", type=Path, action="append", default=[], help="device profile JSON (repeatable)")
    p.add_argument("--state-dir", type=Path, help="read profiles registered with a planner using this state dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="also draw the plan (memory, layer bits, per-phase times vs the baselines) to this PNG")
    p.add_argument("--what-if", action="store_true",
                   help="answer what-if questions instead: one device more or less of each type, throughput "
                        "against the quality bound (a frontier of plans), the largest batch that fits")
    p.add_argument("--frontier-points", type=int, default=5,
                   help="--what-if: plans on the quality frontier (default 5)")
    p.add_argument("--add-type", action="append", default=[], metavar="TYPE",
                   help="--what-if: also ask what one device of TYPE (not in the cluster) adds (repeatable)")
    p.add_argument("--replicas", action="store_true",
                   help="plan the pool as several pipelines (data-parallel replicas, the best count found); "
                        "no coordinator runs them yet")
    p.set_defaults(func=run)


def _model_text(model: str) -> str:
    """Built-in names stay names; a config.json (or a directory holding one) becomes its JSON text."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.suffix == ".json" or model.endswith("/"):
            raise NotFound(f"model config {path} does not exist; pass a config.json or a built-in name")
        return model
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"{path} is not valid JSON: {err}") from None
    config.setdefault("_name_or_path", path.parent.name if path.name == "config.json" else path.stem)
    return json.dumps(config)


def _lookup(args: argparse.Namespace):
    from planner.devices import DeviceProfile
    from planner.registry import ProfileRegistry

    profiles = {}
    for path in args.profile:
        if not path.is_file():
            raise NotFound(f"profile file {path} does not exist")
        prof = DeviceProfile.from_json(path.read_text())
        profiles[prof.name] = prof
    registry = ProfileRegistry(args.state_dir) if args.state_dir else None
    return lambda name: profiles.get(name) or (registry.get(name) if registry else None)


def _workload(args: argparse.Namespace):
    from planner.cluster import Workload
    from pqmesh.lengths import LengthHistogram

    prompts = LengthHistogram.parse(args.prompt_lengths, "--prompt-lengths") if args.prompt_lengths else None
    generations = LengthHistogram.parse(args.gen_lengths, "--gen-lengths") if args.gen_lengths else None
    if not args.batch and prompts is None:
        raise InvalidArgument("--batch is required with --prompt-len (it defaults to the --prompt-lengths total)")
    return Workload(args.batch, args.prompt_len or 0, args.gen_len or 0, prompts=prompts, generations=generations)


def run(args: argparse.Namespace) -> int:
    from planner.cluster import Cluster
    from planner.indicator import Quality
    from planner.request import PlanInputs
    from planner.search import plan

    if (args.what_if or args.replicas) and args.plot:
        raise InvalidArgument("--plot draws one plan; leave it out with --what-if and --replicas")
    if args.what_if and args.replicas:
        raise InvalidArgument("give --what-if or --replicas, not both")
    if args.plot and not args.plot.resolve().parent.is_dir():
        raise NotFound(f"--plot: directory {args.plot.resolve().parent} does not exist")
    indicator = ""
    if args.indicator:
        if not args.indicator.is_file():
            raise NotFound(f"indicator file {args.indicator} does not exist")
        indicator = args.indicator.read_text()
    inputs = PlanInputs(_model_text(args.model), Cluster.load(args.cluster),
                        _workload(args),
                        Quality(theta=args.theta, bound=args.quality_bound), indicator,
                        tuple(b for b in args.bits.split(",") if b.strip()), args.time_limit or 10.0,
                        dtype=args.dtype)
    if args.what_if:
        return _what_if(args, inputs)
    if args.replicas:
        return _replicas(args, inputs)
    problem = inputs.to_problem(_lookup(args))
    result = plan(problem, inputs.time_limit_s)
    if args.json:
        sys.stdout.write(json.dumps(result.to_report()) + "\n")
    else:
        sys.stdout.write(render(result, problem))
    if args.plot:
        from planner.plot import plot_plan

        plot_plan(result, problem, args.plot)
    return 0


def _what_if(args: argparse.Namespace, inputs) -> int:
    from planner.whatif import DEFAULT_WHAT_IF_LIMIT_S, what_if

    result = what_if(inputs, _lookup(args), args.time_limit or DEFAULT_WHAT_IF_LIMIT_S, args.frontier_points,
                     tuple(args.add_type))
    if args.json:
        sys.stdout.write(json.dumps(result.to_report()) + "\n")
    else:
        sys.stdout.write(render_what_if(result))
    return 0


def _replicas(args: argparse.Namespace, inputs) -> int:
    from planner.replicas import plan_replicas

    found = plan_replicas(inputs, _lookup(args), args.time_limit or 60.0)
    if args.json:
        sys.stdout.write(json.dumps(found.to_report()) + "\n")
        return 0
    best = found.best
    pipeedge = best.pipeedge_tokens_per_s
    lines = [f"{len(best.replicas)} pipelines: {best.throughput_tokens_per_s:.1f} tokens/s"
             + (f" ({best.throughput_tokens_per_s / pipeedge:.2f}x PipeEdge on the same split)" if pipeedge else "")
             + f", worst gap {best.optimality_gap:.2%}; searched in {found.solve_seconds:.2f} s",
             "tried: " + ", ".join(f"{r}: {p.throughput_tokens_per_s:.1f}" if not isinstance(p, str) else f"{r}: none"
                                   for r, p in found.tried.items()), ""]
    for i, r in enumerate(best.replicas):
        pool = " ".join(f"{e.count}x{e.label}@{e.host}" for e in r.cluster.entries)
        tput = r.result.predicted.throughput_tokens_per_s
        lines.append(f"pipeline {i}: {r.batch_size} sequences on {pool}; {tput:.1f} tokens/s, "
                     f"{_plan_summary(r.result)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def render_what_if(result) -> str:
    """The human-readable what-if: base plan, device changes, frontier, largest batch."""
    base = result.base.predicted.throughput_tokens_per_s
    cut = f"; {result.cut_short} answers cut short for time (marked *)" if result.cut_short else ""
    lines = [f"base plan {result.base.plan.plan_id}: {base:.1f} tokens/s, quality {result.base.predicted.quality:.4g}; "
             f"what-if answered in {result.solve_seconds:.2f} s of its {result.time_limit_s:g} s limit{cut}", "",
             f"{'device change':<28}{'tokens/s':>10}{'marginal':>10}  plan / why not"]
    for d in result.devices:
        what = f"{'+' if d.delta > 0 else '-'}1 {d.device_type} ({d.host})" + (" *" if d.note else "")
        if d.result is None:
            lines.append(f"{what:<28}{'-':>10}{'-':>10}  {d.reason or d.note}")
        else:
            lines.append(f"{what:<28}{d.result.predicted.throughput_tokens_per_s:>10.1f}"
                         f"{d.marginal_tokens_per_s:>+10.1f}  {_plan_summary(d.result)}{_note(d.note)}")
    lines += ["", f"{'quality bound':<16}{'tokens/s':>10}{'quality':>12}  plan / why not"]
    for f in result.frontier:
        bound = f"{f.quality_bound:.4g}" + (" *" if f.note else "")
        if f.result is None:
            lines.append(f"{bound:<16}{'-':>10}{'-':>12}  {f.reason or f.note}")
        else:
            lines.append(f"{bound:<16}{f.result.predicted.throughput_tokens_per_s:>10.1f}"
                         f"{f.result.predicted.quality:>12.4g}  {_plan_summary(f.result)}{_note(f.note)}")
    m = result.max_batch
    lines.append("")
    star = " *" if m.note else ""
    if m.result is None:
        lines.append(f"largest batch that fits{star}: {m.batch_size} ({m.reason or m.note})")
    else:
        edge = "" if m.batch_size_bound == m.batch_size else f" (none above {m.batch_size_bound})"
        lines.append(f"largest batch that fits{star}: {m.batch_size} sequences{edge}, "
                     f"{m.result.predicted.throughput_tokens_per_s:.1f} tokens/s  {_plan_summary(m.result)}"
                     f"{_note(m.note)}")
    return "\n".join(lines) + "\n"


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def _plan_summary(result) -> str:
    p = result.plan
    return (f"plan {p.plan_id}: {len(p.stages)} stages, {_bits_summary(p.bits_per_layer)}, micro-batches "
            f"{p.prefill_micro_batch}/{p.decode_micro_batch}, gap {result.optimality_gap:.2%}")


def _bits_summary(bits) -> str:
    counts = Counter(int(b) for b in bits)
    return " ".join(f"{n}x{b}b" for b, n in sorted(counts.items(), reverse=True))


def _lengths(w) -> str:
    if not w.has_histograms:
        return f"prompt {w.prompt_length}, generation {w.generation_length}"
    return (f"prompt mean {w.prompt_length} (longest {w.max_prompt_length}), generation mean "
            f"{w.generation_length} (longest {w.max_generation_length}): KV cache for {w.max_context} tokens")


def render(result, problem) -> str:
    """The human-readable plan: stages, predictions and baselines."""
    p, pred = result.plan, result.predicted
    w = problem.workload
    lines = [f"plan {p.plan_id}: {problem.shape.name} on {len(problem.devices)} devices, "
             f"batch {w.batch_size}, {_lengths(w)}, {problem.dtype}",
             f"predicted {pred.throughput_tokens_per_s:.1f} tokens/s (prefill {pred.prefill_s:.2f} s + decode "
             f"{pred.decode_s:.2f} s), quality {pred.quality:.4g}; solved in {result.solve_seconds:.2f} s, "
             f"gap {result.optimality_gap:.3%}",
             f"micro-batches: prefill {p.prefill_micro_batch}, decode {p.decode_micro_batch}", "",
             f"{'stage':<6}{'device':<20}{'layers':<12}{'bits':<22}memory"]
    for i, (stage, mem) in enumerate(zip(p.stages, pred.memory_bytes)):
        cap = problem.device(stage.device).profile.memory_bytes
        lines.append(f"{i:<6}{stage.device:<20}{f'{stage.start}-{stage.end}':<12}{_bits_summary(stage.bits):<22}"
                     f"{mem / GIB:.2f} / {cap / GIB:.2f} GiB")
    lines += ["", f"{'baseline':<14}{'tokens/s':>10}{'ours/it':>10}  notes"]
    for name, b in sorted(result.baselines.items()):
        if b.feasible:
            tput = b.predicted.throughput_tokens_per_s
            bits = _bits_summary(b.plan.bits_per_layer) if b.plan else ""
            lines.append(f"{name:<14}{tput:>10.1f}{pred.throughput_tokens_per_s / tput:>9.2f}x  {bits}")
        else:
            lines.append(f"{name:<14}{'-':>10}{'-':>10}  infeasible: {b.reason}")
    return "\n".join(lines) + "\n"
