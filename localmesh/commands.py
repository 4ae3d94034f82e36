"""`pqmesh demo`: the whole mesh on loopback, or the model's slices in this process.

`pqmesh demo` runs the whole mesh on loopback (`localmesh.demo`). `pqmesh demo --in-process`
runs a few chat prompts through the model split into slices in this process and through Hugging Face
`generate` on the same prompts, and prints both texts and their tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from localmesh import DEFAULT_BUDGETS_MB

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain pipeline parallelism in one sentence.",
    "List three uses of a hash table.",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="planner + pinned stage servers (one per core set) + coordinator on "
                                       "loopback, plan vs PipeEdge baseline")
    demo.add_argument("--prompts", type=int, default=64, help="prompts in the batch (default: 64)")
    demo.add_argument(
        "--max-new-tokens", type=int, default=None, help="new tokens per prompt (default: 32; 40 in-process)"
    )
    demo.add_argument("--budgets-mb", default=",".join(map(str, DEFAULT_BUDGETS_MB)),
                      help="memory budget of each stage server in MiB, one stage per budget, each on its own cores "
                           "(default: %(default)s)")
    demo.add_argument("--quick-profile", action="store_true", help="profile on a small grid (faster, less accurate)")
    demo.add_argument("--workdir", type=Path, default=None, help="logs, plans and databases (default: a new temp dir)")
    demo.add_argument("--in-process", action="store_true",
                      help="instead: chained slices in this process vs Hugging Face generate (token-exact check)")
    demo.add_argument("--model", type=Path, default=None, help="--in-process: checkpoint directory (default: embedded)")
    demo.add_argument("--stages", type=int, default=2, help="--in-process: number of slices (default: 2)")
    demo.add_argument("--device", default="cpu", help="--in-process: cpu or cuda[:N]")
    demo.set_defaults(func=_demo)


def even_cuts(layers: int, stages: int) -> list[int]:
    """Boundaries of ``stages`` contiguous slices whose sizes differ by at most one layer."""
    if not 1 <= stages <= layers:
        raise ValueError(f"stages must be within 1..{layers}, got {stages}")
    return [round(i * layers / stages) for i in range(stages + 1)]


def _demo(args: argparse.Namespace) -> int:
    if args.in_process:
        args.max_new_tokens = args.max_new_tokens or 40
        return _demo_in_process(args)
    from localmesh.demo import DemoOptions, run_demo

    try:
        budgets = tuple(int(x) for x in args.budgets_mb.split(","))
    except ValueError:
        sys.stderr.write(f"--budgets-mb takes comma-separated integers (MiB), got {args.budgets_mb!r}\n")
        return 2
    if args.prompts < 1 or len(budgets) < 1:
        sys.stderr.write("--prompts must be >= 1 and --budgets-mb must name at least one stage\n")
        return 2
    options = DemoOptions(prompts=args.prompts, max_new_tokens=args.max_new_tokens or 32, budgets_mb=budgets,
                          quick_profile=args.quick_profile, workdir=args.workdir)
    try:
        run_demo(options)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; every server was stopped\n")
        return 130
    return 0


def _demo_in_process(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pqmesh.model import LocalPipeline, ModelShard
    from pqmesh.model.embedded import prepare
    from pqmesh.model.loading import load_config

    out = sys.stdout
    model_dir = args.model or prepare()
    config = load_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in DEMO_PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    cuts = even_cuts(config.num_hidden_layers, args.stages)
    budget = max(len(p) for p in prompts) + args.max_new_tokens
    out.write(f"model {model_dir.name}: {config.model_type}, {config.num_hidden_layers} layers, "
              f"slices {[(a, b) for a, b in zip(cuts, cuts[1:])]} on {args.device}\n")
    shards = [
        ModelShard.load(model_dir, a, b, max_slots=len(prompts), max_len=budget, device=args.device)
        for a, b in zip(cuts, cuts[1:])
    ]
    pipeline = LocalPipeline(shards)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pipeline.generate_greedy(prompts, 2, len(prompts), len(prompts))  # warm-up, like the reference below
    start = time.perf_counter()
    ours = pipeline.generate_greedy(prompts, args.max_new_tokens, len(prompts), len(prompts), stop_ids=eos)
    ours_s = time.perf_counter() - start

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(args.device)
    with torch.no_grad():
        reference.generate(**batch, max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        generated = reference.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    hf_s = time.perf_counter() - start
    theirs = [_until_stop(row[batch["input_ids"].shape[1]:].tolist(), eos) for row in generated]

    same = 0
    for prompt, mine, ref in zip(DEMO_PROMPTS, ours, theirs):
        same += mine == ref
        out.write(f"\n> {prompt}\n  pqmesh: {tokenizer.decode(mine, skip_special_tokens=True).strip()}\n")
        if mine != ref:
            out.write(f"  HF    : {tokenizer.decode(ref, skip_special_tokens=True).strip()}\n")
    ours_n, hf_n = sum(map(len, ours)), sum(map(len, theirs))
    out.write(f"\n{same}/{len(prompts)} outputs identical to Hugging Face generate\n")
    out.write(f"pqmesh ({args.stages} slices): {ours_n} tokens in {ours_s:.2f} s = {ours_n / ours_s:.1f} tokens/s\n")
    out.write(f"HF generate            : {hf_n} tokens in {hf_s:.2f} s = {hf_n / hf_s:.1f} tokens/s\n")
    return 0


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens
